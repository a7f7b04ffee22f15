"""Sharded propagation in the workflow: stable shards, reruns of only the shards that new
images land in (dry-run), no job for device or shard_size edits, no GPU job for
measurement edits, reuse of finished results from any earlier shard layout (never
segmented again), provenance, and identical outputs from two runs."""

from __future__ import annotations

import csv
import filecmp
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from test_workflow import DEMO, planned_jobs, snakemake

from sam2pal.inference import shards
from sam2pal.models.registry import MICRO_SHA256


def test_shard_assignment_is_stable_and_splits_cleanly():
    names = [f"drawer_{i:04d}/specimen.jpg" for i in range(500)]
    assert shards.shard_count(0, 10) == 1 and shards.shard_count(10, 10) == 1
    assert shards.shard_count(11, 10) == 2 and shards.shard_count(500, 10) == 64
    layout = shards.assign(names, 10)
    assert (
        list(layout) == [shards.label(i, 64) for i in range(64)] and layout["00-of-64"] is not None
    )
    assert sorted(n for group in layout.values() for n in group) == sorted(names)
    # order and neighbours do not matter: an image's shard depends on its name only
    assert shards.assign(list(reversed(names)), 10)["07-of-64"] == list(
        reversed(layout["07-of-64"])
    )
    assert (
        shards.assign(names + ["new.jpg"], 10)["07-of-64"] == layout["07-of-64"]
        or shards.shard_index("new.jpg", 64) == 7
    )
    # doubling the count splits each shard into two subsets of it
    doubled = shards.assign(names, 5)
    for index in range(64):
        parent = set(layout[shards.label(index, 64)])
        children = set(doubled[shards.label(index, 128)]) | set(
            doubled[shards.label(index + 64, 128)]
        )
        assert parent == children
    # the shards of any other count that hold a shard's images
    assert shards.overlapping("07-of-64", 32) == ["07-of-32"] and shards.overlapping(
        "07-of-64", 4
    ) == ["3-of-4"]
    assert shards.overlapping("07-of-64", 128) == ["007-of-128", "071-of-128"]
    assert shards.overlapping("1-of-4", 16) == ["01-of-16", "05-of-16", "09-of-16", "13-of-16"]
    assert shards.overlapping("0-of-1", 2) == ["0-of-2", "1-of-2"]
    assert shards.assign(names, 40) == shards.split(names, 16)
    for text, members in shards.split(names, 16).items():
        for count in (1, 2, 8, 64, 128):
            layout = shards.split(names, count)
            overlap = shards.overlapping(text, count)
            assert set(members) <= set().union(*(layout[other] for other in overlap))
            assert not set(members) & set().union(
                *(v for k, v in layout.items() if k not in overlap)
            )
    for bad in ("3-of-3", "4-of-4", "x-of-2", "3-of-16"):
        with pytest.raises(ValueError):
            shards.parse_label(bad)
    # windows-style separators hash like posix ones
    assert shards.shard_index("a\\b.jpg", 64) == shards.shard_index("a/b.jpg", 64)


