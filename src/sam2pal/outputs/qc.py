"""`qc.csv`: every image of a collection ranked for review, worst first.

An image's QC score is the mean score of its structures (`worst_structure` names the
lowest), where a structure scores its cycle IoU when cycle consistency was computed (a
label-free estimate of the real IoU), else SAM2's predicted IoU, times its stability
(SAM's stability score of the mask, where recorded), and 0 when it was predicted
absent; a structure a reviewer corrected (`sam2pal review import`) scores 1, present or
absent: a person has checked it. Images that could not be read come first, then images
by increasing QC score. Why the product and the mean (`benchmarks/qc_rank.py`, on the
held-out collections with sam2pal-micro): a photo's mean of cycle IoU x stability
followed its parts' true IoU on every collection, where its lowest cycle IoU ran against
it on most; the stability is what tells a good antenna from a bad one across photos.

Columns: rank, file_name, status (ok | missing | clamped | skipped), qc_score,
worst_structure, n_structures, n_found, missing, clamped, min_cycle_iou,
mean_cycle_iou, min_predicted_iou, min_object_score, min_stability, mean_stability,
rotation, mirrored, zoomed, zoom_placed, corrected, reason.

`rotation` and `mirrored` are the orientation found by propagate.orientation's search
(the photo shows the template turned `rotation` degrees clockwise, after a left-right
mirror when `mirrored` is true); both are empty when the orientation was not searched.
`zoomed` lists the structures whose mask (and scores) come from the zoom pass
(propagate.zoom), `zoom_placed` those of them whose window was placed from the template
because the whole-photo pass found nothing. `corrected` lists the structures whose mask
is a reviewer's correction (or that the reviewer removed).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable

from sam2pal.io.atomic import atomic_write
from sam2pal.io.records import ImageRecord, read_records

QC_COLUMNS = [
    "rank",
    "file_name",
    "status",
    "qc_score",
    "worst_structure",
    "n_structures",
    "n_found",
    "missing",
    "clamped",
    "min_cycle_iou",
    "mean_cycle_iou",
    "min_predicted_iou",
    "min_object_score",
    "min_stability",
    "mean_stability",
    "rotation",
    "mirrored",
    "zoomed",
    "zoom_placed",
    "corrected",
    "reason",
]


def structure_label(
    categories: dict[int, str], category_id: int, instance: int, multi: bool
) -> str:
    name = categories.get(category_id, str(category_id))
    return f"{name}_{instance}" if multi else name


def structure_score(
    cycle_iou: float | None, predicted_iou: float | None, stability: float | None
) -> float | None:
    """A predicted structure's QC score: its cycle IoU when computed, else SAM2's
    predicted IoU (clipped to 0..1), times its stability when recorded; None when it
    has neither IoU."""
    if cycle_iou is not None:
        score = float(cycle_iou)
    elif predicted_iou is not None:
        score = min(max(float(predicted_iou), 0.0), 1.0)
    else:
        return None
    return score * float(stability) if stability is not None else score


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def image_row(record: ImageRecord, categories: dict[int, str], multi_instance: set[int]) -> dict:
    """The qc.csv row of one image's record (without its rank).

    Args:
        record: the image's result.
        categories: {category id: name}.
        multi_instance: category ids whose structures are named with their instance.

    Returns:
        {column: value}.
    """
    if record.is_skipped:
        return {"file_name": record.file_name, "status": "skipped", "reason": record.skipped}
    scores, missing, clamped, zoomed, placed, corrected = [], [], [], [], [], []
    cycles, ious, objs, stabilities = [], [], [], []
    for s in record.structures:
        label = structure_label(
            categories, s.category_id, s.instance, s.category_id in multi_instance
        )
        present = s.area > 0
        if s.cycle_iou is not None:
            cycles.append(s.cycle_iou)
        ious.append(s.predicted_iou)
        objs.append(s.object_score)
        if s.stability is not None:
            stabilities.append(s.stability)
        if not present:
            missing.append(label)
        if s.clamped:
            clamped.append(label)
        if s.zoomed:
            zoomed.append(label)
        if s.zoom_placed:
            placed.append(label)
        quality = structure_score(s.cycle_iou, s.predicted_iou, s.stability)
        if s.corrected is not None:
            corrected.append(label)
            scores.append((1.0, label))
        else:
            scores.append((quality if present else 0.0, label))
    worst = min(scores) if scores else (float("nan"), "")
    mean = sum(score for score, _ in scores) / len(scores) if scores else float("nan")
    status = "missing" if missing else ("clamped" if clamped else "ok")
    orientation = record.orientation or {}
    rotation, mirrored = orientation.get("rotation"), orientation.get("mirrored")
    return {
        "file_name": record.file_name,
        "status": status,
        "qc_score": float(mean),
        "worst_structure": worst[1],
        "n_structures": len(scores),
        "n_found": len(scores) - len(missing),
        "missing": ";".join(missing),
        "clamped": ";".join(clamped),
        "min_cycle_iou": min(cycles) if cycles else None,
        "mean_cycle_iou": sum(cycles) / len(cycles) if cycles else None,
        "min_predicted_iou": min(ious) if ious else None,
        "min_object_score": min(objs) if objs else None,
        "min_stability": min(stabilities) if stabilities else None,
        "mean_stability": sum(stabilities) / len(stabilities) if stabilities else None,
        "rotation": None if rotation is None else int(rotation),
        "mirrored": None if mirrored is None else ("true" if mirrored else "false"),
        "zoomed": ";".join(zoomed),
        "zoom_placed": ";".join(placed),
        "corrected": ";".join(corrected),
        "reason": "",
    }


def write_qc(
    record_paths: Iterable[str | os.PathLike],
    categories: dict[int, str],
    out_csv: str | os.PathLike,
    multi_instance: Iterable[int] = (),
) -> int:
    """Write qc.csv from per-image result files; returns the number of rows.

    `multi_instance`: category ids with several instances per template, whose
    structures are named `{category}_{instance}`.
    """
    multi = set(multi_instance)
    rows = [image_row(r, categories, multi) for p in record_paths for r in read_records(p)]

    def order(row):
        skipped = row["status"] == "skipped"
        return (
            0 if skipped else 1,
            row.get("qc_score", 0.0) if not skipped else 0.0,
            row["file_name"],
        )

    rows.sort(key=order)
    with atomic_write(out_csv) as handle:
        writer = csv.DictWriter(handle, fieldnames=QC_COLUMNS)
        writer.writeheader()
        for rank, row in enumerate(rows, start=1):
            writer.writerow({k: _fmt(row.get(k)) for k in QC_COLUMNS} | {"rank": rank})
    return len(rows)
