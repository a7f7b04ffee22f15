"""Fine-tuned weights: LoRA adapters (peft) and full fine-tuned checkpoints.

An adapter folder, as `sam2pal finetune` and the workflow's `finetune` rule write it:

    adapter_config.json, adapter_model.safetensors   LoRA weights (peft save_pretrained)
      or model.pt                                    full fine-tuning: official format
    sam2pal_adapter.json                             what it was trained from and how

`sam2pal_adapter.json` records the base checkpoint's identity (`base_id`: the SHA-256
of the checkpoint file, or ``random:<config sha256>:<seed>`` for random weights), the
model config and its SHA-256, the image size, categories, training settings, seed and
metrics per epoch. An adapter of either kind is used only with what it was trained
with: the same base checkpoint, image size and model config (`check_adapter`); anything
else fails with a one-line message naming what differs. A LoRA adapter only makes sense
on the weights it was trained on; a fully fine-tuned model and a merged checkpoint
(`merged.pt`) replace those weights, but were tuned for one image size and config.

Full checkpoints we write (`model.pt` of a full adapter, `merged.pt`) are in the
official format, ``{"model": state_dict}``, plus a ``"sam2pal"`` entry (`CHECKPOINT_KEY`)
with the image size, config and base they were trained with; `sam2pal.models.build` refuses
to load them at another image size or with another config (SAM2's own loader ignores
the entry).

LoRA goes on the `nn.Linear` layers of the chosen components of SAM2
(`memory_attention`, `sam_mask_decoder`, `memory_encoder` by default; `image_encoder`,
`obj_ptr_proj` and `sam_prompt_encoder` may be added).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_dir, write_json

METADATA_FILE = "sam2pal_adapter.json"
LORA_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.pt"
CHECKPOINT_KEY = "sam2pal"  # what a full checkpoint we write records about its training
# the attributes of a model loaded with an adapter that leaves some structures to the
# untouched model: their names, and that model (`load_adapter`)
UNTOUCHED = "sam2pal_untouched_structures"
UNTOUCHED_MODEL = "sam2pal_untouched_model"
DEFAULT_LORA_COMPONENTS = ("memory_attention", "sam_mask_decoder", "memory_encoder")
LORA_COMPONENTS = DEFAULT_LORA_COMPONENTS + ("image_encoder", "obj_ptr_proj", "sam_prompt_encoder")


def base_id(checkpoint: str, checkpoint_sha256: str | None, config_sha256: str, seed: int) -> str:
    """The identity of the weights an adapter is trained on."""
    if checkpoint_sha256:
        return checkpoint_sha256
    return f"random:{config_sha256}:{seed}"


def lora_target_names(model: nn.Module, components=DEFAULT_LORA_COMPONENTS) -> list[str]:
    """Full names of the nn.Linear layers of the given top-level components."""
    unknown = set(components) - set(LORA_COMPONENTS)
    if unknown:
        raise InputError(
            f"unknown LoRA target(s) {', '.join(sorted(unknown))}; choose from {', '.join(LORA_COMPONENTS)}"
        )
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[0] in components
    ]
    if not names:
        raise InputError(f"no layers to adapt in {', '.join(components)}")
    return names


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    components=DEFAULT_LORA_COMPONENTS,
):
    """Wrap `model` with fresh LoRA layers (in place).

    The SAM2 model itself (with LoRA layers inside) stays reachable as
    `peft_model.base_model.model`; only the LoRA weights are trainable.

    Args:
        model: the SAM2Base.
        rank, alpha, dropout: LoRA's rank, scaling and dropout.
        components: the top-level components whose linear layers get LoRA.

    Returns:
        The peft model.
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise InputError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=lora_target_names(model, tuple(components)),
    )
    return get_peft_model(model, config)


