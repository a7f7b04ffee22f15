"""Sharded propagation in the workflow: stable shards, reruns of only the shards that new
images land in (dry-run), no GPU job for measurement edits, reuse of finished results
when the shard count doubles, provenance, and identical outputs from two runs."""

from __future__ import annotations

import csv
import filecmp
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from sam2pal import shards
from sam2pal.registry import MICRO_SHA256
from test_workflow import DEMO, planned_jobs, snakemake


def test_shard_assignment_is_stable_and_splits_cleanly():
    names = [f"drawer_{i:04d}/specimen.jpg" for i in range(500)]
    assert shards.shard_count(0, 10) == 1 and shards.shard_count(10, 10) == 1
    assert shards.shard_count(11, 10) == 2 and shards.shard_count(500, 10) == 64
    layout = shards.assign(names, 10)
    assert list(layout) == [shards.label(i, 64) for i in range(64)] and layout["00-of-64"] is not None
    assert sorted(n for group in layout.values() for n in group) == sorted(names)
    # order and neighbours do not matter: an image's shard depends on its name only
    assert shards.assign(list(reversed(names)), 10)["07-of-64"] == list(reversed(layout["07-of-64"]))
    assert shards.assign(names + ["new.jpg"], 10)["07-of-64"] == layout["07-of-64"] or \
        shards.shard_index("new.jpg", 64) == 7
    # doubling the count splits each shard into two subsets of it
    doubled = shards.assign(names, 5)
    for index in range(64):
        parent = set(layout[shards.label(index, 64)])
        children = set(doubled[shards.label(index, 128)]) | set(doubled[shards.label(index + 64, 128)])
        assert parent == children
    assert shards.related_shards("07-of-64") == ["07-of-32", "007-of-128", "071-of-128"]
    assert shards.related_shards("0-of-1") == ["0-of-2", "1-of-2"]
    for bad in ("3-of-3", "4-of-4", "x-of-2"):
        with pytest.raises(ValueError):
            shards.parse_label(bad)
    # windows-style separators hash like posix ones
    assert shards.shard_index("a\\b.jpg", 64) == shards.shard_index("a/b.jpg", 64)


def _collection(folder, names):
    folder.mkdir(exist_ok=True)
    sources = sorted((DEMO / "images").iterdir())
    for i, name in enumerate(names):
        if not (folder / name).exists():
            shutil.copy(sources[i % len(sources)], folder / name)


def _config(images):
    return {
        "collections": {"drawer": {"images": str(images), "templates": str(DEMO / "templates.json"),
                                   "template_images": str(DEMO / "images"), "px_per_mm": 10.0}},
        "model": {"checkpoint": "sam2pal-micro", "image_size": 64},
        "propagate": {"shard_size": 3, "device": "cpu", "threads": 1},
        "outputs": {"save_overlays": False, "save_masks": True, "gallery_size": 3},
    }


def _write(workdir, config, name="config.yaml"):
    (workdir / name).write_text(yaml.safe_dump(config))
    return name


def _planned_shards(stdout: str) -> list[str]:
    return sorted(re.findall(r"rule propagate:.*?wildcards: collection=drawer, shard=(\S+)", stdout, flags=re.S))


