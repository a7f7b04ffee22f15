"""Fine-tuned weights: LoRA adapters (peft) and full fine-tuned checkpoints.

An adapter folder, as `sam2pal finetune` and the workflow's `finetune` rule write it:

    adapter_config.json, adapter_model.safetensors   LoRA weights (peft save_pretrained)
      or model.pt                                    full fine-tuning: official format
    sam2pal_adapter.json                             what it was trained from and how

`sam2pal_adapter.json` records the base checkpoint's identity (`base_id`: the SHA-256
of the checkpoint file, or ``random:<config sha256>:<seed>`` for random weights), the
model config, image size, categories, training settings, seed and metrics per epoch.
Loading an adapter onto another base checkpoint fails with a clear message: LoRA
weights only make sense on the weights they were trained on.

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

from .atomic import atomic_dir, write_json
from .errors import InputError

METADATA_FILE = "sam2pal_adapter.json"
LORA_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.pt"
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
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[0] in components
    ]
    if not names:
        raise InputError(f"no layers to adapt in {', '.join(components)}")
    return names


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             components=DEFAULT_LORA_COMPONENTS):
    """Wrap `model` with fresh LoRA layers (in place); returns the peft model.

    The SAM2 model itself (with LoRA layers inside) stays reachable as
    `peft_model.base_model.model`; only the LoRA weights are trainable.
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise InputError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                        target_modules=lora_target_names(model, tuple(components)))
    return get_peft_model(model, config)


def read_metadata(folder: str | os.PathLike) -> dict:
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
    folder = Path(folder)
    if (folder / LORA_WEIGHTS).is_file() and (folder / "adapter_config.json").is_file():
        return "lora"
    if (folder / FULL_WEIGHTS).is_file():
        return "full"
    raise InputError(f"{folder}: no adapter weights ({LORA_WEIGHTS} or {FULL_WEIGHTS})")


def adapter_sha256(folder: str | os.PathLike) -> str:
    from .model import file_sha256

    folder = Path(folder)
    return file_sha256(folder / (LORA_WEIGHTS if adapter_kind(folder) == "lora" else FULL_WEIGHTS))


def save_adapter(model, folder: str | os.PathLike, metadata: dict, kind: str) -> Path:
    """Write the weights (`kind` lora: a peft model; full: a SAM2Base) and metadata.

    The folder is filled under a temporary name and renamed into place.
    """
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        if kind == "lora":
            model.save_pretrained(str(tmp))
        else:
            torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, tmp / FULL_WEIGHTS)
        write_json(tmp / METADATA_FILE, metadata, indent=2)
    return folder


def load_adapter(model, folder: str | os.PathLike, expected_base: str, merge: bool = True):
    """`model` (a SAM2Base) with the adapter of `folder` applied, in eval mode.

    LoRA adapters must have been trained on the same base weights (`expected_base`,
    see `base_id`). With `merge`, LoRA weights are folded into the base weights (no
    extra cost at inference); without, the LoRA layers stay separate.
    """
    folder = Path(folder)
    meta = read_metadata(folder)
    kind = adapter_kind(folder)
    if kind == "full":
        from .model import load_checkpoint

        load_checkpoint(model, folder / FULL_WEIGHTS)
        return model.eval()
    trained_on = meta.get("base_id")
    if trained_on != expected_base:
        raise InputError(
            f"{folder}: adapter was trained on other base weights ({_short(trained_on)}) than the "
            f"checkpoint given ({_short(expected_base)}); use the checkpoint it was trained on "
            f"({meta.get('base_checkpoint', 'see ' + METADATA_FILE)})"
        )
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(folder))
    peft_model.eval()
    sam = peft_model.merge_and_unload() if merge else peft_model.base_model.model
    return sam.eval()


def _short(identity) -> str:
    text = str(identity)
    if text.startswith("random:"):
        return "random weights"
    return f"sha256 {text[:12]}..."


def save_merged_checkpoint(peft_model, path: str | os.PathLike) -> Path:
    """A full checkpoint in the official format (`{"model": ...}`) with the LoRA
    weights folded in; loads with `sam2.build_sam.build_sam2`. Leaves `peft_model`
    as it was."""
    import copy

    from .atomic import atomic_path

    merged = copy.deepcopy(peft_model).merge_and_unload()
    state = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state}, tmp)
    return Path(path)
