"""The Snakemake workflow, run for real: the demo config in a temporary folder, several
collections in one config (COCO and PNG templates, an unreadable image), reruns, the
dry-run and the linter, and clear errors for bad configs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO
from PIL import Image
from pycocotools.coco import COCO
from test_evaluate import check_metrics_file

from sam2pal.models.registry import MICRO_SHA256
from sam2pal.outputs.measure import MASK_MEASURES

DEMO = REPO / "resources" / "demo"


def snakemake(workdir, *args, check=True):
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--workflow-profile",
        "none",
        "--cores",
        "2",
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=workdir)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def planned_jobs(stdout: str) -> set[str]:
    """Rule names in the job-stats table of a dry-run."""
    table = stdout.split("Job stats:")[1].split("total")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip()}


def absolute_demo_config():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for collection in config["collections"].values():
        for key in ("images", "video", "frames", "templates", "ground_truth"):
            if collection.get(key):
                collection[key] = str(REPO / collection[key])
    return config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo config, run in a temporary folder (its photo collection: the
    video collection is the video scenario of .test/, run in test_scenarios.py)."""
    workdir = tmp_path_factory.mktemp("demo")
    config = absolute_demo_config()
    del config["collections"]["demo_video"]
    # publish/ too, with a sample sheet (test_publish_outputs)
    sheet = workdir / "specimens.csv"
    names = sorted(p.name for p in (DEMO / "images").iterdir())
    sheet.write_text(
        "file_name,occurrenceID,catalogNumber\n"
        + "".join(f"{name},urn:demo:{k},D-{k}\n" for k, name in enumerate(names))
    )
    config["collections"]["demo"].update(sample_sheet=str(sheet), outputs={"publish": True})
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir, "--configfile", "config.yaml")
    return workdir, config


def test_demo_run_outputs(demo_run):
    workdir, config = demo_run
    out = workdir / "results" / "demo"
    for name in (
        "predictions.json",
        "measurements.csv",
        "measurements_wide.csv",
        "qc.csv",
        "skipped.csv",
        "metrics.csv",
    ):
        assert (out / name).is_file(), name
    coco = COCO(str(out / "predictions.json"))
    n_images = len(list((DEMO / "images").iterdir()))
    assert len(coco.getImgIds()) == n_images
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [
        "head",
        "pronotum",
        "elytra",
        "antenna",
        "legs",
    ]
    info = coco.dataset["info"]
    # the shipped sam2pal-micro, at its own input size
    assert info["model"]["checkpoint"].endswith("resources/models/sam2pal-micro.pt")
    assert info["model"]["image_size"] == 384 and info["model"]["checkpoint_sha256"] == MICRO_SHA256
    assert info["templates"]["images"] == ["specimen_000.jpg", "specimen_001.jpg"]
    assert "torch" in info["versions"] and "sam2" in info["versions"]

    with open(out / "measurements.csv") as handle:
        header = next(csv.reader(handle))
    assert header == [
        "file_name",
        "image_id",
        "annotation_id",
        "category",
        "area_px",
        "perimeter_px",
        "feret_max_px",
        "feret_min_px",
        "major_axis_px",
        "minor_axis_px",
        "eccentricity",
        "solidity",
        "curve_length_px",
        "area_mm2",
        "perimeter_mm",
        "feret_max_mm",
        "feret_min_mm",
        "curve_length_mm",
    ]
    wide = list(csv.DictReader(open(out / "measurements_wide.csv")))
    assert len(wide) == n_images and "antenna_curve_length_px" in wide[0]
    qc = list(csv.DictReader(open(out / "qc.csv")))
    assert len(qc) == n_images and [int(r["rank"]) for r in qc] == list(range(1, n_images + 1))
    scores = [float(r["qc_score"]) for r in qc]
    assert scores == sorted(scores)
    # metrics: the template photos, segmented with themselves in memory, are not targets
    rows = check_metrics_file(
        out / "metrics.csv",
        DEMO / "ground_truth.json",
        out / "predictions.json",
        {"specimen_000.jpg": "template", "specimen_001.jpg": "template"},
    )
    metrics = [r for r in rows if r["level"] == "category_mean" and r["role"] == "target"]
    assert sorted(r["category"] for r in metrics) == [
        "antenna",
        "elytra",
        "head",
        "legs",
        "pronotum",
    ]
    truth = json.loads((DEMO / "ground_truth.json").read_text())
    names = {c["id"]: c["name"] for c in truth["categories"]}
    with_truth = {
        name: len({a["image_id"] for a in truth["annotations"] if names[a["category_id"]] == name})
        for name in names.values()
    }
    assert {r["category"]: int(r["n_images"]) for r in metrics} == {
        k: n - 2 for k, n in with_truth.items()
    }
    iou = {r["category"]: float(r["iou"]) for r in metrics}
    assert iou["elytra"] >= 0.5, iou  # real masks: random weights stay below 0.1
    assert len(list((out / "masks").glob("*.png"))) == len(coco.dataset["annotations"])
    assert len(list((out / "overlays").glob("*.jpg"))) == n_images
    assert (workdir / "logs" / "demo" / "propagate" / "shard-0-of-1.log").read_text().strip()


