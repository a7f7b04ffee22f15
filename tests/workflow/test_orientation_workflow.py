"""The orientation search in the workflow (`propagate.orientation: rot4_mirror`): demo
photos turned and mirrored, segmented from the upright templates with sam2pal-micro.
Each photo's orientation is recorded in predictions.json and qc.csv, the masks come
back on the photo's own pixel grid (metrics.csv against the ground truth turned
alike), and the settings are recorded and rerun the segmentation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from test_evaluate import check_metrics_file
from test_workflow import DEMO, planned_jobs, snakemake

from sam2pal.io.masks import decode_segmentation, encode_rle, mask_bbox

# file name -> (demo photo, rotation, mirrored): the photo shows the demo photo turned
# `rotation` degrees clockwise, after a left-right mirror when `mirrored`
TARGETS = {
    "upright.png": ("specimen_002.jpg", 0, False),
    "turned_090.png": ("specimen_003.jpg", 90, False),
    "turned_180.png": ("specimen_004.jpg", 180, False),
    "mirrored_turned_270.png": ("specimen_005.jpg", 270, True),
    "mirrored.png": ("specimen_006.jpg", 0, True),
}
CANDIDATES = {(r, m) for r in (0, 90, 180, 270) for m in (False, True)}


def turned(array: np.ndarray, rotation: int, mirrored: bool) -> np.ndarray:
    """An image or mask (H, W, ...) mirrored left-right when `mirrored`, then turned
    `rotation` degrees clockwise."""
    if mirrored:
        array = array[:, ::-1]
    return np.ascontiguousarray(np.rot90(array, k=-(rotation // 90)))


def write_collection(folder):
    """The turned photos (PNG: their pixels exactly) and their ground truth, turned
    alike; returns the ground-truth file."""
    photos = folder / "photos"
    photos.mkdir()
    gt = json.loads((DEMO / "ground_truth.json").read_text())
    by_name = {image["file_name"]: image for image in gt["images"]}
    images, annotations = [], []
    for image_id, (name, (source, rotation, mirrored)) in enumerate(TARGETS.items(), start=1):
        rgb = np.array(Image.open(DEMO / "images" / source).convert("RGB"))
        Image.fromarray(turned(rgb, rotation, mirrored)).save(photos / name)
        image = by_name[source]
        height, width = turned(rgb, rotation, mirrored).shape[:2]
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for ann in gt["annotations"]:
            if ann["image_id"] != image["id"]:
                continue
            mask = decode_segmentation(ann["segmentation"], image["height"], image["width"])
            mask = turned(mask, rotation, mirrored)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ann["category_id"],
                    "segmentation": encode_rle(mask),
                    "area": int(mask.sum()),
                    "bbox": mask_bbox(mask),
                    "iscrowd": 0,
                }
            )
    truth = folder / "ground_truth.json"
    truth.write_text(
        json.dumps(dict(gt, images=images, annotations=annotations), separators=(",", ":"))
    )
    return truth


# eight tracking passes per photo: about a minute and a half on two CPU cores
@pytest.mark.slow
def test_turned_and_mirrored_photos_in_the_workflow(tmp_path):
    truth = write_collection(tmp_path)
    config = {
        "collections": {
            "turned": {
                "images": str(tmp_path / "photos"),
                "templates": str(DEMO / "templates.json"),
                "template_images": str(DEMO / "images"),
                "ground_truth": str(truth),
            }
        },
        "model": {"checkpoint": "sam2pal-micro"},
        "propagate": {"device": "cpu", "orientation": "rot4_mirror"},
        "outputs": {"save_overlays": False, "report": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(tmp_path, "--configfile", "config.yaml")
    out = tmp_path / "results" / "turned"

    # predictions.json: each photo's orientation, chosen among the eight candidates
    coco = json.loads((out / "predictions.json").read_text())
    found = {image["file_name"]: image for image in coco["images"]}
    assert sorted(found) == sorted(TARGETS)
    for name, (_, rotation, _) in TARGETS.items():
        image, chosen = found[name], found[name]["orientation"]
        candidates = chosen["candidates"]
        assert {(c["rotation"], c["mirrored"]) for c in candidates} == CANDIDATES, name
        best = max(candidates, key=lambda c: c["score"])
        assert (best["rotation"], best["mirrored"]) == (chosen["rotation"], chosen["mirrored"])
        # the demo beetles are seen from above, near mirror-symmetric: a mirrored photo
        # may match the template with or without a mirror, but only at its true turn
        assert chosen["rotation"] == rotation, (name, chosen)
        size = Image.open(tmp_path / "photos" / name).size
        assert (image["width"], image["height"]) == size

    # qc.csv: the same orientation per photo
    qc = {row["file_name"]: row for row in csv.DictReader(open(out / "qc.csv"))}
    for name, image in found.items():
        chosen = image["orientation"]
        assert qc[name]["rotation"] == str(chosen["rotation"]), name
        assert qc[name]["mirrored"] == ("true" if chosen["mirrored"] else "false"), name

    # the masks are on each photo's own pixel grid: compared with the turned ground truth
    rows = check_metrics_file(out / "metrics.csv", truth, out / "predictions.json", {})
    elytra = {
        r["file_name"]: float(r["iou"])
        for r in rows
        if r["level"] == "image" and r["category"] == "elytra"
    }
    assert len(elytra) == len(TARGETS) and min(elytra.values()) > 0.3, elytra

    # the search is recorded with the run, and turning it off re-segments
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["config"]["propagate"]["orientation"] == "rot4_mirror"
    assert provenance["settings"]["orientation"] == "rot4_mirror"
    config["propagate"]["orientation"] = "none"
    (tmp_path / "upright.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    plan = planned_jobs(snakemake(tmp_path, "--configfile", "upright.yaml", "-n").stdout)
    assert "propagate" in plan
