"""COCO predictions (round trips, ids, provenance), QC ranking, evaluation, mask PNGs
and overlays, from per-image result files written here."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from sam2pal.errors import InputError
from sam2pal.io.coco import image_id, merge_predictions
from sam2pal.io.masks import decode_segmentation, encode_rle, mask_bbox, mask_iou
from sam2pal.outputs.evaluate import evaluate
from sam2pal.outputs.qc import write_qc
from sam2pal.outputs.visualize import export_masks, write_overlays

CATEGORIES = {1: "head", 2: "antenna"}


def ring(h, w, cx, cy, r_out, r_in):
    yy, xx = np.mgrid[:h, :w]
    d = np.hypot(xx - cx, yy - cy)
    return (d <= r_out) & (d > r_in)


def structure(cid, inst, mask, cycle=0.8, iou=0.9, obj=0.99, clamped=False, stability=None):
    extra = {} if stability is None else {"stability": stability}
    return {
        "category_id": cid,
        "instance": inst,
        "segmentation": encode_rle(mask),
        "area": int(mask.sum()),
        "bbox": mask_bbox(mask),
        "score": iou * obj,
        "predicted_iou": iou,
        "object_score": obj,
        "cycle_iou": cycle,
        "clamped": clamped,
        **extra,
    }


def write_records(path, records):
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["file_name"]))
    )
    return path


@pytest.fixture()
def records(tmp_path):
    h, w = 60, 80
    head = ring(h, w, 40, 30, 20, 8)  # a ring: the hole must survive RLE
    left = np.zeros((h, w), bool)
    left[5:10, 5:30] = True
    right = np.zeros((h, w), bool)
    right[5:10, 50:75] = True
    recs = [
        {
            "file_name": "b.jpg",
            "width": w,
            "height": h,
            "structures": [
                structure(1, 1, head, cycle=0.9),
                structure(2, 1, left, cycle=0.7),
                structure(2, 2, right, cycle=0.6),
            ],
        },
        {
            "file_name": "a.jpg",
            "width": w,
            "height": h,
            "structures": [
                structure(1, 1, head, cycle=0.95),
                structure(2, 1, np.zeros((h, w), bool), cycle=0.0),
                structure(2, 2, right, cycle=0.8),
            ],
        },
        {"file_name": "c.jpg", "skipped": "cannot read image (truncated)"},
    ]
    return write_records(tmp_path / "predictions.jsonl", recs), {
        "head": head,
        "left": left,
        "right": right,
    }


def test_coco_round_trip_rle_keeps_holes(tmp_path, records):
    path, masks = records
    out = tmp_path / "predictions.json"
    counts = merge_predictions(
        [path], CATEGORIES, out, info={"model": {"checkpoint_sha256": "abc"}}
    )
    assert counts == {"images": 2, "annotations": 5, "skipped": 1}
    coco = COCO(str(out))
    assert sorted(coco.getImgIds()) == sorted([image_id("a.jpg"), image_id("b.jpg")])
    assert [a["id"] for a in coco.dataset["annotations"]] == [1, 2, 3, 4, 5]
    heads = coco.loadAnns(coco.getAnnIds(catIds=[1]))
    assert len(heads) == 2
    for ann in heads:
        decoded = coco.annToMask(ann).astype(bool)
        assert np.array_equal(decoded, masks["head"])
        assert not decoded[30, 40]  # the hole
    data = json.loads(out.read_text())
    assert data["info"]["model"]["checkpoint_sha256"] == "abc"
    first = data["annotations"][0]
    assert {
        "score",
        "area",
        "bbox",
        "iscrowd",
        "instance",
        "cycle_iou",
        "predicted_iou",
        "object_score",
    } <= set(first)
    # the empty antenna of a.jpg is not an annotation; b.jpg has both antenna instances
    b_antennae = coco.loadAnns(coco.getAnnIds(imgIds=[image_id("b.jpg")], catIds=[2]))
    assert sorted(a["instance"] for a in b_antennae) == [1, 2]


def _searched(path):
    """The records of `path` with the orientation found on b.jpg (a search's result)."""
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    for rec in recs:
        if rec["file_name"] == "b.jpg":
            rec["orientation"] = ORIENTATION
    return write_records(path.with_name("searched.jsonl"), recs)


ORIENTATION = {
    "rotation": 270,
    "mirrored": True,
    "candidates": [
        {"rotation": r, "mirrored": m, "score": 0.2 + 0.1 * m + r / 1000}
        for m in (False, True)
        for r in (0, 90, 180, 270)
    ],
}


def test_predictions_record_the_orientation_found(tmp_path, records):
    path, _ = records
    out = tmp_path / "predictions.json"
    merge_predictions([_searched(path)], CATEGORIES, out)
    images = {im["file_name"]: im for im in json.loads(out.read_text())["images"]}
    assert images["b.jpg"]["orientation"] == ORIENTATION
    assert "orientation" not in images["a.jpg"]  # not searched
    merge_predictions([path], CATEGORIES, out)
    assert not any("orientation" in im for im in json.loads(out.read_text())["images"])


def test_image_ids_are_stable_when_images_are_added(tmp_path, records):
    path, masks = records
    merge_predictions([path], CATEGORIES, tmp_path / "one.json")
    extra = write_records(
        tmp_path / "more.jsonl",
        [
            {
                "file_name": "aa.jpg",
                "width": 80,
                "height": 60,
                "structures": [structure(1, 1, masks["head"])],
            }
        ],
    )
    merge_predictions([path, extra], CATEGORIES, tmp_path / "two.json")
    one = {
        im["file_name"]: im["id"]
        for im in json.loads((tmp_path / "one.json").read_text())["images"]
    }
    two = {
        im["file_name"]: im["id"]
        for im in json.loads((tmp_path / "two.json").read_text())["images"]
    }
    assert all(two[name] == one[name] for name in one)
    assert list(two) == ["a.jpg", "aa.jpg", "b.jpg"]


def test_polygons_on_request(tmp_path, records):
    path, masks = records
    out = tmp_path / "poly.json"
    merge_predictions([path], CATEGORIES, out, polygons=True)
    coco = COCO(str(out))
    for ann in coco.dataset["annotations"]:
        assert isinstance(ann["segmentation"], list)
    right = [a for a in coco.dataset["annotations"] if a["category_id"] == 2][-1]
    assert mask_iou(coco.annToMask(right).astype(bool), masks["right"]) > 0.7


def test_duplicate_images_across_result_files_fail(tmp_path, records):
    path, _ = records
    with pytest.raises(InputError, match="more than one result file"):
        merge_predictions([path, path], CATEGORIES, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_qc_ranks_worst_first(tmp_path, records):
    path, _ = records
    out = tmp_path / "qc.csv"
    assert write_qc([path], CATEGORIES, out, multi_instance={2}) == 3
    rows = list(csv.DictReader(open(out)))
    assert [r["file_name"] for r in rows] == ["c.jpg", "a.jpg", "b.jpg"]
    assert rows[0]["status"] == "skipped" and "truncated" in rows[0]["reason"]
    # an image scores the mean of its structures' scores, a missing one 0
    assert rows[1]["status"] == "missing" and rows[1]["missing"] == "antenna_1"
    assert float(rows[1]["qc_score"]) == pytest.approx((0.95 + 0.0 + 0.8) / 3, abs=1e-4)
    assert rows[1]["worst_structure"] == "antenna_1"
    assert rows[2]["worst_structure"] == "antenna_2" and float(
        rows[2]["qc_score"]
    ) == pytest.approx((0.9 + 0.7 + 0.6) / 3, abs=1e-4)
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert rows[2]["min_stability"] == rows[2]["mean_stability"] == ""  # none recorded


def test_qc_scores_a_structure_by_its_cycle_iou_times_its_stability(tmp_path):
    """A structure's QC score is its cycle IoU (else its predicted IoU) times the mask's
    stability where recorded: of two photos with the same cycle IoUs, the one whose
    antenna's mask is unstable comes first."""
    from sam2pal.outputs.qc import structure_score

    assert structure_score(0.8, 0.9, 0.5) == pytest.approx(0.4)
    assert structure_score(None, 1.3, 0.5) == pytest.approx(0.5)  # predicted IoU clipped
    assert structure_score(0.8, 0.9, None) == pytest.approx(0.8)  # stability not recorded
    assert structure_score(None, None, 0.5) is None
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    recs = [
        {
            "file_name": name,
            "width": 20,
            "height": 20,
            "structures": [
                structure(1, 1, mask, cycle=0.8, stability=0.95),
                structure(2, 1, mask, cycle=0.8, stability=antenna),
            ],
        }
        for name, antenna in (("steady.jpg", 0.9), ("shaky.jpg", 0.3))
    ]
    path = write_records(tmp_path / "r.jsonl", recs)
    write_qc([path], CATEGORIES, tmp_path / "qc.csv")
    rows = list(csv.DictReader(open(tmp_path / "qc.csv")))
    assert [r["file_name"] for r in rows] == ["shaky.jpg", "steady.jpg"]
    assert float(rows[0]["qc_score"]) == pytest.approx((0.8 * 0.95 + 0.8 * 0.3) / 2, abs=1e-4)
    assert rows[0]["worst_structure"] == "antenna"
    assert float(rows[0]["min_stability"]) == pytest.approx(0.3)
    assert float(rows[0]["mean_stability"]) == pytest.approx(0.625)
    # predictions.json carries each mask's stability, and the overlays score it alike
    from sam2pal.outputs.visualize import structure_quality

    merge_predictions([path], CATEGORIES, tmp_path / "p.json")
    anns = json.loads((tmp_path / "p.json").read_text())["annotations"]
    assert sorted(a["stability"] for a in anns) == [0.3, 0.9, 0.95, 0.95]
    assert structure_quality(anns[0])[0] == pytest.approx(0.8 * anns[0]["stability"])


def test_evaluate_iou_and_dice(tmp_path, records):
    path, masks = records
    pred = tmp_path / "pred.json"
    merge_predictions([path], CATEGORIES, pred)
    gt_head = masks["head"]
    gt_antenna = masks["left"] | masks["right"]
    gt = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 80, "height": 60},
            {"id": 8, "file_name": "b.jpg", "width": 80, "height": 60},
            {"id": 9, "file_name": "c.jpg", "width": 80, "height": 60},
        ],
        "categories": [{"id": 11, "name": "antenna"}, {"id": 12, "name": "head"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 12, "segmentation": encode_rle(gt_head)},
            {"id": 2, "image_id": 7, "category_id": 11, "segmentation": encode_rle(gt_antenna)},
            {"id": 3, "image_id": 8, "category_id": 11, "segmentation": encode_rle(gt_antenna)},
            {"id": 4, "image_id": 9, "category_id": 12, "segmentation": encode_rle(gt_head)},
        ],
    }
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    out = tmp_path / "metrics.csv"
    means = evaluate(gt_path, pred, out)
    rows = list(csv.DictReader(open(out)))
    per = {(r["file_name"], r["category"]): r for r in rows if r["level"] == "image"}
    assert float(per[("a.jpg", "head")]["iou"]) == 1.0
    assert float(per[("a.jpg", "antenna")]["iou"]) == pytest.approx(0.5)  # only the right one found
    assert float(per[("a.jpg", "antenna")]["dice"]) == pytest.approx(2 / 3)
    assert float(per[("b.jpg", "antenna")]["iou"]) == 1.0
    assert float(per[("c.jpg", "head")]["iou"]) == 0.0  # skipped image scores 0
    assert means == {"antenna": pytest.approx(0.75), "head": pytest.approx(0.5)}
    summary = [r for r in rows if r["level"] == "category_mean"]
    assert [r["category"] for r in summary] == ["antenna", "head"] and summary[0]["n_images"] == "2"


