"""Compare predictions with ground truth: IoU and Dice per image x structure.

Images are matched by file name and structures by category name (ids may differ
between the two files). For each ground-truth image and each category annotated in
the ground truth, the masks of all instances of that category are unioned on both
sides and compared. A structure the predictions lack scores 0; an image the
predictions lack (e.g. skipped as unreadable) scores 0 on every structure.

Only targets measure how well the collection was segmented. Each row has a `role`:

    target             an image x structure the run had to find: the honest score
    template           a structure annotated on this photo in the templates: the
                       photo was segmented with itself and that mask in memory
    keyframe           a structure annotated on this video frame: output as annotated
    finetune_template  a structure annotated on a fine-tuning template: the training
                       loss was taken on that mask
    finetune_holdout   a fine-tuning hold-out image whose ground truth picked the best
                       epoch (selection by the real IoU): chosen to score well on it

`metrics.csv` holds, for each role present (targets first), one row per image x
category (level `image`) followed by the mean per category (level `category_mean`,
with the number of images in `n_images`). Hold-out images of a training that picked
its epoch by the label-free cycle IoU stay targets: no true mask was used on them,
exactly as on the other unlabelled images the training saw.

Templates and keyframes come from the templates file the run used (`templates.json`)
and from the predictions themselves (annotations flagged `keyframe`); the fine-tuning
roles from the adapter's `sam2pal_adapter.json` (written by `sam2pal.training.palindrome.Trainer`).
Images are matched to those lists by file name: the same path inside the image
folder, else the same bare name where only one image on each side has it.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path, PurePosixPath

import numpy as np

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_write
from sam2pal.io.coco import category_masks, load_coco

METRIC_COLUMNS = [
    "level",
    "role",
    "file_name",
    "category",
    "iou",
    "dice",
    "gt_area_px",
    "pred_area_px",
    "n_images",
]
ROLES = ("target", "template", "keyframe", "finetune_template", "finetune_holdout")
ADAPTER_METADATA = (
    "sam2pal_adapter.json"  # sam2pal.models.adapters.METADATA_FILE (that module needs torch)
)


def annotated_structures(data: dict) -> dict[str, set[str]]:
    """{file_name: names of the categories annotated on it} of a checked COCO dict."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    found: dict[str, set[str]] = defaultdict(set)
    for ann in data["annotations"]:
        found[files[ann["image_id"]]].add(names[ann["category_id"]])
    return dict(found)


def _posix(name: str) -> str:
    return PurePosixPath(str(name).replace("\\", "/")).as_posix()


def match_names(gt_names, names) -> dict[str, str]:
    """{ground-truth file name: name in `names`} for the images named alike: the same
    path, else the same bare name where only one image on each side has it."""
    exact = {_posix(n): n for n in names}
    bare: dict[str, list[str]] = defaultdict(list)
    for n in names:
        bare[PurePosixPath(_posix(n)).name].append(n)
    gt_bare: dict[str, int] = defaultdict(int)
    for g in gt_names:
        gt_bare[PurePosixPath(_posix(g)).name] += 1
    matched = {}
    for g in gt_names:
        if _posix(g) in exact:
            matched[g] = exact[_posix(g)]
            continue
        base = PurePosixPath(_posix(g)).name
        if len(bare.get(base, [])) == 1 and gt_bare[base] == 1:
            matched[g] = bare[base][0]
    return matched


