"""Build SAM2 models: configs by packaged name or yaml path, checkpoints, devices.

A model is a plain `sam2.modeling.sam2_base.SAM2Base` built from a hydra/OmegaConf
config. `config` may be

* a packaged SAM2 config name, in any of the spellings users meet:
  ``configs/sam2.1/sam2.1_hiera_t.yaml``, ``sam2.1/sam2.1_hiera_t.yaml``,
  ``sam2.1_hiera_t.yaml``, ``sam2.1_hiera_t``, or the SAM 2.0 ``sam2_hiera_l.yaml``;
* a path to a yaml file (the official configs, or one of ours).

`checkpoint` may be a path to an official checkpoint (``{"model": state_dict}``), an
official model name (``sam2.1_hiera_tiny`` ...; see `OFFICIAL_MODELS` and the
`download` module), or ``"random"``: random weights from a fixed seed, for exercising
the pipeline only (masks are meaningless; the object-score head is biased towards
"object present" so that every structure gets a mask).

The model is built with the settings the official video predictor applies on top of
the config (`VIDEO_PREDICTOR_OVERRIDES`), so that our engine reproduces
`SAM2VideoPredictor` exactly.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from sam2pal.errors import InputError
from sam2pal.io.atomic import file_sha256  # noqa: F401  (part of this module's interface)
from sam2pal.models.registry import (  # noqa: F401  (re-exported)
    OFFICIAL_MODELS,
    RANDOM_CHECKPOINT,
    OfficialModel,
    choose_config,
    config_for_checkpoint,
    official_model,
)

# The overrides `sam2.build_sam.build_sam2_video_predictor` adds to every config
# (apart from `fill_hole_area`, which the engine applies itself).
VIDEO_PREDICTOR_OVERRIDES = {
    "sam_mask_decoder_extra_args": {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    },
    "binarize_mask_from_pts_for_mem_enc": True,
}


def _sam2_package_dir() -> Path:
    import sam2

    return Path(sam2.__file__).parent


def packaged_config_names() -> list[str]:
    root = _sam2_package_dir()
    return sorted(str(p.relative_to(root)) for p in root.glob("configs/**/*.yaml"))


def resolve_config(config: str | os.PathLike) -> Path:
    """Path of the yaml file a config value stands for.

    Args:
        config: a yaml file path, or the name of a config packaged with SAM2
            (``sam2.1_hiera_t``, ``configs/sam2.1/sam2.1_hiera_t.yaml``, ...).

    Returns:
        The yaml file's path.
    """
    text = str(config).strip()
    as_path = Path(text).expanduser()
    if as_path.is_file():
        return as_path.resolve()
    root = _sam2_package_dir()
    name = text if text.endswith(".yaml") else text + ".yaml"
    candidates = [root / name, root / "configs" / name]
    base = Path(name).name
    candidates += [root / "configs" / "sam2.1" / base, root / "configs" / "sam2" / base]
    for candidate in candidates:
        if candidate.is_file() and "configs" in candidate.relative_to(root).parts:
            return candidate
    if as_path.suffix in (".yaml", ".yml") and (os.sep in text or "/" in text):
        raise InputError(f"{text}: model config file not found")
    known = ", ".join(Path(n).stem for n in packaged_config_names())
    raise InputError(
        f"model config '{text}' is neither a yaml file nor a packaged SAM2 config "
        f"(packaged: {known})"
    )


def load_model_config(config: str | os.PathLike, image_size: int | None = None):
    """The OmegaConf config of a model, with our overrides applied and resolved.

    Args:
        config: as in `resolve_config`.
        image_size: the model's input size (a multiple of 32), or None for the config's.

    Returns:
        The resolved OmegaConf config, video-predictor overrides merged into ``model``.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = resolve_config(config)
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read model config ({exc})") from None
    if "model" not in cfg or "_target_" not in cfg.model:
        raise InputError(f"{path}: model config has no 'model' section with a _target_")
    if image_size is not None:
        image_size = int(image_size)
        if image_size < 32 or image_size % 32:
            raise InputError(
                f"model image size must be a multiple of 32 and >= 32, got {image_size}"
            )
        cfg.model.image_size = image_size
    cfg = OmegaConf.merge(cfg, {"model": VIDEO_PREDICTOR_OVERRIDES})
    OmegaConf.resolve(cfg)
    return cfg


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official-format checkpoint (``{"model": state_dict}``)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint file: official format, sam2-pal's, or a bare state dict.

    Args:
        path: the checkpoint file.

    Returns:
        (state dict, what sam2-pal recorded about its training); the record is empty
        for official checkpoints (see `sam2pal.models.adapters.CHECKPOINT_KEY`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds here; all mean "not a checkpoint"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        record = payload.get("sam2pal")
        return payload["model"], record if isinstance(record, dict) else {}
    if (
        isinstance(payload, dict)
        and payload
        and all(isinstance(v, torch.Tensor) for v in payload.values())
    ):
        return payload, {}  # a bare state dict
    raise InputError(f"{path}: not a SAM2 checkpoint (expected a dict with a 'model' state dict)")


def load_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike,
    config_label: str = "",
    config_sha256: str | None = None,
) -> None:
    """Load a checkpoint file into `model`, every weight of the right shape.

    A checkpoint sam2-pal fine-tuned (a full adapter's model.pt, merged.pt) is refused
    at another image size than it was trained at, or with another model config (when
    `config_sha256` is given).

    Args:
        model: the SAM2Base to load into.
        path: the checkpoint file.
        config_label: the model config's name, for error messages.
        config_sha256: the SHA-256 of the model config's yaml file, or None.

    Returns:
        None.
    """
    state, record = read_checkpoint(path)
    _check_fine_tuned(path, record, int(model.image_size), config_sha256)
    own = model.state_dict()
    reshaped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or reshaped:
        parts = []
        if reshaped:
            k = reshaped[0]
            parts.append(
                f"{len(reshaped)} weights of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                f"{tuple(own[k].shape)} in the model)"
            )
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        what = f" config {config_label}" if config_label else " model config"
        raise InputError(f"{path}: checkpoint does not fit the{what}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def _check_fine_tuned(path, record: dict, image_size: int, config_sha256: str | None) -> None:
    differs = []
    trained_size = record.get("image_size")
    if trained_size is not None and int(trained_size) != image_size:
        differs.append(f"at image size {trained_size} (this run: {image_size})")
    trained_config = record.get("model_config_sha256")
    if trained_config and config_sha256 and trained_config != config_sha256:
        name = record.get("model_config") or "a model config"
        differs.append(
            f"with {name}, sha256 {trained_config[:12]}... (this run's config: {config_sha256[:12]}...)"
        )
    if differs:
        raise InputError(
            f"{path}: checkpoint fine-tuned by sam2-pal {' and '.join(differs)}; "
            "use it with the image size and model config it was trained with"
        )


def set_object_present_bias(model, bias: float = 10.0) -> None:
    """Bias the object-score head towards "object present" (random weights only)."""
    head = model.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.bias.fill_(bias)


def build_model(
    config: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """Build a SAM2Base in eval mode on `device`.

    Args:
        config: the model config (see `resolve_config`).
        checkpoint: a file path, ``"random"`` (seeded random weights), or None (the
            same as ``"random"``, for library use). Official model names must be
            resolved to a file first (`download.resolve_checkpoint`).
        image_size: the model's input size, or None for the config's.
        device: as in `resolve_device`.
        seed: the seed of the random weights.

    Returns:
        The model.
    """
    from hydra.utils import instantiate

    cfg = load_model_config(config, image_size)
    torch.manual_seed(seed)
    model = instantiate(cfg.model, _recursive_=True)
    if checkpoint is None or str(checkpoint) == RANDOM_CHECKPOINT:
        if getattr(model, "pred_obj_scores", False):
            set_object_present_bias(model)
    else:
        if official_model(str(checkpoint)) and not Path(str(checkpoint)).is_file():
            raise InputError(
                f"checkpoint '{checkpoint}' is an official model name: resolve it to a file "
                "first (the workflow's download_model rule or `sam2pal download-model`)"
            )
        load_checkpoint(
            model,
            checkpoint,
            config_label=str(config),
            config_sha256=file_sha256(resolve_config(config)),
        )
    model = model.to(resolve_device(device))
    model.eval()
    return model


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device a device setting stands for.

    "Free" means not claimed by another sam2-pal job on this machine
    (`sam2pal.models.gpu`); asking for CUDA where none is visible is an error, at once.

    Args:
        spec: `auto` (a free CUDA GPU if one is visible, else CPU), `cpu`, `cuda` (a
            free visible GPU), `cuda:i` (that one), or a torch.device (kept as it is).

    Returns:
        The torch.device.
    """
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise InputError(f"device '{spec}' is not cpu, auto, cuda or cuda:N")
    if text == "cpu" or (text == "auto" and not cuda_device_count()):
        return torch.device("cpu")
    count = cuda_device_count()
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise InputError(
            f"device '{spec}' asked for, but no CUDA GPU is visible on this machine"
            + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
            + "; run this step on a GPU node, or set propagate.device to cpu or auto"
        )
    if ":" in text:
        index = int(text.split(":", 1)[1])
        if not 0 <= index < count:
            raise InputError(f"device '{spec}' asked for, but only {count} CUDA GPU(s) are visible")
        return torch.device(text)
    from sam2pal.models.gpu import claim_cuda_device

    return torch.device(f"cuda:{claim_cuda_device()}")


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
