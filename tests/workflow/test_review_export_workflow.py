"""The workflow's review rule: results/<collection>/review/ when asked for, or in every
run with review.enabled; its settings from the config (per collection too)."""

from __future__ import annotations

import csv
import json

import yaml
from review_tools import make_results
from test_workflow import planned_jobs, snakemake


def write_config(workdir, collection: dict, review: dict | None = None, own: dict | None = None):
    entry = {"images": str(collection["images"]), "templates": str(collection["templates"])}
    if own:
        entry["review"] = own
    config = {"collections": {"beetles": entry}, "model": {"checkpoint": "random"}}
    if review is not None:
        config["review"] = review
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def collection_in(workdir) -> dict:
    """A results folder at results/beetles/, as a finished run leaves it."""
    made = make_results(workdir / "made")
    results = workdir / "results" / "beetles"
    results.parent.mkdir(parents=True)
    made["results"].rename(results)
    made["templates"] = results / "templates.json"
    return made


def test_review_is_made_when_enabled_or_asked_for(tmp_path):
    collection = collection_in(tmp_path)
    write_config(tmp_path, collection)
    plan = snakemake(tmp_path, "--configfile", "config.yaml", "-n", "--forceall").stdout
    assert "review_export" not in planned_jobs(plan)
    write_config(tmp_path, collection, review={"enabled": True})
    plan = snakemake(tmp_path, "--configfile", "config.yaml", "-n", "--forceall").stdout
    assert "review_export" in planned_jobs(plan)
    # once corrections come back, the sample they belong to is not drawn again
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    (tmp_path / "corrections.json").write_text("[]")
    config["collections"]["beetles"]["corrections"] = "corrections.json"
    (tmp_path / "corrected.yaml").write_text(yaml.safe_dump(config))
    plan = snakemake(tmp_path, "--configfile", "corrected.yaml", "-n", "--forceall").stdout
    assert "apply_corrections" in planned_jobs(plan)
    assert "review_export" not in planned_jobs(plan)

    # the rule alone, on the results already there
    write_config(tmp_path, collection, review={"top": 2, "random": 3}, own={"formats": ["cvat"]})
    # (the target first: --configfile and --allowed-rules take several values)
    snakemake(
        tmp_path,
        "results/beetles/review",
        "--configfile",
        "config.yaml",
        "--allowed-rules",
        "review_export",
    )
    review = tmp_path / "results" / "beetles" / "review"
    rows = list(csv.DictReader(open(review / "review_sample.csv")))
    assert [r["selected_by"] for r in rows] == ["worst"] * 2 + ["random"] * 3
    assert [r["file_name"] for r in rows[:2]] == collection["names"][:2]
    assert (review / "cvat" / "task.zip").is_file() and not (review / "labelstudio").exists()
    log = (tmp_path / "logs" / "beetles" / "review_export.log").read_text()
    assert "2 worst and 3 random images (seed 0)" in log
    assert json.loads((review / "cvat" / "labels.json").read_text())[0]["name"] == "head"


def test_bad_review_settings_are_refused(tmp_path):
    collection = collection_in(tmp_path)
    write_config(tmp_path, collection, own={"formats": ["png"]})
    result = snakemake(tmp_path, "--configfile", "config.yaml", "-n", check=False)
    assert result.returncode != 0
    message = "collections.beetles.review: formats.0: 'png' is not one of"
    assert message in result.stdout + result.stderr
