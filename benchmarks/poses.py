"""Synthetic beetles in one pose, and the model, for the benchmarks of turned and
mirrored specimens (`rotation.py`, `orientation.py`).

The NEON label maps the beetles are drawn from lie every which way; `Style.heading`
turns each so that its head points the same way, so a collection is in its template's
pose and only the turn given to it differs (known truth).
"""

from __future__ import annotations

from pathlib import Path

from sam2pal.inference.pipeline import _run_model
from sam2pal.io.templates import TemplateSet, load_coco_templates
from sam2pal.models.registry import choose_config
from sam2pal.synth.specimens import make_collection

#: a training palette on paper, every beetle facing the way `rotation_range` says
STYLE = {
    "palettes": ("dark_brown",),
    "backgrounds": ("paper",),
    "flip_prob": 0.0,
    "heading": True,  # rotation_range is the head's direction: every beetle in one pose
    "scale_range": (0.6, 0.8),
    "clutter_prob": 0.0,
}


def heading_style(heading: float, **more) -> dict:
    """`STYLE` with the head pointing `heading` degrees (90 = up), and `more` settings."""
    return {**STYLE, "rotation_range": (heading, heading), **more}


def benchmark_model(args):
    """(model, provenance) of `--checkpoint`/`--config` on `--device` with `--threads`."""
    model, info, _ = _run_model(
        config=choose_config(args.config, args.checkpoint),
        checkpoint=args.checkpoint,
        image_size=None,
        seed=0,
        device=args.device,
        threads=args.threads,
        checkpoint_dir=None,
        adapter=None,
    )
    return model, info


def pose_template(folder: Path, name: str, heading: float, size=(480, 360)) -> TemplateSet:
    """A one-template set: the beetle of label map `name`, head pointing `heading`."""
    make_collection(
        folder,
        n_images=1,
        n_templates=1,
        seed=7,
        size=size,
        mask_names=[name],
        style=heading_style(heading),
    )
    return load_coco_templates(folder / "templates.json", folder / "images")
