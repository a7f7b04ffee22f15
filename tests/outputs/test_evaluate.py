"""metrics.csv scores targets only: template photos (segmented with themselves in
memory), video keyframes (output as annotated), fine-tuning templates and the hold-out
images whose ground truth picked the best epoch get their own rows and means. Masks
are rectangles with known IoU; the fine-tuning record is written by the real trainer."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import REPO

from sam2pal.cli import main
from sam2pal.errors import InputError
from sam2pal.io.coco import category_masks, load_coco
from sam2pal.io.masks import encode_rle
from sam2pal.outputs.evaluate import evaluate, match_names, read_finetune_record

H, W = 20, 30
DEMO = REPO / "resources" / "demo"


def box(x0, x1, y0=0, y1=10):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


TRUE_HEAD = box(0, 10)  # 100 px
TRUE_ANTENNA = box(20, 30, 10, 20)
HALF = box(0, 5)  # against TRUE_HEAD: IoU 50 / 100, Dice 2 / 3
THIRD = box(5, 15)  # IoU 50 / 150, Dice 1 / 2


def coco(images: dict[str, dict[str, np.ndarray]], extra_image=None, extra_ann=None) -> dict:
    """{file name: {category: mask}} -> COCO dict (category ids differ on purpose)."""
    names = sorted({c for masks in images.values() for c in masks} | {"head", "antenna"})
    cats = {name: 100 + i for i, name in enumerate(names)}
    out = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n} for n, i in cats.items()],
    }
    for image_id, (file_name, masks) in enumerate(images.items(), start=1):
        out["images"].append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": W,
                "height": H,
                **((extra_image or {}).get(file_name) or {}),
            }
        )
        for category, mask in masks.items():
            ann = {
                "id": len(out["annotations"]) + 1,
                "image_id": image_id,
                "category_id": cats[category],
                "segmentation": encode_rle(mask),
                "iscrowd": 0,
            }
            ann.update((extra_ann or {}).get((file_name, category)) or {})
            out["annotations"].append(ann)
    return out


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def rows_of(path):
    return list(csv.DictReader(open(path)))


def image_rows(rows, role):
    return {
        (r["file_name"], r["category"]): float(r["iou"])
        for r in rows
        if r["level"] == "image" and r["role"] == role
    }


def means_of(rows, role):
    return {
        r["category"]: (float(r["iou"]), float(r["dice"]), int(r["n_images"]))
        for r in rows
        if r["level"] == "category_mean" and r["role"] == role
    }


def check_means_are_means_of_rows(rows):
    """Every mean row is the mean of its role's image rows, n_images their count."""
    for mean in (r for r in rows if r["level"] == "category_mean"):
        own = [
            r
            for r in rows
            if r["level"] == "image"
            and r["role"] == mean["role"]
            and r["category"] == mean["category"]
        ]
        assert int(mean["n_images"]) == len(own) > 0
        for key in ("iou", "dice"):
            assert float(mean[key]) == pytest.approx(
                np.mean([float(r[key]) for r in own]), abs=1e-6
            )


@pytest.fixture()
def photos(tmp_path):
    """A template photo (head annotated) and two targets, all with head and antenna."""
    truth = {
        "tmpl.jpg": {"head": TRUE_HEAD, "antenna": TRUE_ANTENNA},
        "a.jpg": {"head": TRUE_HEAD, "antenna": TRUE_ANTENNA},
        "b.jpg": {"head": TRUE_HEAD, "antenna": TRUE_ANTENNA},
    }
    pred = {
        "tmpl.jpg": {"head": TRUE_HEAD, "antenna": box(20, 30, 10, 15)},  # head 1.0, antenna 0.5
        "a.jpg": {"head": HALF, "antenna": TRUE_ANTENNA},  # head 0.5, antenna 1.0
        "b.jpg": {"head": THIRD},
    }  # head 1/3, antenna 0
    templates = {"tmpl.jpg": {"head": TRUE_HEAD}}
    return (
        write(tmp_path / "gt.json", coco(truth)),
        write(tmp_path / "pred.json", coco(pred)),
        write(tmp_path / "templates.json", coco(templates)),
    )