def read_finetune_record(path: str | os.PathLike) -> dict:
    """What a fine-tuning saw of the true masks, from the adapter's metadata.

    `path`: an adapter folder, the folder `finetune` wrote (with adapter/ in it), or the
    `sam2pal_adapter.json` file. Returns {"by": "ground_truth_iou" | "template_iou" |
    "cycle_iou" | None, "ground_truth_images": [names], "training_templates": {name:
    [structure names]}, "validation_templates": the held-out templates' names}.
    """
    path = Path(path)
    candidates = (
        [path] if path.is_file() else [path / ADAPTER_METADATA, path / "adapter" / ADAPTER_METADATA]
    )
    meta_path = next((p for p in candidates if p.is_file()), None)
    if meta_path is None:
        raise InputError(
            f"{path}: no fine-tuning record (an adapter folder with {ADAPTER_METADATA})"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: not an adapter record (expected a JSON object)")
    selection = meta.get("selection")
    validation = []
    if isinstance(selection, dict):
        by, images = selection.get("by"), selection.get("ground_truth_images") or []
        validation = selection.get("validation_templates")
        if validation is None:  # records of one held-out template at most
            one = selection.get("validation_template")
            validation = [one] if one else []
    else:  # adapters written before the record: the epoch log tells how it was chosen
        history = meta.get("history") or []
        holdout = (meta.get("pool") or {}).get("holdout") or []
        if any(row.get("val_iou") is not None for row in history):
            by, images = "ground_truth_iou", holdout
        else:
            by, images = ("cycle_iou" if holdout else None), []
    templates = meta.get("training_templates")
    if not isinstance(templates, dict):  # older record: names only, every structure
        templates = {name: None for name in meta.get("templates") or []}
    if (
        not isinstance(images, list)
        or by not in ("ground_truth_iou", "template_iou", "cycle_iou", None)
        or not isinstance(validation, list)
        or (by == "template_iou" and not validation)
    ):
        raise InputError(f"{meta_path}: unreadable 'selection' record")
    return {
        "by": by,
        "ground_truth_images": [str(n) for n in images],
        "training_templates": templates,
        "validation_templates": [str(name) for name in validation],
    }


def _roles(gt_masks: dict, pred_data: dict, templates, finetune_record) -> dict:
    """{(file_name, category): role} of the ground-truth rows that are not targets."""
    gt_names = sorted(gt_masks)
    roles: dict[tuple[str, str], str] = {}

    def mark(names_to_structures: dict, role: str):
        matched = match_names(gt_names, list(names_to_structures))
        for g, name in matched.items():
            structures = names_to_structures[name]
            for category in gt_masks[g]:
                if (structures is None or category in structures) and (g, category) not in roles:
                    roles[(g, category)] = role

    # a structure output as a keyframe's annotation (flagged in the predictions)
    pred_categories = {c.get("id"): c.get("name") for c in pred_data["categories"]}
    pred_files = {im.get("id"): im.get("file_name") for im in pred_data["images"]}
    is_video = any("frame_index" in im for im in pred_data["images"])
    for ann in pred_data["annotations"]:
        if ann.get("keyframe"):
            key = (pred_files.get(ann.get("image_id")), pred_categories.get(ann.get("category_id")))
            if key[0] in gt_masks and key[1] in gt_masks[key[0]]:
                roles[key] = "keyframe"
    if templates is not None:
        mark(
            annotated_structures(load_coco(templates, role="template file", sizes=False)),
            "keyframe" if is_video else "template",
        )
    if finetune_record is not None:
        record = read_finetune_record(finetune_record)
        mark(record["training_templates"], "finetune_template")
        if record["by"] == "ground_truth_iou":
            mark({name: None for name in record["ground_truth_images"]}, "finetune_holdout")
        if record["by"] == "template_iou":  # their true masks picked the epoch
            mark({name: None for name in record["validation_templates"]}, "finetune_holdout")
    return roles


def _score(truth: np.ndarray, pred: np.ndarray | None) -> tuple[float, float, int, int]:
    """(IoU, Dice, true area, predicted area) of a mask and its prediction (None: none)."""
    inter = int(np.logical_and(truth, pred).sum()) if pred is not None else 0
    pred_area = int(pred.sum()) if pred is not None else 0
    gt_area = int(truth.sum())
    union = gt_area + pred_area - inter
    iou = inter / union if union else 1.0
    dice = 2 * inter / (gt_area + pred_area) if (gt_area + pred_area) else 1.0
    return iou, dice, gt_area, pred_area


def _image_rows(gt: tuple, pred: tuple, roles: dict, paths: tuple) -> dict[str, list[dict]]:
    """{role: rows of level `image`}: each ground-truth image x category, scored.

    `gt`, `pred`: ({file_name: image}, {file_name: {category: mask}}) of each file;
    `paths`: (ground truth, predictions), named in errors."""
    (gt_images, gt_masks), (pred_images, pred_masks) = gt, pred
    rows: dict[str, list[dict]] = defaultdict(list)
    for file_name in sorted(gt_masks):
        gt_image, pred_image = gt_images[file_name], pred_images.get(file_name)
        gt_size = (gt_image["width"], gt_image["height"])
        if pred_image is not None and (pred_image["width"], pred_image["height"]) != gt_size:
            raise InputError(
                f"{paths[1]}: {file_name} is {pred_image['width']}x{pred_image['height']} but "
                f"{gt_size[0]}x{gt_size[1]} in {paths[0]}"
            )
        for category, truth in sorted(gt_masks[file_name].items()):
            iou, dice, gt_area, pred_area = _score(
                truth, pred_masks.get(file_name, {}).get(category)
            )
            role = roles.get((file_name, category), "target")
            rows[role].append(
                {
                    "level": "image",
                    "role": role,
                    "file_name": file_name,
                    "category": category,
                    "iou": iou,
                    "dice": dice,
                    "gt_area_px": gt_area,
                    "pred_area_px": pred_area,
                }
            )
    return rows


def _add_means(rows: dict[str, list[dict]]) -> dict[str, float]:
    """Append each role's rows of level `category_mean`; returns {category: mean IoU
    over the targets}."""
    means = {}
    for role in ROLES:
        per_category: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for row in rows[role]:
            per_category[row["category"]].append((row["iou"], row["dice"]))
        for category in sorted(per_category):
            values = np.array(per_category[category])
            if role == "target":
                means[category] = float(values[:, 0].mean())
            rows[role].append(
                {
                    "level": "category_mean",
                    "role": role,
                    "file_name": "",
                    "category": category,
                    "iou": float(values[:, 0].mean()),
                    "dice": float(values[:, 1].mean()),
                    "n_images": len(values),
                }
            )
    return means


def evaluate(
    gt_json: str | os.PathLike,
    pred_json: str | os.PathLike,
    out_csv: str | os.PathLike,
    templates: str | os.PathLike | None = None,
    finetune_record: str | os.PathLike | None = None,
    log=None,
) -> dict:
    """Write metrics.csv; returns {category: mean IoU over the targets}.

    Args:
        gt_json: the ground truth (COCO).
        pred_json: the predictions (COCO).
        out_csv: the metrics table (`METRIC_COLUMNS`), written atomically.
        templates: the templates file the predictions were made with (templates.json):
            structures annotated there are scored as `template` (`keyframe` in a video).
        finetune_record: the adapter the predictions were made with (see
            `read_finetune_record`): its training templates and, when the real IoU
            picked its epoch, its hold-out images with ground truth are scored apart.
        log: called with one line naming the rows left out of the target means.

    Returns:
        {category: mean IoU over the target rows}. Raises InputError (one line naming
        the file) on a bad file, or an image of another size in the predictions.
    """
    gt_path, pred_path = Path(gt_json), Path(pred_json)
    gt = category_masks(load_coco(gt_path), gt_path)
    pred_data = load_coco(pred_path)
    pred = category_masks(pred_data, pred_path)
    roles = _roles(gt[1], pred_data, templates, finetune_record)
    rows = _image_rows(gt, pred, roles, (gt_path, pred_path))
    means = _add_means(rows)
    with atomic_write(out_csv) as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for role in ROLES:
            for row in rows[role]:
                writer.writerow(
                    {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()}
                )
    apart = [
        f"{role} {len({r['file_name'] for r in rows[role] if r['level'] == 'image'})} image(s)"
        for role in ROLES[1:]
        if rows[role]
    ]
    if log is not None and apart:
        log("scored apart from the targets (own rows and means): " + ", ".join(apart))
    return means