def test_publish_outputs(demo_run):
    """outputs.publish: the Darwin Core Archive (occurrences from the sample sheet, a
    measurement per filled cell of measurements.csv) and a Fiji ROI set per image."""
    import roifile
    from dwca.read import DwCAReader

    workdir, _ = demo_run
    out = workdir / "results" / "demo"
    rows = list(csv.DictReader(open(out / "measurements.csv")))
    cells = sum(1 for row in rows for key in MASK_MEASURES if row[key])
    names = sorted(p.name for p in (DEMO / "images").iterdir())
    with DwCAReader(out / "publish" / "dwca.zip") as archive:
        assert [row.id for row in archive] == [f"urn:demo:{k}" for k in range(len(names))]
        assert archive.rows[1].data["http://rs.tdwg.org/dwc/terms/catalogNumber"] == "D-1"
        assert sum(len(row.extensions) for row in archive) == cells
    per_image = {}
    for row in rows:
        per_image.setdefault(row["file_name"].rsplit(".", 1)[0], set()).add(row["category"])
    sets = {p.stem: p for p in (out / "publish" / "roi").glob("*.zip")}
    assert set(sets) == set(per_image)
    for stem, path in sets.items():
        assert {roi.name for roi in roifile.roiread(path)} == per_image[stem]


def test_rerun_has_nothing_to_do_and_measure_settings_do_not_resegment(demo_run):
    workdir, config = demo_run
    assert "Nothing to be done" in snakemake(workdir, "--configfile", "config.yaml", "-n").stdout
    config = json.loads(json.dumps(config))
    config["collections"]["demo"]["px_per_mm"] = 12.5
    (workdir / "changed.yaml").write_text(yaml.safe_dump(config))
    plan = planned_jobs(snakemake(workdir, "--configfile", "changed.yaml", "-n").stdout)
    assert "measure" in plan and "propagate" not in plan
    config["collections"]["demo"]["px_per_mm"] = 20.0
    config["propagate"] = dict(config.get("propagate", {}), threads=1, runtime=30)
    (workdir / "resources.yaml").write_text(yaml.safe_dump(config))
    assert "Nothing to be done" in snakemake(workdir, "--configfile", "resources.yaml", "-n").stdout
    config["propagate"]["area_growth_limit"] = 2.5
    (workdir / "masks.yaml").write_text(yaml.safe_dump(config))
    assert "propagate" in planned_jobs(
        snakemake(workdir, "--configfile", "masks.yaml", "-n").stdout
    )