def test_sharded_runs_reruns_provenance_and_determinism(tmp_path):
    names = [f"specimen_{i:03d}.jpg" for i in range(8)]
    runs = {}
    for run in ("a", "b"):
        workdir = tmp_path / run
        workdir.mkdir()
        _collection(workdir / "photos", names)
        config = _config(workdir / "photos")
        snakemake(workdir, "--configfile", _write(workdir, config))
        runs[run] = (workdir, config)
    workdir, config = runs["a"]
    out = workdir / "results" / "drawer"

    # 8 images, shard_size 3: four shards, each its own job with its own log
    layout = shards.assign(names, 3)
    assert len(layout) == 4
    for label, members in layout.items():
        records = [json.loads(line) for line in open(out / "propagate" / f"shard-{label}.jsonl")]
        assert [r["file_name"] for r in records] == sorted(members)
        log = (workdir / "logs" / "drawer" / "propagate" / f"shard-{label}.log").read_text()
        # a progress line per update (not carriage-return redraws)
        assert f"segment shard-{label}: 100%" in log and "\r" not in log

    # provenance: in provenance.json and in the COCO info
    prov = json.loads((out / "provenance.json").read_text())
    info = json.loads((out / "predictions.json").read_text())["info"]
    assert {k: v for k, v in prov.items() if k != "date_created"} == \
        {k: v for k, v in info.items() if k != "date_created"}
    assert prov["model"]["checkpoint_sha256"] == MICRO_SHA256 and prov["model"]["image_size"] == 64
    assert prov["model"]["config_sha256"] and prov["seeds"]["model"] == 0
    assert prov["config"]["propagate"]["fill_hole_area"] == 8 and prov["config"]["model"]["image_size"] == 64
    assert "threads" not in prov["config"]["propagate"]
    assert prov["templates"]["sha256"] and prov["adapter"] is None
    assert {"torch", "sam2", "numpy", "sam2pal"} <= set(prov["versions"])
    assert len(prov["workflow"]["git_commit"] or "x" * 40) == 40
    assert prov["started"] <= prov["finished"] and prov["hosts"] and prov["devices"][0].startswith("cpu")
    assert sorted(r["shard"] for r in prov["runs"]) == sorted(layout) and prov["counts"]["segmented"] == 8

    # the same config run twice on CPU gives identical outputs
    other = runs["b"][0] / "results" / "drawer"
    for name in ("measurements.csv", "measurements_wide.csv", "qc.csv", "skipped.csv"):
        assert filecmp.cmp(out / name, other / name, shallow=False), name
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert masks and masks == sorted(p.name for p in (other / "masks").iterdir())
    assert all(filecmp.cmp(out / "masks" / m, other / "masks" / m, shallow=False) for m in masks)
    a, b = (json.loads((d / "predictions.json").read_text()) for d in (out, other))
    assert a["images"] == b["images"] and a["annotations"] == b["annotations"]
    assert a["info"]["model"]["checkpoint_sha256"] == b["info"]["model"]["checkpoint_sha256"]

    # the HTML report of a finished run: QC, gallery, measurements, provenance
    gallery = sorted(p.name for p in (other / "report" / "gallery").iterdir() if not p.name.startswith("."))
    assert [g.split("_")[0] for g in gallery] == ["random"] * 3 + ["worst"] * 3  # 3 of each
    assert gallery[3].startswith("worst_01_" + Path(list(csv.DictReader(open(other / "qc.csv")))[0]["file_name"]).stem)
    snakemake(runs["b"][0], "--configfile", "config.yaml", "--report", "report.html")
    html = (runs["b"][0] / "report.html").read_text(errors="replace")
    for name in ("qc_scores.png", "qc_worst.csv", "measurements.png", "provenance.json", "worst_01_"):
        assert name in html, name

    # a measurement setting, threads or memory: no segmentation job, no merge
    assert "Nothing to be done" in snakemake(workdir, "--configfile", "config.yaml", "-n").stdout
    edited = json.loads(json.dumps(config))
    edited["collections"]["drawer"]["px_per_mm"] = 12.0
    edited["propagate"].update(threads=2, mem_mb=4000, runtime=60)
    plan = planned_jobs(snakemake(workdir, "--configfile", _write(workdir, edited, "edited.yaml"), "-n").stdout)
    assert plan == {"measure", "report_figures", "all"}, plan

    # an added image reruns its own shard only, then the merge and what follows it
    _collection(workdir / "photos", names + ["added_a.jpg"])
    dry = snakemake(workdir, "--configfile", "config.yaml", "-n").stdout
    assert _planned_shards(dry) == [shards.label(shards.shard_index("added_a.jpg", 4), 4)] == ["0-of-4"]
    assert planned_jobs(dry) >= {"propagate", "merge_predictions", "qc", "measure", "export_masks"}
    snakemake(workdir, "--configfile", "config.yaml")
    before = {r["file_name"]: r for label in layout
              for r in map(json.loads, open(out / "propagate" / f"shard-{label}.jsonl"))}
    assert len(before) == 9

    # past 4 x 3 images the count doubles: all 8 shards run, but reuse the finished images
    more = ["added_b.jpg", "added_c.jpg", "added_d.jpg", "added_e.jpg"]
    _collection(workdir / "photos", names + ["added_a.jpg"] + more)
    assert len(_planned_shards(snakemake(workdir, "--configfile", "config.yaml", "-n").stdout)) == 8
    snakemake(workdir, "--configfile", "config.yaml")
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["counts"]["reused"] == 9 and prov["counts"]["segmented"] == 4, prov["counts"]
    after = {r["file_name"]: r for label in shards.assign(names + ["added_a.jpg"] + more, 3)
             for r in map(json.loads, open(out / "propagate" / f"shard-{label}.jsonl"))}
    assert all(after[name] == record for name, record in before.items())
    with open(out / "qc.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 13
