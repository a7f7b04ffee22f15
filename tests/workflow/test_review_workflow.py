"""A collection's `corrections` in the workflow: adding a reviewer's export reruns the
tables, QC and report only, never the segmentation; the corrected mask is in
predictions.json and review_summary.csv is written from the random sample."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import yaml
from test_workflow import DEMO, planned_jobs, snakemake

from sam2pal.io.masks import decode_segmentation

PHOTOS = ("specimen_002.jpg", "specimen_003.jpg", "specimen_004.jpg")


def head_task(file_name: str, width: int, height: int) -> dict:
    """A Label Studio task whose reviewer drew the head as a box, 40 x 30 px at (100, 80)."""
    points = [
        [x / width * 100, y / height * 100]
        for x, y in ((100, 80), (140, 80), (140, 110), (100, 110))
    ]
    return {
        "id": 1,
        "data": {"image": f"/data/local-files/?d={file_name}", "file_name": file_name},
        "annotations": [
            {
                "id": 1,
                "was_cancelled": False,
                "updated_at": "2026-04-30T09:00:00Z",
                "result": [
                    {
                        "type": "polygonlabels",
                        "from_name": "label",
                        "to_name": "image",
                        "original_width": width,
                        "original_height": height,
                        "value": {"points": points, "closed": True, "polygonlabels": ["head"]},
                    }
                ],
            }
        ],
    }


def test_corrections_rerun_the_tables_only(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    for name in PHOTOS:
        shutil.copy(DEMO / "images" / name, images / name)
    config = {
        "collections": {
            "drawer": {
                "images": str(images),
                "templates": str(DEMO / "templates.json"),
                "template_images": str(DEMO / "images"),
            }
        },
        "model": {"checkpoint": "random", "image_size": 64},
        "propagate": {"cycle_consistency": False},
        "outputs": {"save_overlays": False, "gallery_size": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "--configfile", "config.yaml")
    out = tmp_path / "results" / "drawer"
    size = {
        im["file_name"]: im for im in json.loads((out / "predictions.json").read_text())["images"]
    }
    width, height = size["specimen_002.jpg"]["width"], size["specimen_002.jpg"]["height"]

    review = tmp_path / "review"
    review.mkdir()
    export = review / "project-1.json"
    export.write_text(json.dumps([head_task("specimen_002.jpg", width, height)]))
    with open(review / "review_sample.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "selected_by", "qc_rank", "qc_score", "seed"])
        writer.writerow(["specimen_003.jpg", "worst", 1, "0.1", 0])
        writer.writerow(["specimen_002.jpg", "random", 2, "0.2", 0])
    config["collections"]["drawer"]["corrections"] = str(export)
    config["collections"]["drawer"]["review_sample"] = str(review / "review_sample.csv")
    (tmp_path / "reviewed.yaml").write_text(yaml.safe_dump(config))

    plan = planned_jobs(snakemake(tmp_path, "--configfile", "reviewed.yaml", "-n").stdout)
    assert {"apply_corrections", "merge_predictions", "qc", "measure", "review_summary"} <= plan
    assert {"report_review", "report_figures"} <= plan
    assert not plan & {"propagate", "prepare_templates", "finetune"}, plan

    snakemake(tmp_path, "--configfile", "reviewed.yaml")
    coco = json.loads((out / "predictions.json").read_text())
    iid = next(im["id"] for im in coco["images"] if im["file_name"] == "specimen_002.jpg")
    head = next(a for a in coco["annotations"] if a["image_id"] == iid and a["category_id"] == 1)
    drawn = np.zeros((height, width), bool)
    drawn[80:110, 100:140] = True
    assert np.array_equal(decode_segmentation(head["segmentation"], height, width), drawn)
    assert head["corrected"]["source"] == str(export)
    qc = {r["file_name"]: r for r in csv.DictReader(open(out / "qc.csv"))}
    assert (
        qc["specimen_002.jpg"]["qc_score"] == "1.0000" and qc["specimen_003.jpg"]["corrected"] == ""
    )
    summary = list(csv.DictReader(open(out / "review_summary.csv")))
    assert {r["sample"] for r in summary} == {"random"}  # the worst image was not reviewed
    assert (out / "report" / "review.png").stat().st_size > 0

    # an edited export reruns the same steps again, still no segmentation
    export.write_text(json.dumps([head_task("specimen_004.jpg", width, height)]))
    plan = planned_jobs(snakemake(tmp_path, "--configfile", "reviewed.yaml", "-n").stdout)
    assert "apply_corrections" in plan and "propagate" not in plan

    # as templates: the reviewed image joins the templates and the collection is
    # segmented again
    config["collections"]["drawer"]["corrections"] = {
        "files": [str(export)],
        "as_templates": True,
    }
    (tmp_path / "templates.yaml").write_text(yaml.safe_dump(config))
    plan = planned_jobs(snakemake(tmp_path, "--configfile", "templates.yaml", "-n").stdout)
    assert {"prepare_templates", "propagate", "apply_corrections"} <= plan
    snakemake(tmp_path, "--configfile", "templates.yaml")
    templates = json.loads((out / "templates.json").read_text())
    added = next(im for im in templates["images"] if im["file_name"] == "specimen_004.jpg")
    (head,) = [a for a in templates["annotations"] if a["image_id"] == added["id"]]
    assert head["category_id"] == 1
    assert np.array_equal(decode_segmentation(head["segmentation"], height, width), drawn)
    assert len(templates["images"]) == 3  # the collection's two, and the reviewed one

    # a sample without corrections is refused
    del config["collections"]["drawer"]["corrections"]
    (tmp_path / "sample_only.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--configfile", "sample_only.yaml", "-n", check=False)
    assert result.returncode != 0
    assert (
        "collections.drawer.review_sample: the sample's accuracy" in result.stdout + result.stderr
    )