def read_metadata(folder: str | os.PathLike) -> dict:
    """The `sam2pal_adapter.json` of an adapter folder, as a dict."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not folder.is_dir():
        raise InputError(f"{folder}: adapter folder not found")
    if not path.is_file():
        raise InputError(f"{folder}: not a sam2-pal adapter folder (no {METADATA_FILE})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def adapter_kind(folder: str | os.PathLike) -> str:
    """The kind of weights an adapter folder holds: "lora" or "full"."""
    folder = Path(folder)
    if (folder / LORA_WEIGHTS).is_file() and (folder / "adapter_config.json").is_file():
        return "lora"
    if (folder / FULL_WEIGHTS).is_file():
        return "full"
    raise InputError(f"{folder}: no adapter weights ({LORA_WEIGHTS} or {FULL_WEIGHTS})")


def adapter_sha256(folder: str | os.PathLike) -> str:
    """The SHA-256 of an adapter folder's weights file."""
    from sam2pal.models.build import file_sha256

    folder = Path(folder)
    return file_sha256(folder / (LORA_WEIGHTS if adapter_kind(folder) == "lora" else FULL_WEIGHTS))


def save_adapter(model, folder: str | os.PathLike, metadata: dict, kind: str) -> Path:
    """Write an adapter folder: the weights and `sam2pal_adapter.json`.

    The folder is filled under a temporary name and renamed into place.

    Args:
        model: a peft model (`kind` "lora") or a SAM2Base (`kind` "full").
        folder: the adapter folder.
        metadata: what to record (kind and the model's image size are added).
        kind: "lora" or "full".

    Returns:
        The folder's path.
    """
    folder = Path(folder)
    sam = model.base_model.model if kind == "lora" else model
    # the image size is the model's own, whatever the caller's metadata says
    metadata = dict(metadata, kind=kind, image_size=int(sam.image_size))
    with atomic_dir(folder) as tmp:
        if kind == "lora":
            model.save_pretrained(str(tmp))
        else:
            torch.save(
                {
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    CHECKPOINT_KEY: checkpoint_record(metadata),
                },
                tmp / FULL_WEIGHTS,
            )
        write_json(tmp / METADATA_FILE, metadata, indent=2)
    return folder


def checkpoint_record(metadata: dict) -> dict:
    """What a full checkpoint we write records about its training (`CHECKPOINT_KEY`)."""
    keys = (
        "image_size",
        "model_config",
        "model_config_sha256",
        "base_id",
        "base_checkpoint",
        "base_checkpoint_sha256",
        "kind",
        "epoch",
        "sam2pal_version",
    )
    return {key: metadata[key] for key in keys if metadata.get(key) is not None}


def check_adapter(
    folder, meta: dict, base: str, image_size: int, config_sha256: str | None = None
) -> None:
    """Refuse an adapter (`meta`: its `sam2pal_adapter.json`) trained on other base
    weights (`base`, see `base_id`), at another image size or with another model
    config (compared when both are known) than this run's, naming what differs."""
    trained = {
        "base": meta.get("base_id"),
        "size": meta.get("image_size"),
        "config": meta.get("model_config_sha256"),
    }
    run = {"base": base, "size": int(image_size), "config": config_sha256}
    differs = [key for key in ("base", "size") if trained[key] != run[key]]
    if trained["config"] and run["config"] and trained["config"] != run["config"]:
        differs.append("config")
    if not differs:
        return
    hint = []
    if "base" in differs:
        hint.append(f"checkpoint {meta.get('base_checkpoint') or _short(trained['base'])}")
    if "size" in differs and trained["size"]:
        hint.append(f"image size {trained['size']}")
    if "config" in differs:
        hint.append(
            f"model config {meta.get('model_config') or 'of sha256 ' + str(trained['config'])[:12] + '...'}"
        )
    raise InputError(
        f"{folder}: adapter was trained on {_describe(trained, differs)}; this run uses "
        f"{_describe(run, differs)}; use the adapter with the {', '.join(hint) or 'model'} it was trained with"
    )


def _describe(identity: dict, differs) -> str:
    parts = [
        _short(identity["base"]) if identity["base"] else "unknown weights (no base_id recorded)"
    ]
    size = identity["size"]
    parts.append(f"at image size {size}" if size else "at an unrecorded image size")
    if "config" in differs:
        parts.append(f"with model config sha256 {str(identity['config'])[:12]}...")
    return " ".join(parts)