def test_several_collections_png_templates_and_a_bad_image(tmp_path):
    """A second collection with PNG templates (binary and label map), an image that
    cannot be read, and its own model settings, next to a COCO-templated one."""
    images = tmp_path / "photos"
    images.mkdir()
    for name in ("specimen_002.jpg", "specimen_003.jpg", "specimen_004.jpg"):
        shutil.copy(DEMO / "images" / name, images / name)
    (images / "broken.jpg").write_bytes((DEMO / "images" / "specimen_005.jpg").read_bytes()[:2000])
    gt = json.loads((DEMO / "ground_truth.json").read_text())
    image = next(im for im in gt["images"] if im["file_name"] == "specimen_000.jpg")
    from sam2pal.io.masks import decode_segmentation

    labels = np.zeros((image["height"], image["width"]), np.uint8)
    for ann in gt["annotations"]:
        if ann["image_id"] == image["id"]:
            labels[decode_segmentation(ann["segmentation"], image["height"], image["width"])] = ann[
                "category_id"
            ]
    Image.fromarray(((labels == 4) * 255).astype(np.uint8)).save(tmp_path / "antenna_mask.png")
    labels[~np.isin(labels, [1, 3])] = 0  # a label map of head (1) and elytra (3)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    config = {
        "collections": {
            "coco_set": {
                "images": str(images),
                "templates": str(DEMO / "templates.json"),
                "template_images": str(DEMO / "images"),
                "propagate": {"cycle_consistency": False},
            },
            "png_set": {
                "images": str(images),
                "templates": [
                    {
                        "image": str(DEMO / "images" / "specimen_000.jpg"),
                        "mask": str(tmp_path / "labels.png"),
                        "labels": {"1": "head", "3": "elytra"},
                    },
                    {
                        "image": str(DEMO / "images" / "specimen_000.jpg"),
                        "mask": str(tmp_path / "antenna_mask.png"),
                        "structure": "antenna",
                    },
                ],
                "model": {"image_size": 64},
            },
        },
        "model": {"checkpoint": "random", "image_size": 128},
        "outputs": {"save_overlays": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "--configfile", "config.yaml")
    for collection, n_categories in (("coco_set", 5), ("png_set", 3)):
        out = tmp_path / "results" / collection
        skipped = list(csv.DictReader(open(out / "skipped.csv")))
        assert [r["file_name"] for r in skipped] == [
            "broken.jpg"
        ] and "cannot read image" in skipped[0]["reason"]
        coco = COCO(str(out / "predictions.json"))
        assert len(coco.getImgIds()) == 3 and len(coco.getCatIds()) == n_categories
        qc = list(csv.DictReader(open(out / "qc.csv")))
        assert qc[0]["file_name"] == "broken.jpg" and qc[0]["status"] == "skipped"
    png = json.loads((tmp_path / "results" / "png_set" / "predictions.json").read_text())
    assert [c["name"] for c in png["categories"]] == ["head", "elytra", "antenna"]
    assert png["info"]["model"]["image_size"] == 64
    coco_set = json.loads((tmp_path / "results" / "coco_set" / "predictions.json").read_text())
    assert all(a["cycle_iou"] is None for a in coco_set["annotations"])