def test_template_photo_is_not_a_target(tmp_path, photos):
    gt, pred, templates = photos
    means = evaluate(gt, pred, tmp_path / "metrics.csv", templates=templates)
    rows = rows_of(tmp_path / "metrics.csv")
    assert list(rows[0]) == [
        "level",
        "role",
        "file_name",
        "category",
        "iou",
        "dice",
        "gt_area_px",
        "pred_area_px",
        "n_images",
    ]
    # the template's annotated head is a template row; its antenna was not given: a target
    assert image_rows(rows, "template") == {("tmpl.jpg", "head"): 1.0}
    assert image_rows(rows, "target") == pytest.approx(
        {
            ("a.jpg", "head"): 0.5,
            ("b.jpg", "head"): 1 / 3,
            ("tmpl.jpg", "antenna"): 0.5,
            ("a.jpg", "antenna"): 1.0,
            ("b.jpg", "antenna"): 0.0,
        }
    )
    assert means == pytest.approx({"head": (0.5 + 1 / 3) / 2, "antenna": 0.5})
    target = means_of(rows, "target")
    assert target["head"] == pytest.approx(((0.5 + 1 / 3) / 2, (2 / 3 + 0.5) / 2, 2))
    assert target["antenna"][2] == 3
    assert means_of(rows, "template") == {"head": (1.0, 1.0, 1)}
    check_means_are_means_of_rows(rows)
    # targets first: their image rows, then their means, then the template block
    assert [r["role"] for r in rows] == ["target"] * 7 + ["template"] * 2
    head = next(r for r in rows if r["file_name"] == "a.jpg" and r["category"] == "head")
    assert (head["gt_area_px"], head["pred_area_px"]) == ("100", "50")

    # without the templates file every row is a target (the file is what says which are templates)
    plain = evaluate(gt, pred, tmp_path / "plain.csv")
    assert plain["head"] == pytest.approx((1 + 0.5 + 1 / 3) / 3)


def test_template_names_match_like_predictions():
    gt = ["batch1/x.jpg", "batch2/y.jpg", "batch3/y.jpg", "z.jpg"]
    # same path; else a bare name only one image on each side has
    assert match_names(gt, ["batch1/x.jpg"]) == {"batch1/x.jpg": "batch1/x.jpg"}
    assert match_names(gt, ["x.jpg", "y.jpg", "other/z.jpg"]) == {
        "batch1/x.jpg": "x.jpg",
        "z.jpg": "other/z.jpg",
    }
    assert match_names(gt, ["batch1\\x.jpg"]) == {"batch1/x.jpg": "batch1\\x.jpg"}


def test_video_keyframes_are_not_targets(tmp_path):
    frames = {f"{k:05d}.jpg": {"head": TRUE_HEAD} for k in range(4)}
    pred = {name: {"head": HALF} for name in frames}  # tracked frames: IoU 0.5
    pred["00001.jpg"] = {"head": TRUE_HEAD}  # a keyframe, output as annotated
    pred["00003.jpg"] = {"head": TRUE_HEAD}  # another keyframe
    video = {name: {"frame_index": k} for k, name in enumerate(frames)}
    flagged = {("00001.jpg", "head"): {"keyframe": True}}
    gt = write(tmp_path / "gt.json", coco(frames))
    predictions = write(tmp_path / "pred.json", coco(pred, video, flagged))

    # the predictions flag keyframe 1; the templates file names keyframe 3
    means = evaluate(gt, predictions, tmp_path / "flags.csv")
    assert image_rows(rows_of(tmp_path / "flags.csv"), "keyframe") == {("00001.jpg", "head"): 1.0}
    assert means == pytest.approx({"head": (0.5 + 1.0 + 0.5) / 3})
    keyframes = write(
        tmp_path / "keyframes.json",
        coco({"00001.jpg": {"head": TRUE_HEAD}, "00003.jpg": {"head": TRUE_HEAD}}),
    )
    means = evaluate(gt, predictions, tmp_path / "metrics.csv", templates=keyframes)
    rows = rows_of(tmp_path / "metrics.csv")
    assert image_rows(rows, "keyframe") == {("00001.jpg", "head"): 1.0, ("00003.jpg", "head"): 1.0}
    assert "template" not in {r["role"] for r in rows}
    assert means == {"head": pytest.approx(0.5)}
    assert means_of(rows, "target")["head"] == (0.5, pytest.approx(2 / 3), 2)
    assert means_of(rows, "keyframe")["head"] == (1.0, 1.0, 2)
    check_means_are_means_of_rows(rows)