def load_adapter(
    model,
    folder: str | os.PathLike,
    expected_base: str,
    merge: bool = True,
    config_sha256: str | None = None,
):
    """Apply the adapter of `folder` to `model`.

    Adapters of both kinds must have been trained on the same base weights, at the
    model's image size and, when `config_sha256` is given, with the same model config
    (`check_adapter`).

    Args:
        model: the SAM2Base with the base weights.
        folder: the adapter folder.
        expected_base: the base weights' identity (see `base_id`).
        merge: fold LoRA weights into the base weights (no extra cost at inference);
            without, the LoRA layers stay separate. When the adapter record leaves
            structures to the untouched model (`selection.untouched_structures`,
            written by the fine-tuning's per-structure choice), the returned model
            carries their names (`untouched_structures`) and a copy of the base
            weights sharing its image encoder (`untouched_model`), with which the
            engine segments them.
        config_sha256: the SHA-256 of the model config's yaml file, or None.

    Returns:
        The model with the adapter applied, in eval mode.
    """
    folder = Path(folder)
    meta = read_metadata(folder)
    kind = adapter_kind(folder)
    check_adapter(folder, meta, expected_base, int(model.image_size), config_sha256)
    untouched = (meta.get("selection") or {}).get("untouched_structures") or []
    if not isinstance(untouched, list) or not all(isinstance(n, str) for n in untouched):
        raise InputError(
            f"{folder / METADATA_FILE}: selection.untouched_structures must be a list of "
            f"structure names, not {untouched!r}"
        )
    untouched = sorted(untouched)
    base = _untouched_copy(model, folder, meta) if untouched else None
    if kind == "full":
        from sam2pal.models.build import load_checkpoint

        load_checkpoint(model, folder / FULL_WEIGHTS)
        sam = model
    else:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(folder))
        peft_model.eval()
        sam = peft_model.merge_and_unload() if merge else peft_model.base_model.model
    if base is not None:  # plain attributes: not parameters of the adapted model
        object.__setattr__(sam, UNTOUCHED, frozenset(untouched))
        object.__setattr__(sam, UNTOUCHED_MODEL, base)
    return sam.eval()


def _untouched_copy(model, folder: Path, meta: dict):
    """A copy of `model` (the base weights) for the structures the adapter leaves to the
    untouched model, sharing its image encoder, which the adapter must not have trained
    (the targets are encoded once, for both)."""
    import copy

    if "image_encoder" in ((meta.get("settings") or {}).get("targets") or []):
        raise InputError(
            f"{folder}: the adapter trained the image encoder and leaves structures to "
            "the untouched model (selection.untouched_structures): the two cannot share "
            "the image features"
        )
    encoder = model.image_encoder
    model.image_encoder = None
    try:
        base = copy.deepcopy(model)
    finally:
        model.image_encoder = encoder
    base.image_encoder = encoder
    return base.eval()


def untouched_structures(model) -> frozenset[str]:
    """The structure names a loaded adapter leaves to the untouched model (the record's
    `selection.untouched_structures`; see `load_adapter`), or none."""
    return getattr(model, UNTOUCHED, frozenset())


def untouched_model(model):
    """The untouched model (base weights, the image encoder shared) that segments the
    structures of `untouched_structures`, or None."""
    return getattr(model, UNTOUCHED_MODEL, None)


def _short(identity) -> str:
    text = str(identity)
    if text.startswith("random:"):
        return f"random weights (seed {text.rsplit(':', 1)[-1]})"
    return f"checkpoint sha256 {text[:12]}..."


def save_merged_checkpoint(
    peft_model, path: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Write a full checkpoint in the official format (`{"model": ...}`) with the LoRA
    weights folded in; loads with `sam2.build_sam.build_sam2`. Leaves `peft_model`
    as it was. It records the image size (and from `metadata`, the adapter's, the
    config and base) under `CHECKPOINT_KEY`: `sam2pal.models.build` uses it only at that
    image size and with that config.

    Args:
        peft_model: the LoRA-wrapped model.
        path: the checkpoint file.
        metadata: the adapter's metadata, or None.

    Returns:
        The checkpoint's path.
    """
    import copy

    from sam2pal.io.atomic import atomic_path

    merged = copy.deepcopy(peft_model).merge_and_unload()
    state = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
    record = checkpoint_record(
        dict(metadata or {}, kind="merged", image_size=int(merged.image_size))
    )
    with atomic_path(path) as tmp:
        torch.save({"model": state, CHECKPOINT_KEY: record}, tmp)
    return Path(path)
