"""Corrections back (sam2pal.outputs.corrections): Label Studio and COCO exports of
reviewed images replace the predictions of a results folder; qc.csv and the measurement
tables are made again; review_summary.csv estimates the accuracy from the random sample.

The results folder is built as `sam2pal segment` writes it (records through the record
writers, then `sam2pal.inference.runs`' outputs), with boxes whose IoUs are known.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from sam2pal.cli import main
from sam2pal.errors import InputError
from sam2pal.inference.runs import RunOutputs, _outputs
from sam2pal.io.masks import BoxMask, decode_segmentation
from sam2pal.io.records import ImageRecord, StructureRecord, read_records
from sam2pal.outputs import corrections as corr
from sam2pal.outputs.measure import measure_mask
from sam2pal.outputs.report import write_review_plot

H, W = 40, 60
WHEN = "2026-05-01T12:00:00+00:00"
NAMES = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
HEAD = (10, 10, 30, 20)  # x0, y0, x1, y1 (pixel edges): 20 x 10 = 200 pixels
ANTENNA = {1: (5, 2, 25, 6), 2: (35, 2, 55, 6)}


def box(x0, y0, x1, y1) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def structure(cid, instance, mask, cycle=0.8) -> StructureRecord:
    b = BoxMask.from_full(mask)
    return StructureRecord(
        category_id=cid,
        instance=instance,
        segmentation=b.rle(),
        area=b.area,
        bbox=b.bbox(),
        score=0.9,
        predicted_iou=0.9,
        object_score=0.95,
        cycle_iou=cycle,
    )


def percent(x0, y0, x1, y1) -> list[list[float]]:
    """A box's outline along pixel edges, in percent of the image (Label Studio)."""
    return [[x / W * 100, y / H * 100] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]


def polygon_result(name, corners, instance=None) -> dict:
    result = {
        "id": f"r{name}{instance}",
        "type": "polygonlabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"points": percent(*corners), "closed": True, "polygonlabels": [name]},
    }
    if instance is not None:
        result["meta"] = {"text": [f"instance {instance}"]}
    return result


def task(file_name, results, reviewed=True, **annotation) -> dict:
    t = {
        "id": NAMES.index(file_name) + 1 if file_name in NAMES else 99,
        "data": {"image": f"/data/local-files/?d={file_name}", "file_name": file_name},
        "predictions": [],
        "annotations": [],
    }
    if reviewed:
        t["annotations"].append(
            {
                "id": 1,
                "completed_by": 1,
                "was_cancelled": False,
                "result": results,
                "created_at": "2026-04-30T08:00:00.000000Z",
                "updated_at": "2026-04-30T09:00:00.000000Z",
                **annotation,
            }
        )
    return t


def unchanged_antennae() -> list[dict]:
    return [polygon_result("antenna", ANTENNA[i], instance=i) for i in (1, 2)]