def test_mask_pngs_never_collide(tmp_path, records):
    from PIL import Image

    path, masks = records
    pred = tmp_path / "pred.json"
    merge_predictions([path], CATEGORIES, pred)
    out = tmp_path / "masks"
    assert export_masks(pred, out) == 5
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "a__antenna__2.png",
        "a__head__1.png",
        "b__antenna__4.png",
        "b__antenna__5.png",
        "b__head__3.png",
    ]
    assert np.array_equal(np.array(Image.open(out / "b__antenna__4.png")) > 0, masks["left"])
    export_masks(pred, out, category_prefix=True)  # replaces the folder
    assert sorted(p.name for p in out.iterdir())[0] == "antenna__a__2.png"


def test_overlays(tmp_path, records):
    from PIL import Image

    path, _ = records
    pred = tmp_path / "pred.json"
    merge_predictions([path], CATEGORIES, pred)
    image_dir = tmp_path / "img"
    image_dir.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(image_dir / name)
    out = tmp_path / "overlays"
    assert write_overlays(pred, image_dir, out) == 2
    overlay = np.array(Image.open(out / "b.jpg"))
    assert overlay.shape == (60, 80, 3)
    assert np.abs(overlay.astype(int) - 128).max() > 40  # structures are drawn


def test_masks_and_overlays_from_a_file_in_any_order(tmp_path, records):
    """Masks and overlays read predictions.json as a stream when its annotations come
    image by image (as merged), and a file in another order gives the same result."""
    import json

    from sam2pal.outputs.visualize import image_groups

    path, _ = records
    pred = tmp_path / "pred.json"
    merge_predictions([path], CATEGORIES, pred)
    coco = json.loads(pred.read_text())
    shuffled = tmp_path / "shuffled.json"
    reordered = {
        "annotations": list(reversed(coco["annotations"])),
        "categories": coco["categories"],
        "images": coco["images"],
    }
    shuffled.write_text(json.dumps(reordered))
    streamed = [(im["file_name"], [a["id"] for a in anns]) for im, anns in image_groups(pred)[2]]
    loaded = [
        (im["file_name"], sorted(a["id"] for a in anns)) for im, anns in image_groups(shuffled)[2]
    ]
    assert streamed == loaded == [("a.jpg", [1, 2]), ("b.jpg", [3, 4, 5])]
    for source in (pred, shuffled):
        out = tmp_path / f"masks_{source.stem}"
        assert export_masks(source, out) == 5
    assert sorted(p.name for p in (tmp_path / "masks_pred").iterdir()) == sorted(
        p.name for p in (tmp_path / "masks_shuffled").iterdir()
    )


