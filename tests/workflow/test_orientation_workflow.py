"""The orientation search in the workflow (`propagate.orientation: rot4_mirror`):
synthetic beetles in their template's pose (leaning 20 degrees, so that a mirror image
is no turn of it), turned and mirrored, segmented with sam2pal-micro. Each photo's
orientation is recorded in predictions.json and qc.csv, the masks come back on the
photo's own pixel grid (metrics.csv against the ground truth turned alike), and the
settings are recorded and rerun the segmentation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from test_evaluate import check_metrics_file
from test_orientation_engine import ONE_POSE
from test_workflow import planned_jobs, snakemake

from sam2pal.inference.orientation import Candidate, transform_image
from sam2pal.io.masks import decode_segmentation, encode_rle, mask_bbox
from sam2pal.synth.quality import held_out_masks
from sam2pal.synth.specimens import make_collection

# photo -> (rotation, mirrored): the photo shows its beetle turned `rotation` degrees
# clockwise from the template's pose, after a left-right mirror when `mirrored`
POSES = [(0, False), (90, False), (180, False), (270, True), (0, True)]
CANDIDATES = {(r, m) for r in (0, 90, 180, 270) for m in (False, True)}


def write_collection(folder):
    """One template and five beetles in its pose, turned (PNG: their pixels exactly),
    and their ground truth turned alike; returns (templates.json, template folder,
    ground truth, {photo: (rotation, mirrored)})."""
    source = folder / "source"
    make_collection(
        source,
        n_images=len(POSES),
        n_templates=1,
        seed=5,
        mask_names=held_out_masks()[:6],
        style=ONE_POSE,
    )
    gt = json.loads((source / "ground_truth.json").read_text())
    photos = folder / "photos"
    photos.mkdir()
    images, annotations, poses = [], [], {}
    for image, (rotation, mirrored) in zip(gt["images"], POSES):
        pose = Candidate(rotation, mirrored)
        name = f"{rotation:03d}{'_mirrored' if mirrored else ''}_{image['file_name'][:-4]}.png"
        rgb = np.array(Image.open(source / "images" / image["file_name"]).convert("RGB"))
        turned = transform_image(rgb, pose)
        Image.fromarray(turned).save(photos / name)
        poses[name] = (rotation, mirrored)
        height, width = turned.shape[:2]
        images.append({"id": image["id"], "file_name": name, "width": width, "height": height})
        for ann in gt["annotations"]:
            if ann["image_id"] != image["id"]:
                continue
            mask = decode_segmentation(ann["segmentation"], image["height"], image["width"])
            mask = transform_image(mask, pose)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
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
    return source / "templates.json", source / "images", truth, poses


# slow: a rot4_mirror run of 8 turned photos (~2 minutes on 2 cores); the orientation
# search has quick engine tests in tests/inference/test_orientation_engine.py
@pytest.mark.slow
def test_turned_and_mirrored_photos_in_the_workflow(tmp_path):
    templates, template_images, truth, poses = write_collection(tmp_path)
    config = {
        "collections": {
            "turned": {
                "images": str(tmp_path / "photos"),
                "templates": str(templates),
                "template_images": str(template_images),
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
    assert sorted(found) == sorted(poses)
    for name, pose in poses.items():
        image, chosen = found[name], found[name]["orientation"]
        candidates = chosen["candidates"]
        assert {(c["rotation"], c["mirrored"]) for c in candidates} == CANDIDATES, name
        best = max(candidates, key=lambda c: c["score"])
        assert (best["rotation"], best["mirrored"]) == (chosen["rotation"], chosen["mirrored"])
        assert (chosen["rotation"], chosen["mirrored"]) == pose, (name, chosen)
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
    assert len(elytra) == len(poses) and min(elytra.values()) > 0.3, elytra

    # the search is recorded with the run, and turning it off re-segments
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["config"]["propagate"]["orientation"] == "rot4_mirror"
    assert provenance["settings"]["orientation"] == "rot4_mirror"
    config["propagate"]["orientation"] = "none"
    (tmp_path / "upright.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    plan = planned_jobs(snakemake(tmp_path, "--configfile", "upright.yaml", "-n").stdout)
    assert "propagate" in plan