def _fake_layout(folder, names, count, record_names=True):
    """Result files of a finished layout (records and run files, as the jobs write them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for text, members in shards.split(names, count).items():
        records, run = shards.result_files(folder, text)
        records.write_text(
            "".join(json.dumps({"file_name": n, "structures": []}) + "\n" for n in members)
        )
        run.write_text(
            json.dumps(
                {
                    "shard": text,
                    **({"images_sha256": shards.names_digest(members)} if record_names else {}),
                }
            )
        )


def test_a_finished_layout_is_kept_while_it_holds_or_fits_the_images(tmp_path):
    names = [f"img_{i:03d}.jpg" for i in range(40)]
    folder = tmp_path / "propagate"
    assert shards.choose_count(names, 10, folder) == 4  # nothing there yet
    _fake_layout(folder, names, 4)
    assert shards.layouts(folder).keys() == {4}
    # shard_size changed, same images: the finished layout stays
    assert (
        shards.choose_count(names, 1, folder) == 4 and shards.choose_count(names, 1000, folder) == 4
    )
    assert shards.assign(list(reversed(names)), 1, folder).keys() == shards.split(names, 4).keys()
    # images added: kept while they fit in 4 x shard_size, else the count for the new size
    assert shards.choose_count(names + ["new.jpg"], 11, folder) == 4
    assert shards.choose_count(names + ["new.jpg"], 10, folder) == 8
    assert shards.choose_count(names + ["new.jpg"], 1, folder) == 64
    # a layout with a shard missing is not finished; run files without the names only fit
    (folder / "shard-2-of-4.run.json").unlink()
    assert shards.layouts(folder) == {} and shards.choose_count(names, 1, folder) == 64
    _fake_layout(folder, names, 4, record_names=False)
    assert (
        shards.choose_count(names, 10, folder) == 4 and shards.choose_count(names, 9, folder) == 8
    )
    # of two finished layouts, the newest one counts
    _fake_layout(folder, names, 16)
    assert shards.choose_count(names, 1, folder) == 16


def test_finished_results_are_found_in_any_layout_and_in_done(tmp_path):
    names = [f"img_{i:03d}.jpg" for i in range(40)]
    folder = tmp_path / "propagate"
    _fake_layout(folder, names, 1)
    _fake_layout(folder, names, 16)
    found = shards.reusable_results(folder, "1-of-4")
    assert sorted(Path(r).name for r, _ in found) == sorted(
        ["shard-0-of-1.jsonl"]
        + [f"shard-{t}.jsonl" for t in ("01-of-16", "05-of-16", "09-of-16", "13-of-16")]
    )
    assert all(
        Path(run).name == Path(rec).name.replace(".jsonl", ".run.json") for rec, run in found
    )
    # a finished shard is kept in .done (hard-linked): found after Snakemake removed its
    # output, and not twice while both exist
    shards.keep_done(*shards.result_files(folder, "0-of-1"))
    assert len([r for r, _ in shards.reusable_results(folder, "1-of-4") if "0-of-1" in r]) == 1
    for path in shards.result_files(folder, "0-of-1"):
        path.unlink()
    assert [
        (Path(r).parent.name, Path(r).name)
        for r, _ in shards.reusable_results(folder, "1-of-4")
        if "0-of-1" in r
    ] == [(".done", "shard-0-of-1.jsonl")]
    assert len(shards.reusable_results(folder, "0-of-1")) == 17


def test_a_shard_takes_finished_images_from_any_earlier_layout(tmp_path):
    """A shard of 4 takes its images from the result file of a 1-shard layout (not its
    parent or child) and from its own kept copy after Snakemake removed its output,
    and records who segmented them; a photo modified since is segmented again."""
    from sam2pal.inference import pipeline

    photos = tmp_path / "photos"
    _collection(photos, [f"specimen_{i:03d}.jpg" for i in range(6)])
    names = sorted(p.name for p in photos.iterdir())
    templates = tmp_path / "templates.json"
    pipeline.prepare_templates(
        str(DEMO / "templates.json"), DEMO / "images", templates, max_templates=1
    )
    folder = tmp_path / "propagate"
    common = dict(
        config="sam2.1_hiera_t",
        checkpoint="random",
        image_size=64,
        device="cpu",
        threads=1,
        progress=False,
        log=lambda *_: None,
    )

    def run(text, members):
        outputs = shards.result_files(folder, text)
        counts = pipeline.segment(
            templates,
            photos,
            members,
            *outputs,
            reuse=shards.reusable_results(folder, text),
            run_extra={"shard": text, "images_sha256": shards.names_digest(members)},
            **common,
        )
        shards.keep_done(*outputs)
        return counts, json.loads(outputs[1].read_text())

    counts, first = run("0-of-1", names)
    assert counts["segmented"] == 6 and "reused_from" not in first
    original = {r["file_name"]: r for r in map(json.loads, open(folder / "shard-0-of-1.jsonl"))}
    text, members = max(shards.split(names, 4).items(), key=lambda item: len(item[1]))
    counts, second = run(text, members)
    assert counts["segmented"] == 0 and counts["reused"] == len(members) >= 2
    assert [{k: v for k, v in s.items()} for s in second["reused_from"]] == [
        {**{k: first[k] for k in pipeline.SOURCE_FIELDS}, "images": len(members)}
    ]
    for record in map(json.loads, open(folder / f"shard-{text}.jsonl")):
        assert record.pop("segmented_by")["shard"] == "0-of-1"
        assert record == original[record["file_name"]]

    # rerun in place (Snakemake removes the outputs first), one photo modified since
    for path in shards.result_files(folder, "0-of-1"):
        path.unlink()
    modified = photos / names[0]
    later = (folder / ".done" / "shard-0-of-1.jsonl").stat().st_mtime + 10
    os.utime(modified, (later, later))
    counts, third = run("0-of-1", names)
    assert counts["segmented"] == 1 and counts["reused"] == 5
    assert sum(s["images"] for s in third["reused_from"]) == 5


def _collection(folder, names):
    folder.mkdir(exist_ok=True)
    sources = sorted((DEMO / "images").iterdir())
    for i, name in enumerate(names):
        if not (folder / name).exists():
            shutil.copy(sources[i % len(sources)], folder / name)


def _config(images):
    return {
        "collections": {
            "drawer": {
                "images": str(images),
                "templates": str(DEMO / "templates.json"),
                "template_images": str(DEMO / "images"),
                "px_per_mm": 10.0,
            }
        },
        "model": {"checkpoint": "sam2pal-micro", "image_size": 64},
        "propagate": {"shard_size": 3, "device": "cpu", "threads": 1},
        "outputs": {"save_overlays": False, "save_masks": True, "gallery_size": 3},
    }


def _write(workdir, config, name="config.yaml"):
    (workdir / name).write_text(yaml.safe_dump(config))
    return name


def _planned_shards(stdout: str) -> list[str]:
    return sorted(
        re.findall(
            r"rule propagate:.*?wildcards: collection=drawer, shard=(\S+)", stdout, flags=re.S
        )
    )


# slow: three whole sharded runs (~2 minutes on 2 cores); shard layout, resume and
# merging have quick tests above
@pytest.mark.slow
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
    assert {k: v for k, v in prov.items() if k != "date_created"} == {
        k: v for k, v in info.items() if k != "date_created"
    }
    assert prov["model"]["checkpoint_sha256"] == MICRO_SHA256 and prov["model"]["image_size"] == 64
    assert prov["model"]["config_sha256"] and prov["seeds"]["model"] == 0
    assert (
        prov["config"]["propagate"]["fill_hole_area"] == 8
        and prov["config"]["model"]["image_size"] == 64
    )
    assert "threads" not in prov["config"]["propagate"]
    assert prov["templates"]["sha256"] and prov["adapter"] is None
    assert {"torch", "sam2", "numpy", "sam2pal"} <= set(prov["versions"])
    assert len(prov["workflow"]["git_commit"] or "x" * 40) == 40
    assert (
        prov["started"] <= prov["finished"]
        and prov["hosts"]
        and prov["devices"][0].startswith("cpu")
    )
    assert (
        sorted(r["shard"] for r in prov["runs"]) == sorted(layout)
        and prov["counts"]["segmented"] == 8
    )

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
    gallery = sorted(
        p.name for p in (other / "report" / "gallery").iterdir() if not p.name.startswith(".")
    )
    assert [g.split("_")[0] for g in gallery] == ["random"] * 3 + ["worst"] * 3  # 3 of each
    assert gallery[3].startswith(
        "worst_01_" + Path(list(csv.DictReader(open(other / "qc.csv")))[0]["file_name"]).stem
    )
    snakemake(runs["b"][0], "--configfile", "config.yaml", "--report", "report.html")
    html = (runs["b"][0] / "report.html").read_text(errors="replace")
    for name in (
        "qc_scores.png",
        "qc_worst.csv",
        "measurements.png",
        "provenance.json",
        "worst_01_",
    ):
        assert name in html, name

    # a measurement setting, threads or memory: no segmentation job, no merge
    assert "Nothing to be done" in snakemake(workdir, "--configfile", "config.yaml", "-n").stdout
    edited = json.loads(json.dumps(config))
    edited["collections"]["drawer"]["px_per_mm"] = 12.0
    edited["propagate"].update(threads=2, mem_mb=4000, runtime=60)
    plan = planned_jobs(
        snakemake(workdir, "--configfile", _write(workdir, edited, "edited.yaml"), "-n").stdout
    )
    assert plan == {"measure", "report_figures", "all"}, plan

    # the device or shard_size (smaller or larger): nothing at all (the shards are kept)
    for change in ({"device": "auto", "shard_size": 1}, {"shard_size": 100}):
        edited = json.loads(json.dumps(config))
        edited["propagate"].update(change)
        dry = snakemake(
            workdir, "--configfile", _write(workdir, edited, "device_shards.yaml"), "-n"
        ).stdout
        assert "Nothing to be done" in dry, (change, dry[-2000:])

    # an added image reruns its own shard only, then the merge and what follows it; that
    # shard segments the new image only
    _collection(workdir / "photos", names + ["added_a.jpg"])
    dry = snakemake(workdir, "--configfile", "config.yaml", "-n").stdout
    assert (
        _planned_shards(dry)
        == [shards.label(shards.shard_index("added_a.jpg", 4), 4)]
        == ["0-of-4"]
    )
    assert planned_jobs(dry) >= {"propagate", "merge_predictions", "qc", "measure", "export_masks"}
    snakemake(workdir, "--configfile", "config.yaml")
    rerun = json.loads((out / "propagate" / "shard-0-of-4.run.json").read_text())
    assert (
        rerun["counts"]["segmented"] == 1
        and rerun["counts"]["reused"] == len(layout["0-of-4"]) >= 1
    )
    assert rerun["tone"]["tone"] == "auto"  # the default; whether it lifts is the photos' matter
    assert isinstance(rerun["tone"]["lifts_dark_tones"], bool)
    before = {
        r["file_name"]: r
        for label in layout
        for r in map(json.loads, open(out / "propagate" / f"shard-{label}.jsonl"))
    }
    assert len(before) == 9

    # past 4 x shard_size images (a smaller shard_size, images added) the layout changes:
    # all 8 shards run, but take the finished images from the earlier shards
    more = ["added_b.jpg", "added_c.jpg", "added_d.jpg", "added_e.jpg"]
    _collection(workdir / "photos", names + ["added_a.jpg"] + more)
    smaller = json.loads(json.dumps(config))
    smaller["propagate"]["shard_size"] = 2
    assert (
        len(
            _planned_shards(
                snakemake(
                    workdir, "--configfile", _write(workdir, smaller, "smaller.yaml"), "-n"
                ).stdout
            )
        )
        == 8
    )
    snakemake(workdir, "--configfile", "smaller.yaml")
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["counts"]["reused"] == 9 and prov["counts"]["segmented"] == 4, prov["counts"]
    # provenance names the earlier shards that segmented the reused images
    earlier = [source for run in prov["runs"] for source in run["reused_from"]]
    assert sum(s["images"] for s in earlier) == 9 and {s["shard"] for s in earlier} <= set(layout)
    assert all(s["host"] in prov["hosts"] and s["finished"] for s in earlier)
    after = {
        r["file_name"]: r
        for label in shards.split(names + ["added_a.jpg"] + more, 8)
        for r in map(json.loads, open(out / "propagate" / f"shard-{label}.jsonl"))
    }
    assert all(
        {k: v for k, v in after[name].items() if k != "segmented_by"}
        == {k: v for k, v in record.items() if k != "segmented_by"}
        for name, record in before.items()
    )
    with open(out / "qc.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 13
    # back to the first shard_size: the 8 shards are kept, nothing to do
    assert "Nothing to be done" in snakemake(workdir, "--configfile", "config.yaml", "-n").stdout
