"""Review export (sam2pal.outputs.review): the sample, the polygons, the Label Studio
and CVAT files, on a results folder written with the project's own writers."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from review_tools import CATEGORIES, HEIGHT, WIDTH, antenna_mask, head_mask, make_results

from sam2pal.cli import main
from sam2pal.errors import InputError
from sam2pal.io.masks import mask_iou
from sam2pal.outputs.review import (
    export_review,
    mask_outlines,
    polygon_area,
    read_qc_ranking,
    select_sample,
)


def rasterise(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


@pytest.fixture()
def collection(tmp_path):
    return make_results(tmp_path)


def read_sample(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -- selection ------------------------------------------------------------------------


def test_sample_is_the_worst_and_a_seeded_random_draw_without_templates(collection, tmp_path):
    out = tmp_path / "review"
    export_review(collection["results"], collection["images"], out, 3, 4, seed=7, formats=["cvat"])
    rows = read_sample(out / "review_sample.csv")
    assert list(rows[0]) == ["file_name", "selected_by", "qc_rank", "qc_score", "seed"]
    worst = [r["file_name"] for r in rows if r["selected_by"] == "worst"]
    drawn = [r["file_name"] for r in rows if r["selected_by"] == "random"]
    # bad.jpg (unreadable) ranks first in qc.csv but cannot be reviewed
    assert worst == collection["names"][:3] == ["img03.jpg", "img00.jpg", "img01.jpg"]
    assert len(drawn) == 4 and not set(drawn) & set(worst)
    assert "template.jpg" not in worst + drawn and "bad.jpg" not in drawn
    assert {r["seed"] for r in rows} == {"7"}
    ranking = {r["file_name"]: r for r in read_qc_ranking(collection["results"] / "qc.csv")}
    for row in rows:
        assert int(row["qc_rank"]) == ranking[row["file_name"]]["rank"]
        assert float(row["qc_score"]) == pytest.approx(ranking[row["file_name"]]["qc_score"])

    again = tmp_path / "again"
    export_review(
        collection["results"], collection["images"], again, 3, 4, seed=7, formats=["cvat"]
    )
    assert read_sample(again / "review_sample.csv") == rows
    other = tmp_path / "other"
    samples = set()
    for seed in range(5):
        export_review(
            collection["results"], collection["images"], other, 3, 4, seed=seed, formats=["cvat"]
        )
        samples.add(tuple(r["file_name"] for r in read_sample(other / "review_sample.csv")))
    assert len(samples) > 1  # the seed draws another sample


def test_a_sample_larger_than_the_collection_is_cut_with_a_message():
    ranking = [
        {"rank": i + 1, "file_name": f"{i}.jpg", "status": "ok", "qc_score": i / 10}
        for i in range(5)
    ]
    ranking.insert(0, {"rank": 0, "file_name": "x.jpg", "status": "skipped", "qc_score": None})
    notes = []
    sample = select_sample(ranking, {"4.jpg"}, 3, 5, 0, notes.append)
    assert [(s.file_name, s.selected_by) for s in sample] == [
        ("0.jpg", "worst"),
        ("1.jpg", "worst"),
        ("2.jpg", "worst"),
        ("3.jpg", "random"),
    ]
    assert "4 images can be reviewed" in notes[0] and "taking 3 worst and 1 random" in notes[0]


# -- polygons -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["blob", "thin", "pieces"])
def test_outlines_rasterise_back_to_the_mask(shape):
    if shape == "blob":
        mask = head_mask()
    elif shape == "thin":
        mask = antenna_mask(1)
    else:  # two pieces, one a single pixel, touching another at a corner
        mask = antenna_mask(2)
        mask[80, 10] = mask[81, 11] = True
    outlines = mask_outlines(mask)
    assert len(outlines) == {"blob": 1, "thin": 1, "pieces": 2}[shape]
    back = rasterise([o.reshape(-1).tolist() for o in outlines], HEIGHT, WIDTH)
    assert mask_iou(back, mask) > 0.95
    # the outline runs along the pixels' edges: its area is the pixel count
    assert sum(polygon_area(o) for o in outlines) == pytest.approx(mask.sum())


def test_outlines_fill_holes():
    mask = np.zeros((40, 40), np.uint8)
    cv2.circle(mask, (20, 20), 15, 1, -1)
    cv2.circle(mask, (20, 20), 5, 0, -1)
    filled = np.zeros((40, 40), np.uint8)
    cv2.circle(filled, (20, 20), 15, 1, -1)
    (outline,) = mask_outlines(mask.astype(bool))
    assert mask_iou(rasterise([outline.reshape(-1).tolist()], 40, 40), filled.astype(bool)) > 0.99


# -- Label Studio ---------------------------------------------------------------------


def test_labelstudio_tasks_and_config(collection, tmp_path):
    out = tmp_path / "review"
    sample = export_review(
        collection["results"], collection["images"], out, 2, 2, formats=["labelstudio"]
    )
    config = ElementTree.parse(out / "labelstudio" / "labeling_config.xml").getroot()
    assert config.tag == "View"
    assert config.find("Image").attrib["value"] == "$image"
    tool = config.find("PolygonLabels")
    assert tool.attrib == {"name": "label", "toName": "image"}
    assert [label.attrib["value"] for label in tool] == list(CATEGORIES.values())
    assert all(label.attrib["background"].startswith("#") for label in tool)

    tasks = json.loads((out / "labelstudio" / "tasks.json").read_text())
    assert [t["data"]["file_name"] for t in tasks] == [s.file_name for s in sample]
    # the sample's overlays, drawn as the collection's, to glance through first
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(
        Path(s.file_name).stem + ".jpg" for s in sample
    )
    for task, selected in zip(tasks, sample, strict=True):
        name = task["data"]["file_name"]
        assert task["data"]["image"] == f"/data/local-files/?d=images/{name}"
        assert (out / "images" / name).read_bytes() == (collection["images"] / name).read_bytes()
        (prediction,) = task["predictions"]
        assert prediction["model_version"].startswith("sam2pal ")
        assert prediction["score"] == pytest.approx(selected.qc_score, abs=1e-4)
        masks = {}
        for result in prediction["result"]:
            assert result["type"] == "polygonlabels"
            assert (result["from_name"], result["to_name"]) == ("label", "image")
            assert (result["original_width"], result["original_height"]) == (WIDTH, HEIGHT)
            assert result["value"]["closed"] is True
            (label,) = result["value"]["polygonlabels"]
            (text,) = result["meta"]["text"]
            instance = int(text.removeprefix("instance "))
            key = ({v: k for k, v in CATEGORIES.items()}[label], instance)
            points = np.array(result["value"]["points"]) / 100 * [WIDTH, HEIGHT]
            piece = rasterise([points.reshape(-1).tolist()], HEIGHT, WIDTH)
            masks[key] = masks.get(key, np.zeros_like(piece)) | piece
        assert len({r["id"] for r in prediction["result"]}) == len(prediction["result"])
        expected = collection["masks"][name]
        assert set(masks) == set(expected)  # img03's missing antenna is not there
        for key, mask in expected.items():
            assert mask_iou(masks[key], mask) > 0.95, (name, key)


# -- CVAT -----------------------------------------------------------------------------


def test_cvat_package_is_coco_with_the_predictions(collection, tmp_path):
    out = tmp_path / "review"
    sample = export_review(collection["results"], collection["images"], out, 2, 3, formats=["cvat"])
    assert not (out / "images").exists() and not (out / "labelstudio").exists()
    with zipfile.ZipFile(out / "cvat" / "task.zip") as archive:
        names = set(archive.namelist())
        assert names == {"annotations/instances_default.json"} | {
            f"images/{s.file_name}" for s in sample
        }
        data = json.loads(archive.read("annotations/instances_default.json"))
        for s in sample:
            assert (
                archive.read(f"images/{s.file_name}")
                == (collection["images"] / s.file_name).read_bytes()
            )
    (out / "instances.json").write_text(json.dumps(data))
    coco = COCO(str(out / "instances.json"))
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == CATEGORIES
    labels = json.loads((out / "cvat" / "labels.json").read_text())
    assert [label["name"] for label in labels] == list(CATEGORIES.values())
    assert "COCO 1.0" in (out / "cvat" / "README.txt").read_text()
    for image in coco.loadImgs(coco.getImgIds()):
        expected = collection["masks"][image["file_name"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        found = {(a["category_id"], a["attributes"]["instance"]): a for a in anns}
        assert set(found) == set(expected)
        for key, ann in found.items():
            mask = coco.annToMask(ann).astype(bool)
            assert mask_iou(mask, expected[key]) > 0.95
            assert ann["area"] == pytest.approx(expected[key].sum())
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"], list)


def test_formats_share_one_sample_and_a_new_sample_replaces_the_folder(collection, tmp_path):
    out = tmp_path / "review"
    export_review(collection["results"], collection["images"], out, 2, 2, formats=["labelstudio"])
    export_review(collection["results"], collection["images"], out, 2, 2, formats=["cvat"])
    assert (out / "labelstudio" / "tasks.json").exists() and (out / "cvat" / "task.zip").exists()
    notes = []
    export_review(
        collection["results"], collection["images"], out, 1, 1, formats=["cvat"], log=notes.append
    )
    assert not (out / "labelstudio").exists() and not (out / "images").exists()
    assert any("another sample" in n for n in notes)


# -- errors and the command line ------------------------------------------------------


def test_bad_inputs_are_one_line_errors(collection, tmp_path):
    results, images = collection["results"], collection["images"]
    with pytest.raises(InputError, match="unknown review format png"):
        export_review(results, images, tmp_path / "r", 1, 1, formats=["png"])
    with pytest.raises(InputError, match="nothing to review"):
        export_review(results, images, tmp_path / "r", 0, 0)
    (results / "qc.csv").rename(tmp_path / "qc.csv")
    with pytest.raises(InputError, match=r"qc.csv: qc.csv not found"):
        export_review(results, images, tmp_path / "r", 1, 1)
    (tmp_path / "qc.csv").rename(results / "qc.csv")
    for name, message in (
        ("predictions.json", "predictions file not found"),
        ("templates.json", "template file not found"),
    ):
        (results / name).rename(tmp_path / name)
        with pytest.raises(InputError, match=f"{name}: {message}"):
            export_review(results, images, tmp_path / "r", 1, 1)
        (tmp_path / name).rename(results / name)
    assert not (tmp_path / "r").exists()
    # the worst image's photo is gone: nothing is written
    (images / "img03.jpg").rename(tmp_path / "img03.jpg")
    with pytest.raises(InputError, match=r"img03.jpg: photo of the review sample not found"):
        export_review(results, images, tmp_path / "r", 1, 1)
    assert not (tmp_path / "r").exists()
    (tmp_path / "img03.jpg").rename(images / "img03.jpg")
    # a folder with other files is not taken for a review folder (it would be replaced)
    with pytest.raises(InputError, match="not empty and not a review folder"):
        export_review(results, images, results, 1, 1)


def test_cli_review_export(collection, tmp_path, capsys):
    out = tmp_path / "review"
    before = {p: p.read_bytes() for p in collection["results"].iterdir()}
    code = main(
        [
            "review",
            "export",
            "--results",
            str(collection["results"]),
            "--image_dir",
            str(collection["images"]),
            "--top",
            "2",
            "--random",
            "2",
            "--seed",
            "3",
            "--format",
            "labelstudio",
            "cvat",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "2 worst and 2 random images (seed 3)" in capsys.readouterr().out
    assert (out / "labelstudio" / "tasks.json").exists() and (out / "cvat" / "task.zip").exists()
    assert {p: p.read_bytes() for p in collection["results"].iterdir()} == before
    code = main(
        ["review", "export", "--results", str(tmp_path), "--image_dir", str(tmp_path)]
        + ["--top", "1", "--random", "0", "--format", "cvat", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "qc.csv not found" in err


def test_exported_polygons_keep_a_mask_in_several_pieces(tmp_path):
    # one instance in two pieces: two Label Studio results with the same name and instance
    from sam2pal.outputs.review import ImagePrediction, Selected, labelstudio_task

    mask = np.zeros((20, 30), bool)
    mask[2:6, 2:8] = mask[10:15, 20:28] = True
    prediction = ImagePrediction(
        {"file_name": "x.jpg", "width": 30, "height": 20}, [(1, 2, mask_outlines(mask))]
    )
    task = labelstudio_task(
        prediction,
        {1: "leg"},
        "/data/local-files/?d=x.jpg",
        Selected("x.jpg", "random", 4, None),
        "v",
    )
    results = task["predictions"][0]["result"]
    assert "score" not in task["predictions"][0]
    assert len(results) == 2
    assert {r["meta"]["text"][0] for r in results} == {"instance 2"}
    assert {r["value"]["polygonlabels"][0] for r in results} == {"leg"}


def test_photos_a_browser_cannot_show_go_to_label_studio_as_png(tmp_path):
    from PIL import Image

    from sam2pal.outputs.review import ImagePrediction, Selected, place_photos, write_labelstudio

    photos, review = tmp_path / "photos", tmp_path / "review"
    photos.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(photos / "a.tif")
    Image.fromarray(rgb).save(photos / "b.jpg")
    (review / "images").mkdir(parents=True)
    (review / "images" / "old.jpg").write_bytes(b"from another sample")
    place_photos(review / "images", photos, ["a.tif", "b.jpg"])
    assert sorted(p.name for p in (review / "images").iterdir()) == ["a.tif.png", "b.jpg"]
    assert np.array_equal(np.array(Image.open(review / "images" / "a.tif.png")), rgb)
    assert (review / "images" / "b.jpg").read_bytes() == (photos / "b.jpg").read_bytes()

    sample = [Selected("a.tif", "worst", 1, 0.5), Selected("b.jpg", "random", 2, 0.7)]
    predictions = {
        s.file_name: ImagePrediction({"file_name": s.file_name, "width": 30, "height": 20}, [])
        for s in sample
    }
    (review / "labelstudio").mkdir()
    write_labelstudio(review / "labelstudio", review, sample, predictions, {1: "head"}, "v")
    tasks = json.loads((review / "labelstudio" / "tasks.json").read_text())
    assert [t["data"] for t in tasks] == [
        {"image": "/data/local-files/?d=images/a.tif.png", "file_name": "a.tif"},
        {"image": "/data/local-files/?d=images/b.jpg", "file_name": "b.jpg"},
    ]
    readme = (review / "labelstudio" / "README.txt").read_text()
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={review.resolve()}" in readme