def test_decode_helpers_round_trip():
    m = ring(40, 50, 25, 20, 15, 5)
    assert np.array_equal(decode_segmentation(encode_rle(m), 40, 50), m)


def test_qc_gives_the_orientation_found(tmp_path, records):
    path, _ = records
    out = tmp_path / "qc.csv"
    write_qc([_searched(path)], CATEGORIES, out, multi_instance={2})
    rows = {r["file_name"]: r for r in csv.DictReader(open(out))}
    assert list(rows["b.jpg"])[-6:] == [
        "rotation",
        "mirrored",
        "zoomed",
        "zoom_placed",
        "corrected",
        "reason",
    ]
    assert (rows["b.jpg"]["rotation"], rows["b.jpg"]["mirrored"]) == ("270", "true")
    # empty where the orientation was not searched, and for a skipped image
    for name in ("a.jpg", "c.jpg"):
        assert (rows[name]["rotation"], rows[name]["mirrored"]) == ("", ""), name
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    recs[0]["orientation"] = dict(ORIENTATION, rotation=0, mirrored=False)
    write_qc([write_records(tmp_path / "upright.jsonl", recs)], CATEGORIES, out)
    row = next(r for r in csv.DictReader(open(out)) if r["file_name"] == recs[0]["file_name"])
    assert (row["rotation"], row["mirrored"]) == ("0", "false")
