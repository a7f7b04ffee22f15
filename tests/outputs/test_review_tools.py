"""The review export read by the real tools: a Label Studio server started here makes a
project of it, serves its photos, keeps its predictions, takes a reviewer's annotation
and exports the project (JSON and COCO); Datumaro, the library CVAT imports and exports
with, reads the CVAT package as COCO 1.0.

Both need the tools' venvs (`make review-tools`, built by the first test when missing:
several minutes). Marked `tools` and `slow`: `pytest -m tools`.
"""

from __future__ import annotations

import csv
import json
import time
import zipfile

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from review_tools import (
    CATEGORIES,
    HEIGHT,
    WIDTH,
    datumaro_summary,
    labelstudio_round_trip,
    make_results,
)

from sam2pal.io.masks import mask_iou
from sam2pal.io.records import read_records
from sam2pal.outputs.corrections import REVIEWED_RECORDS, import_corrections
from sam2pal.outputs.review import export_review

pytestmark = [pytest.mark.slow, pytest.mark.tools]


def rasterise(points: list, height: int, width: int) -> np.ndarray:
    rles = mask_utils.frPyObjects([list(map(float, points))], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def percent_mask(result: dict) -> np.ndarray:
    points = np.array(result["value"]["points"]) / 100 * [WIDTH, HEIGHT]
    return rasterise(points.reshape(-1).tolist(), HEIGHT, WIDTH)


def structures_of(results: list) -> dict:
    """{(structure, instance): mask} of Label Studio polygon results."""
    found = {}
    for r in results:
        key = (r["value"]["polygonlabels"][0], r["meta"]["text"][0])
        found[key] = found.get(key, np.zeros((HEIGHT, WIDTH), bool)) | percent_mask(r)
    return found


def test_label_studio_takes_the_project_and_exports_the_corrections(tmp_path):
    collection = make_results(tmp_path / "collection")
    review = tmp_path / "review"
    sample = export_review(
        collection["results"], collection["images"], review, 2, 2, formats=["labelstudio"]
    )
    shift = 6
    target = sample[1].file_name  # (the worst, img03, has no right antenna)

    def correct(task):
        """The reviewer moves the head of one photo and deletes its left antenna."""
        if task["data"]["file_name"] != target:
            return None
        result = []
        for r in task["predictions"][0]["result"]:
            if r["value"]["polygonlabels"] == ["antenna"] and r["meta"]["text"] == ["instance 1"]:
                continue
            r = {k: v for k, v in r.items() if k not in ("score",)}
            if r["value"]["polygonlabels"] == ["head"]:
                points = [[x + shift / WIDTH * 100, y] for x, y in r["value"]["points"]]
                r["value"] = dict(r["value"], points=points)
            result.append(r)
        return result

    started = time.monotonic()
    done = labelstudio_round_trip(review, tmp_path / "ls", correct)
    print(f"label studio: {done['seconds']} s; whole test {time.monotonic() - started:.0f} s")

    tasks = {t["data"]["file_name"]: t for t in done["tasks"]}
    assert list(tasks) == [s.file_name for s in sample]
    for name, task in tasks.items():
        status, content = task["served"]
        assert status == 200 and content == (collection["images"] / name).read_bytes()
        (prediction,) = task["predictions"]
        assert prediction["model_version"].startswith("sam2pal ")
        got = structures_of(prediction["result"])
        expected = collection["masks"][name]
        assert {(CATEGORIES[c], f"instance {i}") for c, i in expected} == set(got)
        for (cid, inst), mask in expected.items():
            assert mask_iou(got[(CATEGORIES[cid], f"instance {inst}")], mask) > 0.95

    # as from Label Studio's Export button: the annotated tasks
    exported = json.loads(done["json"].read_text())
    by_name = {t["data"]["file_name"]: t for t in exported}
    assert set(by_name) == {target}
    first = by_name[target]
    (annotation,) = first["annotations"]
    assert not annotation["was_cancelled"] and annotation["created_at"]
    corrected = structures_of(annotation["result"])
    assert set(corrected) == {("head", "instance 1"), ("antenna", "instance 2")}
    moved = np.roll(collection["masks"][target][(1, 1)], shift, axis=1)
    assert mask_iou(corrected[("head", "instance 1")], moved) > 0.95
    assert len(first["predictions"]) == 1  # (by id in this export)

    with zipfile.ZipFile(done["coco"]) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".json")]
        coco = json.loads(archive.read(name))
    assert {c["name"] for c in coco["categories"]} == set(CATEGORIES.values())
    assert len(coco["annotations"]) == 2

    # and back into the results: Label Studio's JSON export, then its COCO export
    (tmp_path / "ls_coco.json").write_bytes(json.dumps(coco).encode())
    for export in (done["json"], tmp_path / "ls_coco.json"):
        counts = import_corrections(
            collection["results"], [export], review_dir=review, log=lambda *_: None
        )
        assert counts["corrected"] == 1
        records = {r.file_name: r for r in read_records(collection["results"] / REVIEWED_RECORDS)}
        found = {s.key: s for s in records[target].structures if s.area}
        assert set(found) == {(1, 1), (2, 2)}  # the left antenna deleted
        head = found[(1, 1)]
        assert head.corrected["source"] == str(export)
        assert mask_iou(mask_utils.decode(head.segmentation).astype(bool), moved) > 0.95
        untouched = records[sample[0].file_name].structures
        assert all(s.corrected is None for s in untouched)
        summary = list(csv.DictReader(open(collection["results"] / "review_summary.csv")))
        # the reviewed photo was among the worst: reported apart, not as the estimate
        assert {r["sample"] for r in summary} == {"worst"}


def test_datumaro_reads_the_cvat_package(tmp_path):
    collection = make_results(tmp_path / "collection")
    review = tmp_path / "review"
    sample = export_review(
        collection["results"], collection["images"], review, 3, 3, formats=["cvat"]
    )
    package = tmp_path / "package"
    with zipfile.ZipFile(review / "cvat" / "task.zip") as archive:
        archive.extractall(package)
    started = time.monotonic()
    summary = datumaro_summary(package)
    print(f"datumaro: {time.monotonic() - started:.1f} s")

    assert summary["labels"] == list(CATEGORIES.values())
    items = {item["id"]: item for item in summary["items"]}
    assert set(items) == {s.file_name.rsplit(".", 1)[0] for s in sample}
    for s in sample:
        item = items[s.file_name.rsplit(".", 1)[0]]
        assert item["size"] == [HEIGHT, WIDTH]
        expected = collection["masks"][s.file_name]
        found = {}
        for ann in item["annotations"]:
            key = (
                {v: k for k, v in CATEGORIES.items()}[ann["label"]],
                ann["attributes"]["instance"],
            )
            found[key] = found.get(key, 0) + ann["area"]
            mask = rasterise(ann["points"], HEIGHT, WIDTH)
            assert mask_iou(mask & expected[key], mask) > 0.95
        assert set(found) == set(expected)
        for key, area in found.items():
            assert area == pytest.approx(expected[key].sum())