@pytest.fixture
def results(tmp_path):
    """A results folder of five images: head (one instance) and antenna (two), the same
    boxes on every image, scores falling from a.jpg to e.jpg."""
    out = tmp_path / "out"
    out.mkdir()
    templates = {
        "images": [{"id": 1, "file_name": "template.jpg", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "head"}, {"id": 2, "name": "antenna"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "instance": 1},
            {"id": 2, "image_id": 1, "category_id": 2, "instance": 1},
            {"id": 3, "image_id": 1, "category_id": 2, "instance": 2},
        ],
    }
    (out / "templates.json").write_text(json.dumps(templates))
    (out / "run.json").write_text(json.dumps({"model": {"checkpoint": "random"}}))
    lines = []
    for k, name in enumerate(NAMES):
        record = ImageRecord(
            file_name=name,
            width=W,
            height=H,
            structures=[
                structure(1, 1, box(*HEAD), cycle=0.9 - 0.1 * k),
                structure(2, 1, box(*ANTENNA[1])),
                structure(2, 2, box(*ANTENNA[2])),
            ],
        )
        lines.append(record.to_line())
    (out / "predictions.jsonl").write_text("".join(lines))
    _outputs(out / "templates.json", out / "predictions.jsonl", out, RunOutputs(px_per_mm=10.0))
    review = tmp_path / "review"
    review.mkdir()
    with open(review / "review_sample.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "selected_by", "qc_rank", "qc_score", "seed"])
        writer.writerow(["e.jpg", "worst", 1, "0.5000", 0])
        writer.writerow(["a.jpg", "random", 5, "0.8000", 0])
        writer.writerow(["b.jpg", "random", 4, "0.8000", 0])
        writer.writerow(["d.jpg", "random", 2, "0.6000", 0])
    return out, review


def labelstudio_export(tmp_path) -> os.PathLike:
    """a.jpg: head widened to 30 x 10 (IoU 2/3); b.jpg: antenna 2 removed; d.jpg: not
    reviewed (only cancelled); e.jpg (worst): head moved, IoU 1/3."""
    tasks = [
        task("a.jpg", [polygon_result("head", (10, 10, 40, 20)), *unchanged_antennae()]),
        task(
            "b.jpg",
            [polygon_result("head", HEAD), polygon_result("antenna", ANTENNA[1], instance=1)],
        ),
        task("c.jpg", [], reviewed=False),
        task("d.jpg", [polygon_result("head", (0, 0, 5, 5))], was_cancelled=True),
        task("e.jpg", [polygon_result("head", (20, 10, 40, 20)), *unchanged_antennae()]),
    ]
    path = tmp_path / "project-1-at-2026-04-30.json"
    path.write_text(json.dumps(tasks))
    return path


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def table(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def annotations_of(out, file_name) -> list[dict]:
    coco = json.loads((out / "predictions.json").read_text())
    iid = next(im["id"] for im in coco["images"] if im["file_name"] == file_name)
    return [a for a in coco["annotations"] if a["image_id"] == iid]


# -- the import ---------------------------------------------------------------------------


def test_labelstudio_corrections_replace_predictions_and_tables(results, tmp_path):
    out, review = results
    source = labelstudio_export(tmp_path)
    before = snapshot(out)
    counts = corr.import_corrections(
        out, [source], review_dir=review, px_per_mm=10.0, when=WHEN, log=lambda _: None
    )
    assert counts["corrected"] == 3 and counts["images"] == 5
    assert (out / "predictions.jsonl").read_bytes() == before["predictions.jsonl"]  # the model's
    stamp = {"when": WHEN, "source": str(source), "reviewed_at": "2026-04-30T09:00:00.000000Z"}

    a = {(x["category_id"], x["instance"]): x for x in annotations_of(out, "a.jpg")}
    head = decode_segmentation(a[(1, 1)]["segmentation"], H, W)
    assert np.array_equal(head, box(10, 10, 40, 20)) and a[(1, 1)]["area"] == 300
    assert a[(1, 1)]["corrected"] == stamp
    # a polygon left as it was gives back the predicted pixels
    assert np.array_equal(decode_segmentation(a[(2, 2)]["segmentation"], H, W), box(*ANTENNA[2]))
    assert a[(2, 2)]["corrected"] == stamp
    # b.jpg: the reviewer removed antenna 2: absent, left out of predictions.json
    b = {(x["category_id"], x["instance"]) for x in annotations_of(out, "b.jpg")}
    assert b == {(1, 1), (2, 1)}
    assert all("corrected" not in x for x in annotations_of(out, "c.jpg"))
    assert all("corrected" not in x for x in annotations_of(out, "d.jpg"))  # cancelled

    reviewed = {r.file_name: r for r in read_records(out / "reviewed.jsonl")}
    removed = next(s for s in reviewed["b.jpg"].structures if s.key == (2, 2))
    assert removed.area == 0 and removed.corrected == stamp

    # measurements made again: a.jpg's head is 30 px wide now
    rows = [r for r in table(out / "measurements.csv") if r["file_name"] == "a.jpg"]
    head_row = next(r for r in rows if r["category"] == "head")
    assert float(head_row["area_px"]) == 300 and float(head_row["area_mm2"]) == 3.0
    assert float(head_row["feret_max_px"]) == pytest.approx(measure_mask(head)["feret_max_px"])
    assert float(head_row["feret_max_px"]) > np.hypot(20, 10)
    assert len([r for r in table(out / "measurements.csv") if r["file_name"] == "b.jpg"]) == 2
    wide = {r["file_name"]: r for r in table(out / "measurements_wide.csv")}
    assert float(wide["a.jpg"]["head_area_px"]) == 300

    # qc: reviewed images score 1 and rank last, their structures listed as corrected
    qc = {r["file_name"]: r for r in table(out / "qc.csv")}
    assert [r["file_name"] for r in table(out / "qc.csv")][-3:] == ["a.jpg", "b.jpg", "e.jpg"]
    assert qc["a.jpg"]["qc_score"] == "1.0000"
    assert qc["a.jpg"]["corrected"] == "head;antenna_1;antenna_2"
    assert qc["b.jpg"]["missing"] == "antenna_2" and qc["c.jpg"]["corrected"] == ""


def test_review_summary_numbers_by_hand(results, tmp_path):
    out, review = results
    notes = []
    corr.import_corrections(
        out, [labelstudio_export(tmp_path)], review, px_per_mm=10.0, log=notes.append
    )
    rows = {
        (r["sample"], r["structure"], r["quantity"]): r for r in table(out / "review_summary.csv")
    }
    # random sample, reviewed: a.jpg and b.jpg (d.jpg's only annotation was cancelled)
    head = rows[("random", "head", "iou")]
    assert (head["n_images"], head["n"]) == ("2", "2")
    # head IoU: a 200/300, b 1; with two images the bootstrap interval spans their means
    assert float(head["mean"]) == pytest.approx((2 / 3 + 1) / 2, abs=1e-4)
    assert (float(head["ci_low"]), float(head["ci_high"])) == pytest.approx((2 / 3, 1.0), abs=1e-4)
    antenna = rows[("random", "antenna", "iou")]
    assert (antenna["n"], float(antenna["mean"])) == ("4", 0.75)  # b's antenna 2 removed: 0
    assert (float(antenna["ci_low"]), float(antenna["ci_high"])) == (0.5, 1.0)
    everything = rows[("random", "all", "iou")]
    assert everything["n"] == "6"
    assert float(everything["mean"]) == pytest.approx((2 / 3 + 1 + 1 + 1 + 1 + 0) / 6, abs=1e-4)
    assert float(everything["ci_low"]) == pytest.approx(2 / 3, abs=1e-4)  # b alone
    assert float(everything["ci_high"]) == pytest.approx((2 / 3 + 2) / 3, abs=1e-4)  # a alone
    # area: a's head 200 predicted, 300 drawn (-1/3); b's head exact
    error = rows[("random", "head", "area_px_rel_error")]
    bias = rows[("random", "head", "area_px_rel_bias")]
    assert float(error["mean"]) == pytest.approx(1 / 6, abs=1e-4)
    assert float(bias["mean"]) == pytest.approx(-1 / 6, abs=1e-4)
    # the worst image is apart, marked biased, never in the random rows
    worst = rows[("worst", "head", "iou")]
    assert (worst["n_images"], float(worst["mean"])) == ("1", pytest.approx(1 / 3, abs=1e-4))
    assert worst["ci_low"] == "" and "biased" in worst["note"]
    assert "estimate" in head["note"]
    assert any("1 of the 3 random images" in note for note in notes)
    # the report's figure of it
    figure = tmp_path / "review.png"
    assert write_review_plot(out / "review_summary.csv", figure) == ["head", "antenna", "all"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coco_corrections_cvat_layout(results, tmp_path):
    """CVAT's COCO 1.0: file names with a folder, an instance in two polygons (its
    `instance` attribute), an RLE segmentation, an image whose structures were all
    removed; instances matched by overlap, not by order."""
    out, _ = results
    from sam2pal.io.masks import encode_rle

    head = box(12, 12, 30, 20)
    coco = {
        "images": [
            {"id": 7, "file_name": "images/c.jpg", "width": W, "height": H},
            {"id": 8, "file_name": "images/d.jpg", "width": W, "height": H},
        ],
        "categories": [{"id": 1, "name": "antenna"}, {"id": 2, "name": "head"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 2, "segmentation": encode_rle(head)},
            # the right antenna listed first, in two pieces
            {
                "id": 2,
                "image_id": 7,
                "category_id": 1,
                "segmentation": [[35, 2, 45, 2, 45, 6, 35, 6]],
                "attributes": {"instance": 5},
            },
            {
                "id": 3,
                "image_id": 7,
                "category_id": 1,
                "segmentation": [[45, 2, 55, 2, 55, 6, 45, 6]],
                "attributes": {"instance": 5},
            },
            {
                "id": 4,
                "image_id": 7,
                "category_id": 1,
                "segmentation": [[5, 2, 20, 2, 20, 6, 5, 6]],
            },
        ],
    }
    path = tmp_path / "instances_default.json"
    path.write_text(json.dumps(coco))
    corr.import_corrections(out, [path], px_per_mm=10.0, log=lambda _: None)
    c = {(x["category_id"], x["instance"]): x for x in annotations_of(out, "c.jpg")}
    assert np.array_equal(decode_segmentation(c[(1, 1)]["segmentation"], H, W), head)
    assert np.array_equal(decode_segmentation(c[(2, 2)]["segmentation"], H, W), box(35, 2, 55, 6))
    assert np.array_equal(decode_segmentation(c[(2, 1)]["segmentation"], H, W), box(5, 2, 20, 6))
    assert "reviewed_at" not in c[(1, 1)]["corrected"]
    assert annotations_of(out, "d.jpg") == []  # everything removed
    assert not (out / "review_summary.csv").exists()


def test_later_file_wins_and_a_new_instance(results, tmp_path):
    out, _ = results
    first = labelstudio_export(tmp_path)
    later = tmp_path / "later.json"
    # a.jpg again: both antennae, plus a third drawn apart (no instance text): instance 3
    extra = polygon_result("antenna", (0, 30, 10, 35))
    later.write_text(json.dumps([task("a.jpg", [*unchanged_antennae(), extra])]))
    corr.import_corrections(out, [first, later], px_per_mm=10.0, log=lambda _: None)
    a = {(x["category_id"], x["instance"]): x for x in annotations_of(out, "a.jpg")}
    assert set(a) == {(2, 1), (2, 2), (2, 3)}  # the head was not drawn in the later file
    assert a[(2, 3)]["corrected"]["source"] == str(later) and a[(2, 3)]["score"] == 0.0
    assert {x["instance"] for x in annotations_of(out, "b.jpg")} == {1}  # from the first


# -- Label Studio's brush RLE ------------------------------------------------------------

# Reference data of the format's own test suites: thi.ng's rle-pack (packages/rle-pack/
# test, 3-bit words, default and [1, 2, 4, 9] run sizes) and Label Studio's converter
# (tests/test_brush.py, 8-bit words).
SRC1K = np.zeros(1024, np.uint8)
SRC1K[512:541] = [1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 5, 4, 4, 3, 3, 3, 2, 2, 2, 2] + [1] * 5
RLE_PACK = [
    0,
    0,
    4,
    0,
    17,
    27,
    255,
    1,
    255,
    18,
    24,
    212,
    78,
    24,
    5,
    134,
    68,
    227,
    82,
    30,
    3,
    196,
    0,
]
RLE_PACK_SIZES = [0, 0, 4, 0, 16, 9, 199, 255, 140, 134, 234, 206, 96, 89, 150, 119, 89, 15, 241, 0]
LABEL_STUDIO = [0, 0, 0, 18, 57, 27, 252, 96, 32, 1, 0, 6, 0, 40, 0, 192, 3, 128, 17, 56, 32]


def test_brush_rle_decodes_the_reference_data():
    assert np.array_equal(corr.decode_brush_rle(RLE_PACK), SRC1K)
    assert np.array_equal(corr.decode_brush_rle(RLE_PACK_SIZES), SRC1K)
    assert corr.decode_brush_rle(LABEL_STUDIO).tolist() == [1, 1, 1, 1, 2, 3, 5, 6, 7, 8] + [4] * 8
    with pytest.raises(ValueError, match="values, expected"):
        corr.decode_brush_rle(LABEL_STUDIO, expected_length=17)
    with pytest.raises(ValueError, match="ends in the middle"):
        corr.decode_brush_rle(LABEL_STUDIO[:-3])


def runs_rle(values: np.ndarray) -> list[int]:
    """Label Studio brush RLE of `values` as runs only (8-bit words, run lengths in
    16-bit fields): the subset of the format enough to write a mask."""
    bits = f"{len(values):032b}{7:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    edges = np.flatnonzero(np.diff(values)) + 1
    for start, end in zip(np.r_[0, edges], np.r_[edges, len(values)], strict=True):
        while start < end:
            n = min(end - start, 1 << 16)
            bits += "1" + "11" + f"{n - 1:016b}" + f"{int(values[start]):08b}"
            start += n
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def test_brushlabels_result(results, tmp_path):
    out, _ = results
    drawn = box(10, 10, 25, 18)
    rgba = np.repeat(drawn.astype(np.uint8).ravel() * 255, 4)
    brush = {
        "type": "brushlabels",
        "from_name": "brush",
        "to_name": "image",
        "original_width": W,
        "original_height": H,
        "value": {"format": "rle", "rle": runs_rle(rgba), "brushlabels": ["head"]},
    }
    uploaded = task("c.jpg", [brush, *unchanged_antennae()])
    # a photo uploaded to Label Studio: no file_name, the name prefixed
    uploaded["data"] = {"image": "/data/upload/1/0bcf1a2e-c.jpg"}
    path = tmp_path / "brush.json"
    path.write_text(json.dumps([uploaded]))
    corr.import_corrections(out, [path], px_per_mm=10.0, log=lambda _: None)
    c = {(x["category_id"], x["instance"]): x for x in annotations_of(out, "c.jpg")}
    assert np.array_equal(decode_segmentation(c[(1, 1)]["segmentation"], H, W), drawn)


# -- bad input ------------------------------------------------------------------------


def _bad_files(tmp_path) -> dict:
    bad = {
        "unknown image": [task("zzz.jpg", [polygon_result("head", HEAD)])],
        "unknown structure": [task("a.jpg", [polygon_result("mandible", HEAD)])],
        "neither format": {"tasks": []},
        "rectangles": [task("a.jpg", [{"type": "rectanglelabels", "value": {}}])],
        "no reviewed image": [task("a.jpg", [], reviewed=False)],
        "other size": [task("a.jpg", [dict(polygon_result("head", HEAD), original_width=W * 2)])],
        "two points": [
            task(
                "a.jpg",
                [
                    dict(
                        polygon_result("head", HEAD),
                        value={"points": [[1, 1], [2, 2]], "polygonlabels": ["head"]},
                    )
                ],
            )
        ],
    }
    paths = {}
    for name, content in bad.items():
        paths[name] = tmp_path / (name.replace(" ", "_") + ".json")
        paths[name].write_text(json.dumps(content))
    paths["not json"] = tmp_path / "broken.json"
    paths["not json"].write_text("[{")
    return paths


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown image", "task 99 (zzz.jpg): no image of that name in the results"),
        ("unknown structure", "unknown structure 'mandible'"),
        ("neither format", "neither a Label Studio JSON export"),
        ("rectangles", "rectanglelabels regions are not masks"),
        ("no reviewed image", "no reviewed image in this file"),
        ("other size", "drawn on a 120x40 image, but a.jpg is 60x40"),
        ("two points", "invalid head region (a polygon needs at least 3 points"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_corrections_change_nothing(results, tmp_path, case, message):
    out, review = results
    path = _bad_files(tmp_path)[case]
    before = snapshot(out)
    with pytest.raises(InputError) as caught:
        corr.import_corrections(out, [path], review, px_per_mm=10.0, log=lambda _: None)
    text = str(caught.value)
    assert message in text and str(path) in text and "\n" not in text
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before) + []  # no temporary folder


def test_missing_scale_and_workflow_folder(results, tmp_path):
    out, _ = results
    source = labelstudio_export(tmp_path)
    with pytest.raises(InputError, match="millimetre columns: give the run's --px_per_mm"):
        corr.import_corrections(out, [source], log=lambda _: None)
    workflow = tmp_path / "results" / "beetles"
    (workflow / "propagate").mkdir(parents=True)
    with pytest.raises(InputError, match="results of the workflow: add the corrections"):
        corr.import_corrections(workflow, [source], log=lambda _: None)


# -- the command line ---------------------------------------------------------------------


def test_cli_review_import(results, tmp_path, capsys):
    out, review = results
    source = labelstudio_export(tmp_path)
    args = ["review", "import", "--results", str(out), "--corrections", str(source)]
    assert main([*args, "--review", str(review), "--px_per_mm", "10"]) == 0
    printed = capsys.readouterr().out
    assert "corrected 3 of 5 images" in printed and "review_summary.csv" in printed
    assert (out / "review_summary.csv").is_file()
    # again without --review: the summary of other corrections is not left behind
    assert main([*args, "--px-per-mm", "10"]) == 0
    assert "removed" in capsys.readouterr().err and not (out / "review_summary.csv").exists()
    assert main([*args[:-1], str(tmp_path / "nowhere.json"), "--px_per_mm", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sam2pal: error: {tmp_path / 'nowhere.json'}: corrections file not found"


def test_corrected_images_as_templates(tmp_path):
    """corrections.as_templates: the reviewed images join the templates with the
    reviewer's masks, instances numbered as the export named them; a region of a
    structure with several instances must say which."""
    from conftest import template_set
    from PIL import Image

    images = tmp_path / "photos"
    images.mkdir()
    for name in NAMES:
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(images / name)
    templates = template_set(
        [
            (
                images / "a.jpg",
                {(1, 1): box(*HEAD), (2, 1): box(*ANTENNA[1]), (2, 2): box(*ANTENNA[2])},
            )
        ],
        {1: "head", 2: "antenna"},
    )
    moved = (12, 14, 30, 22)
    export = tmp_path / "export.json"
    results = [polygon_result("head", moved), polygon_result("antenna", ANTENNA[2], instance=2)]
    export.write_text(json.dumps([task("c.jpg", results), task("b.jpg", [], reviewed=False)]))
    both = corr.corrected_templates(templates, [export], images)
    assert [im.file_name for im in both.images] == ["a.jpg", "c.jpg"]  # b.jpg was not reviewed
    added = both.images[1]
    assert (added.width, added.height) == (W, H) and added.path == (images / "c.jpg").resolve()
    got = {(i.category_id, i.instance): i.mask for i in added.instances}
    assert set(got) == {(1, 1), (2, 2)}  # the reviewer removed antenna 1
    assert np.array_equal(got[(1, 1)], box(*moved))
    assert np.array_equal(got[(2, 2)], box(*ANTENNA[2]))
    assert len({i.annotation_id for im in both.images for i in im.instances}) == 5
    # an antenna region that does not say which antenna it is cannot be a template
    export.write_text(json.dumps([task("c.jpg", [polygon_result("antenna", ANTENNA[1])])]))
    with pytest.raises(InputError, match="antenna region without its instance"):
        corr.corrected_templates(templates, [export], images)
    export.write_text(json.dumps([task("zz.jpg", results)]))
    with pytest.raises(InputError, match="no image of that name"):
        corr.corrected_templates(templates, [export], images)