def adapter_record(folder, by, images, training_templates=None, validation=None):
    folder.mkdir(parents=True)
    write(
        folder / "sam2pal_adapter.json",
        {
            "kind": "lora",
            "selection": {
                "by": by,
                "holdout": images,
                "ground_truth_images": images,
                "validation_templates": validation,
            },
            "training_templates": training_templates or {},
        },
    )
    return folder


def test_holdout_that_picked_the_epoch_is_not_a_target(tmp_path, photos):
    gt, pred, templates = photos
    record = adapter_record(tmp_path / "ft" / "adapter", "ground_truth_iou", ["a.jpg"])
    means = evaluate(
        gt, pred, tmp_path / "metrics.csv", templates=templates, finetune_record=tmp_path / "ft"
    )
    rows = rows_of(tmp_path / "metrics.csv")
    assert image_rows(rows, "finetune_holdout") == {
        ("a.jpg", "head"): 0.5,
        ("a.jpg", "antenna"): 1.0,
    }
    assert means == pytest.approx({"head": 1 / 3, "antenna": 0.25})
    assert means_of(rows, "finetune_holdout") == {
        "head": (0.5, pytest.approx(2 / 3), 1),
        "antenna": (1.0, 1.0, 1),
    }
    check_means_are_means_of_rows(rows)
    # the adapter folder or its JSON file name the same record
    assert read_finetune_record(record) == read_finetune_record(record / "sam2pal_adapter.json")

    # chosen by the label-free cycle IoU: no true mask was used, the hold-out stays a target
    adapter_record(tmp_path / "cycle", "cycle_iou", ["a.jpg"])
    means = evaluate(
        gt, pred, tmp_path / "cycle.csv", templates=templates, finetune_record=tmp_path / "cycle"
    )
    assert {r["role"] for r in rows_of(tmp_path / "cycle.csv")} == {"target", "template"}
    assert means == pytest.approx({"head": (0.5 + 1 / 3) / 2, "antenna": 0.5})


def test_held_out_template_that_picked_the_epoch_is_not_a_target(tmp_path, photos):
    """A template held out of the fine-tuning whose true masks picked the epoch, and
    which the segmentation does not use as a template, is scored apart."""
    gt, pred, templates = photos
    adapter_record(tmp_path / "ft", "template_iou", [], validation=["a.jpg"])
    evaluate(
        gt, pred, tmp_path / "metrics.csv", templates=templates, finetune_record=tmp_path / "ft"
    )
    rows = rows_of(tmp_path / "metrics.csv")
    assert {f for f, _ in image_rows(rows, "finetune_holdout")} == {"a.jpg"}
    assert read_finetune_record(tmp_path / "ft")["validation_templates"] == ["a.jpg"]
    # several held-out templates: each is scored apart
    adapter_record(tmp_path / "two", "template_iou", [], validation=["a.jpg", "b.jpg"])
    evaluate(gt, pred, tmp_path / "two.csv", templates=templates, finetune_record=tmp_path / "two")
    held = {f for f, _ in image_rows(rows_of(tmp_path / "two.csv"), "finetune_holdout")}
    assert held == {"a.jpg", "b.jpg"}
    # a record of one held-out template, as written before several could be
    old = adapter_record(tmp_path / "old", "template_iou", [])
    meta = json.loads((old / "sam2pal_adapter.json").read_text())
    meta["selection"]["validation_template"] = "a.jpg"
    del meta["selection"]["validation_templates"]
    write(old / "sam2pal_adapter.json", meta)
    assert read_finetune_record(old)["validation_templates"] == ["a.jpg"]
    adapter_record(tmp_path / "bad", "template_iou", [])
    with pytest.raises(InputError, match="unreadable 'selection' record"):
        read_finetune_record(tmp_path / "bad")


