"""The zoom pass in the workflow (`propagate.zoom: auto`): synthetic beetles segmented
with sam2pal-micro, the small structures segmented again on windows. predictions.json
and qc.csv say which structures the zoom pass produced, the masks are scored against
the ground truth, and the setting is recorded and reruns the segmentation."""

from __future__ import annotations

import csv
import json
import shutil

import yaml
from test_evaluate import check_metrics_file
from test_workflow import planned_jobs, snakemake

from sam2pal.synth.quality import held_out_masks
from sam2pal.synth.specimens import make_collection


def test_zoom_auto_in_the_workflow(tmp_path):
    source = tmp_path / "source"
    make_collection(
        source,
        n_images=3,
        n_templates=1,
        seed=4,
        size=(960, 720),
        mask_names=held_out_masks()[:4],
        style={"palettes": ("dark_brown",), "backgrounds": ("paper",), "clutter_prob": 0.0},
    )
    # the photos to segment: all but the template
    template_names = {
        i["file_name"] for i in json.loads((source / "templates.json").read_text())["images"]
    }
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in (source / "images").iterdir():
        if image.name not in template_names:
            shutil.copy(image, photos / image.name)
    config = {
        "collections": {
            "beetles": {
                "images": str(photos),
                "templates": str(source / "templates.json"),
                "template_images": str(source / "images"),
                "ground_truth": str(source / "ground_truth.json"),
            }
        },
        "model": {"checkpoint": "sam2pal-micro"},
        # zoom every structure under 40% of the photo's longer side
        "propagate": {"device": "cpu", "zoom": "auto", "zoom_below": 0.4},
        "outputs": {"save_overlays": False, "report": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(tmp_path, "--configfile", "config.yaml")
    out = tmp_path / "results" / "beetles"

    coco = json.loads((out / "predictions.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    zoomed = {
        (a["image_id"], names[a["category_id"]]) for a in coco["annotations"] if a.get("zoomed")
    }
    assert zoomed, "no structure was zoomed"
    # only the structures under zoom_below of the photo on the template are
    templates = json.loads((source / "templates.json").read_text())
    side = max(templates["images"][0]["width"], templates["images"][0]["height"])
    tnames = {c["id"]: c["name"] for c in templates["categories"]}
    small = {
        tnames[a["category_id"]]
        for a in templates["annotations"]
        if max(a["bbox"][2], a["bbox"][3]) < 0.4 * side
    }
    assert small and {name for _, name in zoomed} <= small, (small, zoomed)
    qc = list(csv.DictReader(open(out / "qc.csv")))
    assert any(row["zoomed"] for row in qc)
    by_id = {image["id"]: image["file_name"] for image in coco["images"]}
    for image_id, name in zoomed:
        row = next(r for r in qc if r["file_name"] == by_id[image_id])
        assert name in row["zoomed"].split(";")
    check_metrics_file(
        out / "metrics.csv",
        source / "ground_truth.json",
        out / "predictions.json",
        {name: "template" for name in template_names},
    )

    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["settings"]["zoom"] == "auto"
    config["propagate"]["zoom"] = "off"
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    plan = planned_jobs(snakemake(tmp_path, "--configfile", "plain.yaml", "-n").stdout)
    assert "propagate" in plan
