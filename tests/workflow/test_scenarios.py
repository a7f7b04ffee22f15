"""The test scenarios of .test/, run as a user runs them
(`snakemake --cores 2 --directory .test/<scenario>`, each reading its own
config/config.yaml), in a copy of the scenario folder: photos with COCO templates,
photos with PNG templates, a video, and palindrome fine-tuning."""

from __future__ import annotations

import copy
import csv
import json
import shutil

import pytest
import yaml
from conftest import REPO
from pycocotools.coco import COCO
from test_evaluate import check_metrics_file
from test_workflow import DEMO, planned_jobs, snakemake

SCENARIOS = REPO / ".test"
PHOTOS = sorted(p.name for p in (SCENARIOS / "data" / "photos").iterdir())
TEMPLATES = {"specimen_000.jpg": "template", "specimen_001.jpg": "template"}


def scenario(name, tmp_path):
    """A copy of the scenario folder .test/<name> and of .test/data in tmp_path, next to
    a link to the repository's resources, so that its relative paths resolve as in
    the repository; the folder to run it in."""
    ignore = shutil.ignore_patterns("results", "logs", ".snakemake")
    shutil.copytree(SCENARIOS / name, tmp_path / ".test" / name, ignore=ignore)
    shutil.copytree(SCENARIOS / "data", tmp_path / ".test" / "data")
    (tmp_path / "resources").symlink_to(REPO / "resources")
    return tmp_path / ".test" / name


def run_scenario(name, tmp_path):
    workdir = scenario(name, tmp_path)
    snakemake(workdir)
    return workdir


def test_the_scenarios_use_sam2pal_micro_on_a_few_images():
    for name in ("photos-coco", "photos-png", "video", "finetune"):
        config = yaml.safe_load((SCENARIOS / name / "config" / "config.yaml").read_text())
        assert config["model"]["checkpoint"] == "sam2pal-micro", name
        assert config["propagate"]["device"] == "cpu", name
    assert [f"specimen_{k:03d}.jpg" for k in range(6)] == PHOTOS


# slow: a whole scenario run (~40 s on 2 cores); test_workflow.py's demo run uses COCO
# templates through the same rules
@pytest.mark.slow
def test_photos_with_coco_templates(tmp_path):
    out = run_scenario("photos-coco", tmp_path) / "results" / "beetles"
    coco = COCO(str(out / "predictions.json"))
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == PHOTOS
    structures = ["head", "pronotum", "elytra", "antenna", "legs"]
    assert [c["name"] for c in coco.dataset["categories"]] == structures
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    found = {
        (coco.imgs[a["image_id"]]["file_name"], names[a["category_id"]]) for a in coco.anns.values()
    }
    # the specimen's body parts on every photo; a thin part the model predicts absent on
    # a photo (sam2pal-micro v8 to v11 miss some of the six antennae here) has no mask and no row
    assert {(p, s) for p in PHOTOS for s in ("head", "pronotum", "elytra")} <= found
    assert len(found) >= len(PHOTOS) * len(structures) - 3
    rows = list(csv.DictReader(open(out / "measurements.csv")))
    assert {(r["file_name"], r["category"]) for r in rows} == found
    assert all(float(r["area_mm2"]) == pytest.approx(float(r["area_px"]) / 20.0**2) for r in rows)
    qc = list(csv.DictReader(open(out / "qc.csv")))
    assert sorted(r["file_name"] for r in qc) == PHOTOS
    # a photo with a structure predicted absent is flagged for review, naming it
    for r in qc:
        absent = sorted(s for s in structures if (r["file_name"], s) not in found)
        assert r["status"] == ("missing" if absent else "ok"), r
        assert r["missing"] == ";".join(absent), r
    assert len(list((out / "masks").glob("*.png"))) == len(coco.anns)
    assert len(list((out / "overlays").glob("*.jpg"))) == len(PHOTOS)
    metrics = check_metrics_file(
        out / "metrics.csv", DEMO / "ground_truth.json", out / "predictions.json", TEMPLATES
    )
    elytra = [
        float(r["iou"])
        for r in metrics
        if r["level"] == "image" and r["category"] == "elytra" and r["file_name"] in PHOTOS[2:]
    ]
    assert len(elytra) == 4 and min(elytra) > 0.3, elytra  # real masks, not random weights


