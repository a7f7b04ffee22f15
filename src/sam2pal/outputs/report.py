"""Figures and tables of the HTML report (`snakemake --report report.html`).

* a gallery of overlays: the worst images by QC score and a seeded random sample,
  drawn from predictions.json streamed image by image (`visualize.image_groups`);
* the QC score distribution, and the head of the QC ranking as a table;
* the distributions of the measurements, per structure;
* the fine-tuning curves, where the collection was fine-tuned;
* the accuracy estimated from a review's corrections, where the collection has a
  review_summary.csv (`sam2pal.outputs.corrections`).

Every function reads the collection's files as streams, so the report of a 100,000-image
collection costs no more memory than the figures themselves.
"""

from __future__ import annotations

import csv
import math
import random
import shutil
from pathlib import Path

import numpy as np

from sam2pal.io.atomic import atomic_dir, atomic_path, atomic_write

# measures shown per structure: (column in millimetres, column in pixels, label)
PLOTTED = [
    ("area_mm2", "area_px", "area"),
    ("feret_max_mm", "feret_max_px", "max. Feret diameter"),
    ("curve_length_mm", "curve_length_px", "curve length"),
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_qc(qc_csv) -> list[dict]:
    """The rows of a qc.csv, in its order (worst first), as dicts of strings."""
    with open(qc_csv, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def gallery_selection(qc_rows: list[dict], size: int, seed: int = 0) -> list[tuple[str, int, str]]:
    """The images of the gallery.

    Args:
        qc_rows: the rows of qc.csv (`read_qc`), worst first.
        size: how many worst images, and how many random ones.
        seed: seed of the random pick.

    Returns:
        [(kind, k, file name)]: the `size` worst images by QC rank (unreadable images
        left out: nothing to draw), kind "worst", then `size` others picked at random
        with `seed`, kind "random"; k counts from 1 within each kind.
    """
    drawable = [r for r in qc_rows if r["status"] != "skipped"]
    worst = drawable[:size]
    rest = drawable[size:]
    sample = sorted(random.Random(seed).sample(range(len(rest)), min(size, len(rest))))
    picks = [("worst", k + 1, r["file_name"]) for k, r in enumerate(worst)]
    picks += [("random", k + 1, rest[i]["file_name"]) for k, i in enumerate(sample)]
    return picks


def write_gallery(
    pred_json, qc_csv, image_dir, out_dir, size: int = 12, seed: int = 0, max_side: int = 800
) -> int:
    """Overlays of the worst and of randomly picked images, named
    `worst_01_<image>.jpg` ... `random_01_<image>.jpg`.

    Args:
        pred_json: the collection's predictions.json (read as a stream).
        qc_csv: its qc.csv; image_dir: the folder of its images.
        out_dir: the gallery folder, replaced as a whole.
        size, seed: as in `gallery_selection`.
        max_side: the overlays' longer side, in pixels.

    Returns:
        The number of overlays written.
    """
    import cv2

    from sam2pal.io.images import unique_stems
    from sam2pal.outputs.visualize import image_groups, render_images

    picks = gallery_selection(read_qc(qc_csv), size, seed)
    wanted = {name for _, _, name in picks}
    categories, _, groups = image_groups(pred_json)
    groups = ((image, anns) for image, anns in groups if image["file_name"] in wanted)
    overlays = {
        info["file_name"]: drawn.image
        for info, drawn in render_images(categories, groups, image_dir, max_side)
    }
    stems = unique_stems([name for _, _, name in picks])
    count = 0
    with atomic_dir(out_dir) as tmp:
        for kind, k, name in picks:
            if name in overlays:
                cv2.imwrite(
                    str(tmp / f"{kind}_{k:02d}_{stems[name]}.jpg"),
                    cv2.cvtColor(overlays[name], cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 85],
                )
                count += 1
    return count


def write_qc_summary(qc_csv, out_png, out_csv, head: int = 200) -> None:
    """Histogram of QC scores (with the status counts) and the `head` worst rows.

    Args:
        qc_csv: the collection's qc.csv.
        out_png: the histogram to write.
        out_csv: the table of the `head` worst rows (qc.csv's columns).
        head: how many rows.

    Returns:
        None.
    """
    plt = _plt()
    rows = read_qc(qc_csv)
    scores = [float(r["qc_score"]) for r in rows if r["qc_score"]]
    status: dict[str, int] = {}
    for r in rows:
        status[r["status"]] = status.get(r["status"], 0) + 1
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(scores, bins=40, range=(0, 1), color="#4477aa")
    ax.set_xlabel("QC score (mean structure score of an image)")
    ax.set_ylabel("images")
    ax.set_title(", ".join(f"{k}: {v}" for k, v in sorted(status.items())) or "no images")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(out_csv, "w", newline="") as handle:
        fields = list(rows[0]) if rows else ["rank", "file_name"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows[:head])


def measurement_columns(header: list[str]) -> list[tuple[str, str]]:
    """[(column, axis label)] of the plotted measures, in mm where the table has them."""
    chosen = []
    for mm, px, label in PLOTTED:
        if mm in header:
            chosen.append((mm, f"{label} (mm{'²' if mm == 'area_mm2' else ''})"))
        elif px in header:
            chosen.append((px, f"{label} (px{'²' if px == 'area_px' else ''})"))
    return chosen


def write_measurement_plot(measurements_csv, out_png) -> dict[str, int]:
    """One row of histograms per structure (area, max. Feret diameter, curve length).

    Args:
        measurements_csv: the long measurement table (millimetres used where present).
        out_png: the figure to write.

    Returns:
        {structure: number of values}.
    """
    plt = _plt()
    with open(measurements_csv, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        columns = measurement_columns(header)
        at = {name: header.index(name) for name, _ in columns}
        category = header.index("category") if "category" in header else None
        values: dict[str, list[list[float]]] = {}
        for row in reader:
            per = values.setdefault(
                row[category] if category is not None else "all", [[] for _ in columns]
            )
            for j, (name, _) in enumerate(columns):
                cell = row[at[name]]
                if cell:
                    value = float(cell)
                    if math.isfinite(value):
                        per[j].append(value)
    structures = list(values) or ["(no structures found)"]
    fig, axes = plt.subplots(
        len(structures),
        max(len(columns), 1),
        squeeze=False,
        figsize=(3.3 * max(len(columns), 1), 2.2 * len(structures)),
    )
    for i, structure in enumerate(structures):
        for j, (_, label) in enumerate(columns or [("", "")]):
            ax = axes[i][j]
            data = values.get(structure, [[]] * max(len(columns), 1))[j]
            if data:
                ax.hist(np.asarray(data), bins=30, color="#228833")
                ax.axvline(float(np.median(data)), color="black", lw=1)
            ax.set_title(f"{structure}: {label}" if label else structure, fontsize=9)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return {s: len(v[0]) if v else 0 for s, v in values.items()}


def copy_training_record(finetune_dir, out_png, out_csv) -> None:
    """Copy the fine-tuning curves and log of a collection, for the report.

    Args:
        finetune_dir: the fine-tuning folder (training_curves.png, training_log.csv).
        out_png, out_csv: where the copies go.

    Returns:
        None.
    """
    finetune_dir = Path(finetune_dir)
    for name, out in (("training_curves.png", out_png), ("training_log.csv", out_csv)):
        with atomic_path(out) as tmp:
            shutil.copyfile(finetune_dir / name, tmp)


# the quantities of review_summary.csv drawn by `write_review_plot`: (quantity, label)
REVIEW_PANELS = [
    ("iou", "IoU of the prediction"),
    ("area_px_rel_error", "relative error: area"),
    ("curve_length_px_rel_error", "relative error: curve length"),
]


def write_review_plot(review_summary_csv, out_png) -> list[str]:
    """The accuracy estimated from a review: per structure, the mean IoU and the mean
    relative errors of the area and curve length (`REVIEW_PANELS`), with their 95%
    intervals; filled for the random sample, open for the worst images (biased).

    Args:
        review_summary_csv: the collection's review_summary.csv.
        out_png: the figure to write.

    Returns:
        The structures shown.
    """
    plt = _plt()
    with open(review_summary_csv, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    structures = list(dict.fromkeys(r["structure"] for r in rows)) or ["(nothing reviewed)"]
    fig, axes = plt.subplots(
        1,
        len(REVIEW_PANELS),
        squeeze=False,
        figsize=(3.6 * len(REVIEW_PANELS), 0.45 * len(structures) + 1.6),
    )
    styles = {
        "random": {"color": "#4477aa", "markerfacecolor": "#4477aa", "label": "random sample"},
        "worst": {"color": "#cc6677", "markerfacecolor": "white", "label": "worst (biased)"},
    }
    found = {(r["sample"], r["structure"], r["quantity"]): r for r in rows}
    for ax, (quantity, label) in zip(axes[0], REVIEW_PANELS, strict=True):
        for offset, (sample, style) in zip((-0.15, 0.15), styles.items(), strict=True):
            shown = [(y, found.get((sample, s, quantity))) for y, s in enumerate(structures)]
            shown = [(y, row) for y, row in shown if row is not None]
            for y, row in shown:
                if row["ci_low"] and row["ci_high"]:
                    bounds = [float(row["ci_low"]), float(row["ci_high"])]
                    ax.plot(bounds, [y + offset] * 2, color=style["color"], lw=1.5)
            ax.plot(
                [float(row["mean"]) for _, row in shown],
                [y + offset for y, _ in shown],
                "o",
                linestyle="none",
                color=style["color"],
                markerfacecolor=style["markerfacecolor"],
                label=style["label"],
            )
        ax.set_yticks(range(len(structures)), structures, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return structures if rows else []
