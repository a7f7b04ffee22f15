"""Segmentation quality on held-out synthetic collections (`benchmarks/quality.py`).

A held-out collection is drawn from generator settings that training never saw:
palettes (metallic blue, bronze) and a substrate (slate) kept out of v1's training,
poses outside its mix (aligned head-up series, small specimens), pinned colours of
pale specimens on a dark ground, and only the NEON beetle masks held out of training
(`pretrain.split_masks`) or procedural insects (with eyes and scapes) drawn from
seeds no training episode uses.

For each collection the first `n_templates` images are the annotated templates and
the rest are the targets; every method is scored on the same targets:

* zero-shot: SAM2 memory from the first template only;
* several templates: all `n_templates` in memory;
* palindrome: LoRA palindrome fine-tuning on the collection's unlabelled images
  (template 1 only, no labels; the best epoch chosen by cycle IoU on held-out
  images), then as zero-shot.

Scores are per-structure IoU against the exact masks, and "body", the union of head,
pronotum and elytra. `rank_correlation` measures how well the label-free cycle IoU
ranks predictions by their true IoU (Spearman).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sam2pal.io.coco import category_masks, load_coco
from sam2pal.io.masks import mask_iou
from sam2pal.settings import Segmentation
from sam2pal.synth.specimens import ALL_PARTS, make_collection

BODY_PARTS = ("head", "pronotum", "elytra")
STRUCTURES = ("body", *ALL_PARTS.values())


@dataclass(frozen=True)
class HeldOut:
    name: str
    style: dict
    seed: int
    description: str
    shapes: str = "neon"  # "neon": the held-out NEON masks; "procedural": v2 procedural insects


HELD_OUT = (
    HeldOut(
        "blue_slate",
        {"palettes": ("metallic_blue",), "backgrounds": ("slate",)},
        101,
        "metallic blue beetles on dark slate, any pose",
    ),
    HeldOut(
        "bronze_aligned",
        {
            "palettes": ("bronze",),
            "backgrounds": ("card",),
            "rotation_range": (75.0, 105.0),
            "flip_prob": 0.0,
            "scale_range": (0.6, 0.85),
        },
        102,
        "bronze beetles on card, an aligned head-up series",
    ),
    HeldOut(
        "small_mixed",
        {
            "palettes": ("metallic_blue", "bronze"),
            "backgrounds": ("foam", "slate"),
            "scale_range": (0.22, 0.32),
            "clutter_prob": 0.9,
        },
        103,
        "small blue or bronze specimens with much clutter",
    ),
    HeldOut(
        "pale_on_dark",
        {
            "part_colors": (
                (214, 196, 150),
                (222, 204, 158),
                (236, 220, 176),
                (196, 176, 134),
                (200, 182, 140),
            ),
            "backgrounds": ("foam",),
            "background_color": (26, 44, 58),
        },
        104,
        "pale straw-coloured beetles on dark blue-grey foam, any pose",
    ),
    HeldOut(
        "procedural_eyes",
        {
            "part_colors": (
                (92, 40, 24),
                (110, 48, 28),
                (214, 128, 40),
                (60, 36, 24),
                (70, 42, 28),
            ),
            "backgrounds": ("card",),
            "background_color": (176, 196, 214),
        },
        105,
        "procedural insects with compound eyes and scapes, orange and brown on pale blue card",
        shapes="procedural",
    ),
)


def held_out_masks() -> list[str]:
    from sam2pal.training.pretrain import split_masks

    return [name for name, _ in split_masks()[1]]


def held_out_procedural(seed: int, n: int) -> list[tuple[str, np.ndarray]]:
    """`n` v2 procedural insects from a seed stream that no training episode draws from
    (`pretrain.draw_episode` seeds from (seed, 7 or 8, index))."""
    from sam2pal.synth.procedural import procedural_insect

    return [
        (
            f"procedural-{seed}-{i}",
            procedural_insect(
                np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(99, i))), plan="v2"
            ),
        )
        for i in range(n)
    ]


#: the held-out photos' (width, height) unless asked otherwise
SIZE = (480, 360)


def make_held_out(
    out_dir, spec: HeldOut, n_images: int, n_templates: int, size: tuple[int, int] = SIZE
) -> dict:
    """Write one held-out collection (images, templates.json, ground_truth.json) of
    photos `size` (width, height) pixels."""
    if spec.shapes == "procedural":
        return make_collection(
            out_dir,
            n_images=n_images,
            n_templates=n_templates,
            seed=spec.seed,
            size=tuple(size),
            style=spec.style,
            shapes=held_out_procedural(spec.seed, n_images),
        )
    return make_collection(
        out_dir,
        n_images=n_images,
        n_templates=n_templates,
        seed=spec.seed,
        size=tuple(size),
        style=spec.style,
        mask_names=held_out_masks(),
    )


def _with_body(masks: dict[str, np.ndarray], shape) -> dict[str, np.ndarray]:
    body = np.zeros(shape, bool)
    for part in BODY_PARTS:
        if part in masks:
            body |= masks[part]
    return {**masks, "body": body}


@dataclass
class Scores:
    """Per-prediction rows: image, structure, iou, cycle_iou (None when not computed),
    predicted_iou, object_score, stability, area_ratio (predicted over true area) and on_truth (share of the prediction on the
    true structure)."""

    rows: list[dict] = field(default_factory=list)
    # per structure, the candidate mask `mask_choice: templates` gave it (-1: SAM2's pick)
    slots: dict[str, int] = field(default_factory=dict)

    def mean_iou(self, structure: str | None = None) -> float:
        values = [r["iou"] for r in self.rows if structure is None or r["structure"] == structure]
        return float(np.mean(values)) if values else float("nan")

    def mean_parts(self) -> float:
        """Mean IoU over the parts (body left out: it would count them twice)."""
        return float(np.mean([r["iou"] for r in self.rows if r["structure"] != "body"]))

    def table(self) -> dict[str, float]:
        return {s: round(self.mean_iou(s), 3) for s in STRUCTURES} | {
            "mean": round(self.mean_parts(), 3)
        }

    def shape_table(self) -> dict[str, dict[str, float]]:
        """Per structure, how the predicted masks miss: the median of their area over the
        true area (above 1: swollen) and the mean share of their pixels on the true
        structure (low: the mask lies elsewhere)."""
        table = {}
        for s in STRUCTURES:
            rows = [r for r in self.rows if r["structure"] == s and "area_ratio" in r]
            if rows:
                table[s] = {
                    "area_ratio": round(float(np.median([r["area_ratio"] for r in rows])), 2),
                    "on_truth": round(float(np.mean([r["on_truth"] for r in rows])), 3),
                }
        return table


def score_collection(
    model,
    coll_dir,
    n_templates: int,
    targets_from: int,
    cycle: bool = False,
    framing: str = "stretch",
    tone="auto",
    zoom: str = "off",
    mask_choice: str = Segmentation.mask_choice,
    absent: str = Segmentation.absent,
) -> Scores:
    """Segment the targets (images from index `targets_from` on) of a collection made by
    `make_held_out` from its first `n_templates` templates (photos framed into the model's
    input by `framing`, toned by `tone`: a mode or a resolved `tone.Tone`, small
    structures zoomed by `zoom`: `zoom_pass.ZOOMS`, the mask of each structure chosen by
    `mask_choice` and `absent` as the engine's), each photo read as the workflow
    reads it (`Propagator.read_target`); IoU against the truth."""
    from sam2pal.inference.engine import Propagator
    from sam2pal.io.templates import load_coco_templates

    coll_dir = Path(coll_dir)
    templates = load_coco_templates(coll_dir / "templates.json", coll_dir / "images")
    templates = templates.select(max_templates=n_templates)
    gt_path = coll_dir / "ground_truth.json"
    _, truth = category_masks(load_coco(gt_path), gt_path)
    engine = Propagator(
        model,
        templates,
        cycle_consistency=cycle or zoom == "best",  # `best` chooses by the cycle IoU
        framing=framing,
        tone=tone,
        zoom=zoom,
        mask_choice=mask_choice,
        absent=absent,
    )
    names = {cid: name for cid, name in templates.categories.items()}
    scores = Scores()
    for group in engine.groups:
        if group.slots is not None:
            for key, slot in zip(group.objects, group.slots.tolist()):
                scores.slots[names[key[0]]] = int(slot)
    files = sorted(truth)[targets_from:]
    for file_name in files:
        image, size = engine.read_target(coll_dir / "images" / file_name)
        preds = engine.predict(image, size=size)
        masks = {names[p.category_id]: p.mask for p in preds}
        found = {names[p.category_id]: p for p in preds}
        pred = _with_body(masks, size)
        gt = _with_body(truth[file_name], size)
        for structure in STRUCTURES:
            if structure not in gt or not gt[structure].any() or structure not in pred:
                continue
            mask, true = pred[structure].astype(bool), gt[structure].astype(bool)
            area = int(mask.sum())
            scores.rows.append(
                {
                    "image": file_name,
                    "structure": structure,
                    "iou": float(mask_iou(mask, true)),
                    "cycle_iou": getattr(found.get(structure), "cycle_iou", None),
                    "predicted_iou": getattr(found.get(structure), "predicted_iou", None),
                    "object_score": getattr(found.get(structure), "object_score", None),
                    "stability": getattr(found.get(structure), "stability", None),
                    "area_ratio": area / int(true.sum()),
                    "on_truth": float((mask & true).sum() / area) if area else 0.0,
                }
            )
    return scores


def rank_correlation(scores: Scores) -> float:
    """Spearman correlation of cycle IoU with the true IoU over a collection's part
    predictions (ties get their mean rank)."""
    rows = [r for r in scores.rows if r["structure"] != "body" and r["cycle_iou"] is not None]
    return spearman([r["cycle_iou"] for r in rows], [r["iou"] for r in rows])


def spearman(a, b) -> float:
    """Spearman rank correlation of two sequences (ties get their mean rank); nan with
    fewer than 3 pairs or a constant sequence."""
    if len(a) < 3:
        return float("nan")
    a, b = _ranks(np.array(a, float)), _ranks(np.array(b, float))
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values), float)
    ranks[order] = np.arange(len(values), dtype=float)
    for v in np.unique(values):  # mean rank of ties
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    return ranks