def test_finetune_templates_are_not_targets(tmp_path, photos):
    gt, pred, templates = photos
    # b.jpg was a training template for its head only: the loss saw that mask
    adapter_record(tmp_path / "ft", "cycle_iou", [], {"tmpl.jpg": ["head"], "b.jpg": ["head"]})
    means = evaluate(
        gt, pred, tmp_path / "metrics.csv", templates=templates, finetune_record=tmp_path / "ft"
    )
    rows = rows_of(tmp_path / "metrics.csv")
    assert image_rows(rows, "finetune_template") == pytest.approx({("b.jpg", "head"): 1 / 3})
    assert image_rows(rows, "template") == {("tmpl.jpg", "head"): 1.0}
    assert means == pytest.approx({"head": 0.5, "antenna": 0.5})
    check_means_are_means_of_rows(rows)


def test_records_of_older_adapters(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    meta = {
        "templates": ["t.jpg"],
        "pool": {"holdout": ["h.jpg"]},
        "history": [{"epoch": 0, "val_cycle_iou": 0.8, "val_iou": 0.6}],
    }
    write(folder / "sam2pal_adapter.json", meta)
    assert read_finetune_record(folder) == {
        "by": "ground_truth_iou",
        "ground_truth_images": ["h.jpg"],
        "training_templates": {"t.jpg": None},
        "validation_templates": [],
    }
    meta["history"][0]["val_iou"] = None
    write(folder / "sam2pal_adapter.json", meta)
    assert read_finetune_record(folder)["by"] == "cycle_iou"
    with pytest.raises(InputError, match="no fine-tuning record"):
        read_finetune_record(tmp_path)


def test_the_trainer_records_what_picked_the_epoch(tmp_path):
    """The real trainer writes the hold-out and the selection into sam2pal_adapter.json."""
    from sam2pal.io.templates import load_coco_templates
    from sam2pal.models.build import build_model
    from sam2pal.training.palindrome import FinetuneSettings, Trainer

    def fresh_model():  # LoRA goes into the model: never the shared one
        return build_model("sam2.1_hiera_t", "random", image_size=64)

    templates = load_coco_templates(DEMO / "templates.json", DEMO / "images").select(
        max_templates=1
    )
    names = [f"specimen_{i:03d}.jpg" for i in range(4)]  # 000 is the template: not in the pool
    pool = {n: DEMO / "images" / n for n in names}
    settings = FinetuneSettings(
        num_epochs=1,
        min_steps=0,
        max_images_per_epoch=1,
        accumulation_steps=1,
        warmup_steps=0,
        holdout_fraction=0.5,
        lora_rank=2,
    )

    _, masks = category_masks(load_coco(DEMO / "ground_truth.json"), DEMO / "ground_truth.json")
    truth = {n: masks[n] for n in names[1:3]}  # 2 of the 3 pool images: at least one is held out
    trainer = Trainer(
        fresh_model(), templates, pool, settings, ground_truth=truth, log=lambda *_: None
    )
    holdout = trainer.holdout
    assert len(holdout) == 2 and "specimen_000.jpg" not in holdout
    trainer.train(tmp_path / "ft", {"base_id": "random:test"})
    meta = json.loads((tmp_path / "ft" / "adapter" / "sam2pal_adapter.json").read_text())
    assert meta["selection"] == {
        "by": "ground_truth_iou",
        "holdout": holdout,
        "ground_truth_images": [n for n in holdout if n in truth],
        "validation_templates": [],
        "untouched_structures": [],  # no held-out template: no per-structure choice
    }
    assert meta["training_templates"] == {
        "specimen_000.jpg": ["antenna", "elytra", "head", "legs", "pronotum"]
    }
    last = meta["history"][-1]
    assert last["val_iou"] is not None  # the real IoU did the picking
    # and per structure: every held-out photo with truth shows all five structures
    assert set(last["val_ious"]) == {"antenna", "elytra", "head", "legs", "pronotum"}
    assert np.mean(list(last["val_ious"].values())) == pytest.approx(last["val_iou"])
    saved = read_finetune_record(tmp_path / "ft")
    assert saved["by"] == "ground_truth_iou" and saved["ground_truth_images"] == [
        n for n in holdout if n in truth
    ]

    trainer.ground_truth = {}  # the same hold-out without labels: the cycle IoU picks
    assert trainer.labels_record()["selection"] == {
        "by": "cycle_iou",
        "holdout": holdout,
        "ground_truth_images": [],
        "validation_templates": [],
    }


def test_evaluate_command(tmp_path, photos, capsys):
    gt, pred, templates = photos
    adapter_record(tmp_path / "adapter", "ground_truth_iou", ["a.jpg"])
    out = tmp_path / "metrics.csv"
    assert (
        main(
            [
                "evaluate",
                "--gt",
                str(gt),
                "--pred",
                str(pred),
                "--out",
                str(out),
                "--templates",
                str(templates),
                "--finetune-record",
                str(tmp_path / "adapter"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "head: mean IoU 0.333 (targets)" in printed
    assert "template 1 image(s), finetune_holdout 1 image(s)" in printed
    assert {r["role"] for r in rows_of(out)} == {"target", "template", "finetune_holdout"}
    assert (
        main(
            [
                "evaluate",
                "--gt",
                str(gt),
                "--pred",
                str(pred),
                "--out",
                str(tmp_path / "x.csv"),
                "--finetune_record",
                str(tmp_path / "missing"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "missing" in error[0] and not (tmp_path / "x.csv").exists()


def independent_ious(gt_path, pred_path) -> dict:
    """{(file name, category): IoU} computed with pycocotools, for the workflow tests."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    def unions(path):
        with contextlib.redirect_stdout(io.StringIO()):
            data = COCO(str(path))
        names = {c["id"]: c["name"] for c in data.dataset["categories"]}
        out = {}
        for ann in data.dataset["annotations"]:
            key = (data.imgs[ann["image_id"]]["file_name"], names[ann["category_id"]])
            mask = data.annToMask(ann).astype(bool)
            out[key] = out[key] | mask if key in out else mask
        return out

    truth, pred = unions(gt_path), unions(pred_path)
    ious = {}
    for key, mask in truth.items():
        found = pred.get(key, np.zeros_like(mask))
        union = np.logical_or(mask, found).sum()
        ious[key] = float(np.logical_and(mask, found).sum() / union) if union else 1.0
    return ious


def check_metrics_file(path, gt_path, pred_path, roles: dict) -> list[dict]:
    """A workflow's metrics.csv: each row's IoU as pycocotools computes it, the role of
    every image (`roles`: {file name: role}, others targets), means of the rows."""
    rows = rows_of(path)
    expected = independent_ious(gt_path, pred_path)
    images = [r for r in rows if r["level"] == "image"]
    assert {(r["file_name"], r["category"]) for r in images} == set(expected)
    for r in images:
        assert float(r["iou"]) == pytest.approx(expected[(r["file_name"], r["category"])], abs=1e-6)
        assert r["role"] == roles.get(r["file_name"], "target"), r
    check_means_are_means_of_rows(rows)
    return rows