def test_dry_run_and_lint_of_the_repository_config():
    dry = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--forceall", "--cores", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "propagate" in dry.stdout
    lint = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]
    assert "Congratulations" in lint.stdout + lint.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"collections": {"x": {"images": "/nonexistent/folder", "templates": "t.json"}}},
            "/nonexistent/folder",
        ),
        ({"collections": {"x": {"images": "."}}}, "templates"),
        (
            {
                "collections": {"x": {"images": ".", "templates": "t.json"}},
                "propagate": {"device": "gpu"},
            },
            "device",
        ),
        # settings that would be accepted and do nothing
        (
            {
                "collections": {
                    "x": {"frames": ".", "templates": "t.json", "video_options": {"max_size": 512}}
                }
            },
            "collections.x.video_options.max_size: max_size chooses how frames are extracted from a video file",
        ),
        (
            {
                "collections": {"x": {"frames": ".", "templates": "t.json"}},
                "video_options": {"image_format": "png"},
            },
            "video_options.image_format (set for all collections",
        ),
        (
            {
                "collections": {
                    "x": {"frames": ".", "templates": "t.json", "video_options": {"start": 2.0}}
                }
            },
            "collection x is a folder of frames",
        ),
        (
            {
                "collections": {
                    "x": {"images": ".", "templates": "t.json", "video_options": {"fps": 5}}
                }
            },
            "collections.x.video_options: x is a folder of photos",
        ),
        (
            {
                "collections": {
                    "x": {"images": ".", "templates": "t.json", "model": {"checkpoint_dir": "ckpt"}}
                }
            },
            "collections.x.model.checkpoint_dir: the folder of official checkpoints is one for the whole run",
        ),
        (
            {
                "collections": {"x": {"images": ".", "templates": "t.json"}},
                "propagate": {"max_skipped_fraction": 1.5},
            },
            "max_skipped_fraction",
        ),
        # the orientation search is for photos, and its settings are checked
        (
            {
                "collections": {
                    "x": {
                        "frames": ".",
                        "templates": "t.json",
                        "propagate": {"orientation": "rot4"},
                    }
                }
            },
            "collections.x.propagate.orientation: rot4 searches the orientation of photos",
        ),
        (
            {
                "collections": {"x": {"frames": ".", "templates": "t.json"}},
                "propagate": {"orientation": "rot4_mirror"},
            },
            "propagate.orientation (set for all collections",
        ),
        (
            {
                "collections": {"x": {"images": ".", "templates": "t.json"}},
                "propagate": {"mirror_pairs": [["fore_wing_a"]]},
            },
            "mirror_pairs",
        ),
        (
            {
                "collections": {
                    "x": {"images": ".", "templates": "t.json", "propagate": {"framing_fill": 300}}
                }
            },
            "collections.x.propagate: framing_fill",
        ),
        (
            {
                "collections": {
                    "x": {
                        "images": ".",
                        "templates": "t.json",
                        "propagate": {"zoom": "best", "cycle_consistency": False},
                    }
                }
            },
            "collections.x.propagate: zoom best keeps, per structure, the mask with the higher "
            "cycle IoU, so it needs cycle_consistency: true",
        ),
    ],
)
def test_bad_config_gives_a_clear_error(tmp_path, change, message):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(change))
    result = snakemake(tmp_path, "--configfile", "config.yaml", "-n", check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_finetune_pool_from_a_coco_file(tmp_path):
    """finetune.pool_images may be a COCO file listing which photos to train on."""
    images = sorted(p.name for p in (DEMO / "images").iterdir())
    pool = {
        "images": [
            {"id": i, "file_name": n, "width": 480, "height": 360}
            for i, n in enumerate(images[4:7])
        ],
        "annotations": [],
        "categories": [],
    }
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    config = {
        "collections": {
            "c": {
                "images": str(DEMO / "images"),
                "templates": str(DEMO / "templates.json"),
                "finetune": {"enabled": True, "pool_images": str(tmp_path / "pool.json")},
            }
        }
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, "--configfile", "config.yaml", "-n", "--forceall").stdout
    block = out.split("rule finetune:")[1].split("output:")[0]
    listed = {name for name in images if name in block}
    assert listed == set(images[4:7])

    pool["images"].append({"id": 99, "file_name": "not_there.jpg", "width": 1, "height": 1})
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    result = snakemake(tmp_path, "--configfile", "config.yaml", "-n", check=False)
    assert result.returncode != 0 and "not_there.jpg" in result.stdout + result.stderr


def test_too_many_bad_files_stop_the_collection_at_the_merge(tmp_path):
    """Shards skip bad files; the merge, which sees the whole collection, stops with
    their list when more than propagate.max_skipped_fraction of it is bad. Raising
    the limit then merges without segmenting anything again."""
    images = tmp_path / "photos"
    images.mkdir()
    for name in ("specimen_002.jpg", "specimen_003.jpg"):
        shutil.copy(DEMO / "images" / name, images / name)
    (images / "cut.jpg").write_bytes((DEMO / "images" / "specimen_004.jpg").read_bytes()[:3000])
    (images / "notes.jpg").write_text("not a photo")
    (images / "empty.png").write_bytes(b"")
    config = {
        "collections": {
            "drawer": {
                "images": str(images),
                "templates": str(DEMO / "templates.json"),
                "template_images": str(DEMO / "images"),
            }
        },
        "model": {"checkpoint": "random", "image_size": 64},
        "propagate": {"shard_size": 2, "cycle_consistency": False},
        "outputs": {"save_overlays": False, "report": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--configfile", "config.yaml", check=False)
    assert result.returncode != 0
    out = tmp_path / "results" / "drawer"
    assert len(list((out / "propagate").glob("shard-*-of-4.jsonl"))) == 4  # every shard ran
    assert not (out / "predictions.json").exists()
    error = [
        line for line in result.stderr.splitlines() if "error in rule merge_predictions" in line
    ]
    assert len(error) == 1, result.stderr[-3000:]
    assert "collection drawer: 3 of 5 images are bad image files (60%" in error[0]
    assert all(name in error[0] for name in ("cut.jpg", "notes.jpg", "empty.png"))
    log = (tmp_path / "logs" / "drawer" / "merge_predictions.log").read_text()
    assert all(
        f"  {name}: cannot read image" in log for name in ("cut.jpg", "notes.jpg", "empty.png")
    )

    config["collections"]["drawer"]["propagate"] = {"max_skipped_fraction": 0.7}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    plan = planned_jobs(snakemake(tmp_path, "--configfile", "config.yaml", "-n").stdout)
    assert "merge_predictions" in plan and "propagate" not in plan
    snakemake(tmp_path, "--configfile", "config.yaml")
    skipped = list(csv.DictReader(open(out / "skipped.csv")))
    assert sorted(r["file_name"] for r in skipped) == ["cut.jpg", "empty.png", "notes.jpg"]
    assert len(COCO(str(out / "predictions.json")).getImgIds()) == 2