# slow: a whole scenario run (~40 s on 2 cores); test_photos_with_coco_templates runs the
# same rules, and the PNG template reader has its own unit tests
@pytest.mark.slow
def test_photos_with_png_templates(tmp_path):
    out = run_scenario("photos-png", tmp_path) / "results" / "beetles"
    coco = json.loads((out / "predictions.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["head", "elytra", "antenna"]
    assert sorted(im["file_name"] for im in coco["images"]) == PHOTOS
    images = {im["id"]: im["file_name"] for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    found = {(images[a["image_id"]], names[a["category_id"]]) for a in coco["annotations"]}
    # head and elytra on every photo; an antenna predicted absent has no mask and no row
    assert {(p, s) for p in PHOTOS for s in ("head", "elytra")} <= found
    assert len(found) >= len(PHOTOS) * 3 - 2
    rows = list(csv.DictReader(open(out / "measurements.csv")))
    assert {(r["file_name"], r["category"]) for r in rows} == found
    # metrics: the template's structures are scored apart from the targets
    metrics = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["level"] == "image"]
    roles = {(r["file_name"], r["category"]): r["role"] for r in metrics}
    assert {roles["specimen_000.jpg", s] for s in ("head", "elytra", "antenna")} == {"template"}
    elytra = [
        float(r["iou"])
        for r in metrics
        if r["category"] == "elytra" and r["file_name"] in PHOTOS[1:]
    ]
    assert len(elytra) == 5 and min(elytra) > 0.3, elytra  # real masks, not random weights


# slow: the demo clip through the whole workflow (~3 minutes on 2 cores); the video
# rules run in the default suite in test_video_workflow.py
@pytest.mark.slow
def test_demo_video_outputs(tmp_path):
    """The demo's video: 32 frames tracked from keyframes 8 and 24, with an overlay video."""
    workdir = run_scenario("video", tmp_path)
    out = workdir / "results" / "demo_video"
    coco = COCO(str(out / "predictions.json"))
    assert sorted(coco.getImgIds()) == list(range(32))
    assert {a["image_id"] for a in coco.loadAnns(coco.getAnnIds()) if a.get("keyframe")} == {8, 24}
    assert (out / "overlay.mp4").stat().st_size > 0
    assert not (out / "overlays").exists()
    # metrics: the keyframes, output as annotated (IoU 1), are scored apart from the targets
    rows = check_metrics_file(
        out / "metrics.csv",
        REPO / "resources" / "demo_video" / "ground_truth.json",
        out / "predictions.json",
        {"00008.jpg": "keyframe", "00024.jpg": "keyframe"},
    )
    assert all(float(r["iou"]) == 1.0 for r in rows if r["role"] == "keyframe")
    assert {
        r["n_images"] for r in rows if r["level"] == "category_mean" and r["role"] == "target"
    } == {"30"}


def test_finetune_in_the_workflow(tmp_path):
    """finetune.enabled trains an adapter that propagate uses; another collection reuses
    it without training; editing propagation settings does not retrain, but for the
    framing, which the training shares."""
    workdir = scenario("finetune", tmp_path)
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    collection = dict(config["collections"]["trained"])
    del collection["finetune"]
    snakemake(workdir)
    finetune = workdir / "results" / "trained" / "finetune"
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/sam2pal_adapter.json",
        "adapter_last/adapter_model.safetensors",
        "training_log.csv",
        "training_curves.png",
    ):
        assert (finetune / name).is_file(), name
    log = list(csv.DictReader(open(finetune / "training_log.csv")))
    assert [r["epoch"] for r in log] == ["0", "1"] and log[1][
        "val_iou"
    ]  # ground truth gives the real IoU
    info = json.loads((workdir / "results" / "trained" / "predictions.json").read_text())["info"][
        "model"
    ]
    assert info["adapter_kind"] == "lora"
    assert (workdir / "logs" / "trained" / "finetune.benchmark.tsv").is_file()
    report = workdir / "results" / "trained" / "report"
    assert (report / "training_curves.png").stat().st_size > 0
    assert list(csv.DictReader(open(report / "training_log.csv"))) == log

    # metrics: the templates (copies in the collection, matched by name) and the hold-out
    # image whose ground truth picked the best epoch are scored apart from the targets
    selection = json.loads((finetune / "adapter" / "sam2pal_adapter.json").read_text())["selection"]
    assert (
        selection["by"] == "ground_truth_iou"
        and selection["ground_truth_images"] == selection["holdout"]
    )
    roles = {name: "finetune_holdout" for name in selection["holdout"]}
    roles.update({"specimen_000.jpg": "template", "specimen_001.jpg": "template"})
    results = workdir / "results" / "trained"
    rows = check_metrics_file(
        results / "metrics.csv", DEMO / "ground_truth.json", results / "predictions.json", roles
    )
    assert {r["role"] for r in rows} == {"target", "template", "finetune_holdout"}

    # the jobs read the device from the config: changing it retrains and re-segments nothing
    # (the configs keep the scenario's key order: the params of the jobs are ordered dicts)
    config["propagate"]["device"] = "auto"
    (workdir / "device.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert "Nothing to be done" in snakemake(workdir, "--configfile", "device.yaml", "-n").stdout
    config["propagate"]["area_growth_limit"] = 3.0
    (workdir / "edit.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    plan = planned_jobs(snakemake(workdir, "--configfile", "edit.yaml", "-n").stdout)
    assert "propagate" in plan and "finetune" not in plan
    config["finetune"]["num_epochs"] = 2
    (workdir / "retrain.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert "finetune" in planned_jobs(
        snakemake(workdir, "--configfile", "retrain.yaml", "-n").stdout
    )
    # the training frames its images as the segmentation does: framing retrains
    framed = copy.deepcopy(config)
    framed["finetune"]["num_epochs"] = 1
    framed["propagate"]["area_growth_limit"] = 0.0
    framed["propagate"]["framing"] = "letterbox"
    (workdir / "framed.yaml").write_text(yaml.safe_dump(framed, sort_keys=False))
    assert {"finetune", "propagate"} <= planned_jobs(
        snakemake(workdir, "--configfile", "framed.yaml", "-n").stdout
    )
    # and it trains on the zoom pass's windows: zoom retrains too
    zoomed = copy.deepcopy(framed)
    zoomed["propagate"]["framing"] = config["propagate"].get("framing", "stretch")
    zoomed["propagate"]["zoom"] = "auto"
    (workdir / "zoomed.yaml").write_text(yaml.safe_dump(zoomed, sort_keys=False))
    assert {"finetune", "propagate"} <= planned_jobs(
        snakemake(workdir, "--configfile", "zoomed.yaml", "-n").stdout
    )
    meta = json.loads((finetune / "adapter" / "sam2pal_adapter.json").read_text())
    assert meta["zoom"] == {
        "zoom": "off",
        "zoom_below": 0.1,
        "zoom_margin": 0.5,
        "crops": False,
        "windows": 0,
    }

    reuse = {
        "collections": {
            "reused": dict(collection, finetune={"adapter": str(finetune / "adapter")})
        },
        "model": config["model"],
        "propagate": config["propagate"],
        "outputs": config["outputs"],
    }
    # a run of its own, beside the scenario: without the scenario's config/config.yaml
    other = workdir.parent / "reuse"
    other.mkdir()
    (other / "reuse.yaml").write_text(yaml.safe_dump(reuse))
    snakemake(other, "--configfile", "reuse.yaml")
    assert not (other / "results" / "reused" / "finetune").exists()
    reused = json.loads((other / "results" / "reused" / "predictions.json").read_text())["info"][
        "model"
    ]
    assert reused["adapter_sha256"] == info["adapter_sha256"]
    results = other / "results" / "reused"  # the given adapter's record counts the same
    check_metrics_file(
        results / "metrics.csv", DEMO / "ground_truth.json", results / "predictions.json", roles
    )

    both = json.loads(json.dumps(reuse))
    both["collections"]["reused"]["finetune"]["enabled"] = True
    (other / "both.yaml").write_text(yaml.safe_dump(both))
    result = snakemake(other, "--configfile", "both.yaml", "-n", check=False)
    assert result.returncode != 0 and "set only one of them" in result.stdout + result.stderr
