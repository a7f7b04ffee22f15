"""Compare predictions with ground truth: IoU and Dice per image x structure.

Images are matched by file name and structures by category name (ids may differ
between the two files). For each ground-truth image and each category annotated in
the ground truth, the masks of all instances of that category are unioned on both
sides and compared. A structure the predictions lack scores 0; an image the
predictions lack (e.g. skipped as unreadable) scores 0 on every structure.

`metrics.csv` holds one row per image x category (level `image`) followed by the mean
per category (level `category_mean`, with the number of images in `n_images`).
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import InputError
from .masks import decode_segmentation

METRIC_COLUMNS = ["level", "file_name", "category", "iou", "dice", "gt_area_px", "pred_area_px", "n_images"]


def load_coco(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: COCO file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise InputError(f"{path}: not a COCO file (no '{key}' list)")
    return data


def category_masks(data: dict, path: Path) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """{file_name: image} and {file_name: {category name: union mask}}."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = {im["id"]: im for im in data["images"]}
    by_file = {im["file_name"]: im for im in data["images"]}
    masks: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for ann in data["annotations"]:
        image = images.get(ann.get("image_id"))
        if image is None:
            raise InputError(f"{path}: annotation {ann.get('id')} refers to unknown image id {ann.get('image_id')}")
        category = names.get(ann.get("category_id"))
        if category is None:
            raise InputError(f"{path}: annotation {ann.get('id')} has unknown category id {ann.get('category_id')}")
        try:
            mask = decode_segmentation(ann["segmentation"], image["height"], image["width"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: annotation {ann.get('id')}: bad segmentation ({exc})") from None
        current = masks[image["file_name"]].get(category)
        masks[image["file_name"]][category] = mask if current is None else (current | mask)
    return by_file, masks


def evaluate(gt_json: str | os.PathLike, pred_json: str | os.PathLike, out_csv: str | os.PathLike) -> dict:
    """Write metrics.csv; returns {category: mean IoU}."""
    gt_path, pred_path = Path(gt_json), Path(pred_json)
    gt_images, gt_masks = category_masks(load_coco(gt_path), gt_path)
    pred_images, pred_masks = category_masks(load_coco(pred_path), pred_path)

    rows = []
    per_category: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for file_name in sorted(gt_masks):
        gt_image = gt_images[file_name]
        pred_image = pred_images.get(file_name)
        if pred_image is not None and (pred_image["width"], pred_image["height"]) != (gt_image["width"], gt_image["height"]):
            raise InputError(
                f"{pred_path}: {file_name} is {pred_image['width']}x{pred_image['height']} but "
                f"{gt_image['width']}x{gt_image['height']} in {gt_path}"
            )
        for category, truth in sorted(gt_masks[file_name].items()):
            pred = pred_masks.get(file_name, {}).get(category)
            inter = int(np.logical_and(truth, pred).sum()) if pred is not None else 0
            pred_area = int(pred.sum()) if pred is not None else 0
            gt_area = int(truth.sum())
            union = gt_area + pred_area - inter
            iou = inter / union if union else 1.0
            dice = 2 * inter / (gt_area + pred_area) if (gt_area + pred_area) else 1.0
            per_category[category].append((iou, dice))
            rows.append({"level": "image", "file_name": file_name, "category": category,
                         "iou": iou, "dice": dice, "gt_area_px": gt_area, "pred_area_px": pred_area})
    means = {}
    for category in sorted(per_category):
        values = np.array(per_category[category])
        means[category] = float(values[:, 0].mean())
        rows.append({"level": "category_mean", "file_name": "", "category": category,
                     "iou": float(values[:, 0].mean()), "dice": float(values[:, 1].mean()),
                     "n_images": len(values)})
    with atomic_write(out_csv) as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return means
