"""Helpers of the quality benchmarks: quality.py's reuse of an earlier record's rows,
cycle_reward.py's grown masks, mask_grid.py's fitted grids, tiles.py's tiles."""

from __future__ import annotations

import argparse
import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import quality  # noqa: E402


def test_a_kept_oracle_is_taken_when_it_trained_as_many_steps(tmp_path):
    """`--keep oracle`: the earlier oracle row is taken (nothing trains) when its steps
    are those of the one-template palindrome's training log, and the shares of its gain
    that the palindrome rows reach are computed from it."""
    (tmp_path / "c-adapter").mkdir()
    (tmp_path / "c-adapter" / "training_log.csv").write_text("epoch,optimizer_steps\n1,30\n2,60\n")
    entry = {
        "methods": {
            "zero-shot (1 template)": {"mean": 0.2},
            quality.PALINDROME: {"mean": 0.25},
        },
        "palindrome_gain": 0.05,
    }
    kept = {"methods": {quality.ORACLE: {"mean": 0.3}}, "oracle_steps": 60}
    args = argparse.Namespace(lora_rank=8, lr=None)
    out = quality._oracle(args, None, tmp_path / "c", tmp_path, "c", entry, kept)
    assert out["methods"][quality.ORACLE] == {"mean": 0.3}
    assert out["oracle_steps"] == 60
    assert out["gap_closed"] == 0.5
    assert list(out["methods"])[-1] == quality.ORACLE


def test_cycle_reward_grows_and_shrinks_masks_by_whole_pixels():
    """benchmarks/cycle_reward.py: a mask grown by r pixels gains a border r pixels
    wide (a square), and shrinking undoes it."""
    import torch
    from cycle_reward import grown

    mask = torch.zeros(1, 1, 9, 9)
    mask[0, 0, 4, 4] = 1
    assert grown(mask, 0) is mask
    assert grown(mask, 1).sum() == 9 and grown(mask, 2).sum() == 25
    assert grown(mask, 2)[0, 0, 2:7, 2:7].all()
    assert torch.equal(grown(grown(mask, 2), -2), mask)
    assert grown(mask, -1).sum() == 0


def test_the_mask_grid_keeps_wide_structures_and_thin_ones_only_when_sharpened():
    """benchmarks/mask_grid.py: on a grid of 4-pixel cells, a plate many cells wide
    survives the cells' shares of it; a line one pixel wide fades from them (no cell is
    half covered), yet logits fitted to it bring back a band on the line; an empty mask
    scores 0."""
    import numpy as np
    from mask_grid import grid_ceiling

    masks = np.zeros((3, 96, 128), bool)
    masks[0, 20:70, 30:100] = True
    masks[1, 40, 10:120] = True
    best, coverage = grid_ceiling(masks, grid=24, steps=60)
    assert coverage[0] > 0.95 and best[0] >= coverage[0]
    assert coverage[1] == 0.0 and best[1] > 0.25
    assert best[2] == 0.0 and coverage[2] == 0.0
    assert (best <= 1.0).all()


def test_qc_rank_tells_a_score_that_only_knows_the_structure_from_one_that_ranks_photos():
    """benchmarks/qc_rank.py: a signal that is each structure's typical IoU (high for
    the elytra, low for the antennae) correlates with the truth when every prediction
    is pooled, and not at all within a structure; a signal that follows each
    prediction's IoU does both, and ranks the photos."""
    import math

    from qc_rank import rank_agreement

    rows = []
    for i in range(6):
        for structure, typical in (("elytra", 0.8), ("antenna", 0.1)):
            iou = typical + 0.02 * i
            rows.append(
                {
                    "image": f"p{i}.jpg",
                    "structure": structure,
                    "iou": iou,
                    "cycle_iou": typical,  # knows the structure only
                    "predicted_iou": iou,  # follows the truth
                    "object_score": 0.9,
                    "stability": 0.5 + 0.05 * i,  # follows the truth within a structure
                }
            )
    rows.append({"image": "p0.jpg", "structure": "body", "iou": 0.0, "cycle_iou": 1.0})
    got = rank_agreement(rows)
    assert got["pooled"]["predicted IoU"] == 1.0
    assert 0.8 < got["pooled"]["cycle IoU"] < 1.0  # ties within each structure
    assert got["within_structure"]["predicted IoU"] == 1.0
    assert math.isnan(got["within_structure"]["cycle IoU"])  # constant in each structure
    assert math.isnan(got["pooled"]["object score"])
    assert math.isnan(got["per_photo"]["lowest cycle IoU"])  # the same on every photo
    assert got["within_structure"]["stability"] == 1.0
    assert got["within_structure"]["cycle IoU x stability"] == 1.0
    assert got["per_photo"]["mean cycle IoU x stability"] == 1.0


def test_score_collection_keeps_each_predictions_scores(tmp_path):
    """The rows of a held-out collection's scores carry SAM2's predicted IoU, object
    score and the mask's stability beside the cycle IoU (what qc_rank.py compares); the
    body, made from the parts, has none."""
    from sam2pal.models.build import build_model
    from sam2pal.models.registry import micro_model_files
    from sam2pal.synth.quality import HELD_OUT, make_held_out, score_collection

    checkpoint, config = micro_model_files()
    make_held_out(tmp_path, HELD_OUT[1], n_images=3, n_templates=1)
    rows = score_collection(build_model(str(config), checkpoint), tmp_path, 1, 1, cycle=True).rows
    parts = [r for r in rows if r["structure"] != "body"]
    assert len({r["image"] for r in rows}) == 2 and parts
    for r in parts:
        assert 0.0 <= r["object_score"] <= 1.0 and r["cycle_iou"] is not None
        assert isinstance(r["predicted_iou"], float) and 0.0 <= r["stability"] <= 1.0
    assert all(r["predicted_iou"] is None for r in rows if r["structure"] == "body")


def test_a_held_out_collection_at_users_size_scored_with_the_zoom_pass(tmp_path):
    """`quality.py --size W H --zoom MODE`: the same scene rendered larger (the truth on
    the larger grid), each photo read as the workflow reads it (a reduced copy without the
    zoom pass) and scored on the full grid; `best` turns the cycle IoU on by itself."""
    from PIL import Image

    from sam2pal.io.coco import load_coco
    from sam2pal.models.build import build_model
    from sam2pal.models.registry import micro_model_files
    from sam2pal.synth.quality import HELD_OUT, SIZE, make_held_out, score_collection

    small, large = tmp_path / "small", tmp_path / "large"
    make_held_out(small, HELD_OUT[1], n_images=2, n_templates=1)
    make_held_out(large, HELD_OUT[1], n_images=2, n_templates=1, size=(1600, 1200))
    for folder, (width, height) in ((small, SIZE), (large, (1600, 1200))):
        with Image.open(folder / "images" / "specimen_001.jpg") as im:
            assert im.size == (width, height)
        coco = load_coco(folder / "ground_truth.json")
        assert {(i["width"], i["height"]) for i in coco["images"]} == {(width, height)}
    # the same scene: the parts' boxes scale with the photo
    boxes = [
        sorted(a["bbox"] for a in load_coco(f / "ground_truth.json")["annotations"])
        for f in (small, large)
    ]
    for a, b in zip(*boxes, strict=True):
        assert abs(b[0] - a[0] * 10 / 3) < 12 and abs(b[2] - a[2] * 10 / 3) < 12
    checkpoint, config = micro_model_files()
    model = build_model(str(config), checkpoint)
    for zoom in ("off", "best"):
        rows = score_collection(model, large, 1, 1, zoom=zoom).rows
        parts = [r for r in rows if r["structure"] != "body"]
        assert parts and all(0.0 <= r["iou"] <= 1.0 for r in rows)
        assert all((r["cycle_iou"] is not None) == (zoom == "best") for r in parts)


def test_a_photo_size_the_renderer_cannot_draw_is_a_usage_error(capsys):
    """`--size` below 64 pixels a side, or not a number: argparse's usage and one error
    line, nothing run."""
    import pytest

    for size in (["0", "10"], ["640", "x"]):
        with pytest.raises(SystemExit):
            quality.main(["--no-finetune", "--size", *size])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error: argument --size:" in last


def test_judge_margin_replays_a_choice_per_structure_from_two_rows(tmp_path):
    """benchmarks/judge_margin.py: the parts' mean with the structures of `left` from
    the untouched model's rows and the others from the adapter's (body left out, every
    row counted as `Scores.mean_parts` counts it); the mean of a column per structure
    (the IoU or the cycle IoU, rows without it left out); the judged runs are found beside
    their collections; the adapter's copy leaves no structure to the untouched model
    and the original is left as it was."""
    import json

    import judge_margin

    def rows(values):
        return [{"structure": s, "iou": v} for s, v in values]

    adapted = rows([("body", 0.9), ("head", 0.6), ("head", 0.4), ("legs", 0.1)])
    untouched = rows([("body", 0.1), ("head", 0.2), ("head", 0.2), ("legs", 0.5)])
    assert judge_margin.combine(adapted, untouched, set()) == round((0.6 + 0.4 + 0.1) / 3, 4)
    assert judge_margin.combine(adapted, untouched, {"legs"}) == round((0.6 + 0.4 + 0.5) / 3, 4)
    assert judge_margin.combine(adapted, untouched, {"head", "legs"}) == 0.3
    assert judge_margin.per_structure(adapted) == {"head": 0.5, "legs": 0.1}
    # another column of the rows (the cycle IoU), rows without it left out
    cycled = [dict(r, cycle_iou=c) for r, c in zip(adapted, (0.8, 0.3, None, 0.2))]
    assert judge_margin.per_structure(cycled, "cycle_iou") == {"head": 0.3, "legs": 0.2}

    run = tmp_path / "out"
    (run / "c").mkdir(parents=True)
    (run / "c" / "templates.json").write_text("{}")
    adapter = run / "c-judged" / "adapter"
    adapter.mkdir(parents=True)
    record = {"selection": {"by": "template_iou", "untouched_structures": ["head"]}}
    (adapter / judge_margin.ADAPTER_RECORD).write_text(json.dumps(record))
    (run / "d-judged" / "adapter").mkdir(parents=True)  # no collection beside it
    assert judge_margin.judged_runs([run]) == [("c", run / "c", adapter)]
    copy = judge_margin.every_structure(adapter, tmp_path)
    assert json.loads((copy / judge_margin.ADAPTER_RECORD).read_text())["selection"] == {
        "by": "template_iou",
        "untouched_structures": [],
    }
    assert json.loads((adapter / judge_margin.ADAPTER_RECORD).read_text()) == record


def test_tiles_follow_each_piece_from_its_base_and_match_the_targets_pieces():
    """benchmarks/tiles.py: a midline runs from the end nearer the specimen's centre;
    tiles sit at the same fractions of both midlines, sized K times the template
    piece's width and scaled by the midlines' lengths; two antennae are matched left to
    left, right to right."""
    import numpy as np
    import tiles

    template = np.zeros((400, 400), bool)
    template[100:104, 20:180] = True  # left antenna, 4 px wide, 160 long
    template[100:104, 220:380] = True  # right antenna
    target = np.zeros((800, 800), bool)  # the same, twice the size
    target[200:208, 40:360] = True
    target[200:208, 440:760] = True
    box_t, box_g = (0, 0, 400, 400), (0, 0, 800, 800)
    line = tiles.midline(template[:, :200].copy(), (200, 200))
    assert line[0][0] > line[-1][0]  # from the inner end (x near 179) outwards
    assert abs(tiles.path_length(line) - 159) <= 3
    pairs = tiles.match_pieces(tiles.pieces(template), tiles.pieces(target), box_t, box_g)
    assert sorted(pairs) == [(0, 0), (1, 1)]
    tile_pairs = tiles.tile_pairs(template, target, box_t, box_g, k=10.0)
    # width about 4 (area over the skeleton's length) -> side about 40 (over the 32 px
    # floor), tiles every half side along about 160 px: 8 per piece
    assert len(tile_pairs) == 16
    for t_crop, g_crop in tile_pairs:
        assert 40 <= t_crop.side <= 42 and abs(g_crop.side - 2 * t_crop.side) <= 2
        t_centre = (t_crop.left + t_crop.side / 2, t_crop.top + t_crop.side / 2)
        g_centre = (g_crop.left + g_crop.side / 2, g_crop.top + g_crop.side / 2)
        assert abs(g_centre[0] - 2 * t_centre[0]) <= 4 and abs(g_centre[1] - 2 * t_centre[1]) <= 4


def test_quality_writes_each_photos_scores_beside_the_collection(tmp_path, monkeypatch):
    """`quality.py --no-finetune`: `<collection>-photos.csv` in `--out` holds one row per
    photo and structure for the zero-shot and the several-template rows, whose means are
    the record's table."""
    import csv
    import json

    monkeypatch.setenv("SAM2PAL_BENCHMARK_RESULTS", str(tmp_path / "results"))
    out = tmp_path / "out"
    argv = ["--no-finetune", "--collections", "bronze_aligned", "--n-images", "4"]
    argv += ["--n-templates", "2", "--threads", "1", "--out", str(out), "--record", "q"]
    assert quality.main(argv) == 0
    with open(out / "bronze_aligned-photos.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == quality.PHOTO_COLUMNS
    methods = {"zero-shot (1 template)", "2 templates"}
    assert {r["method"] for r in rows} == methods
    assert {r["image"] for r in rows} == {"specimen_002.jpg", "specimen_003.jpg"}
    table = json.loads((out / "results.json").read_text())["collections"]["bronze_aligned"]
    for method in methods:
        heads = [
            float(r["iou"]) for r in rows if r["method"] == method and r["structure"] == "head"
        ]
        assert round(sum(heads) / len(heads), 3) == table["methods"][method]["head"]
    zero = [r for r in rows if r["method"] == "zero-shot (1 template)" and r["structure"] != "body"]
    assert all(r["cycle_iou"] != "" and 0 <= float(r["on_truth"]) <= 1 for r in zero)
    on_legs = [float(r["on_truth"]) for r in zero if r["structure"] == "legs"]
    assert table["zero_shot_shape"]["legs"]["on_truth"] == round(sum(on_legs) / len(on_legs), 3)


def test_the_judged_adapter_is_also_scored_from_all_templates(tmp_path):
    """quality.py's row (c''): palindrome.py's `finetune_and_score` with several templates
    and `all_templates` segments the targets with the kept adapter from all of them in
    memory as well as from the first alone: two tables over the same structures."""
    from palindrome import finetune_and_score, model_arguments

    from sam2pal.synth.quality import HELD_OUT, make_held_out

    coll = tmp_path / "c"
    make_held_out(coll, HELD_OUT[1], n_images=4, n_templates=3)
    args = argparse.Namespace(
        checkpoint="sam2pal-micro", config=None, image_size=None, device="cpu", threads=0,
        n_templates=3,
    )  # fmt: skip
    settings = {
        "num_epochs": 1, "min_steps": 1, "accumulation_steps": 1, "holdout_templates": 2,
        "lora_rank": 4, "judge_memory": "training",
    }  # fmt: skip
    got = finetune_and_score(
        args, model_arguments(args), coll, tmp_path / "ft", settings, "palindrome", 3,
        all_templates=True,
    )  # fmt: skip
    one, every = got["table"], got["table_all_templates"]
    assert set(one) == set(every) and "mean" in every
    assert all(0.0 <= v <= 1.0 for v in every.values() if v == v)
    # quality.py --judge-memory reaches the training (the adapter's record names it)
    records = list((tmp_path / "ft").rglob("sam2pal_adapter.json"))  # the best, the last
    assert records
    assert {json.loads(r.read_text())["settings"]["judge_memory"] for r in records} == {"training"}


def test_a_kept_oracle_needs_no_training_log_when_kept_with_the_palindrome(tmp_path):
    """`--keep palindrome oracle` with the earlier `--out` gone: the oracle's steps are
    the record's (the palindrome row comes from the same record), nothing trains."""
    entry = {
        "methods": {"zero-shot (1 template)": {"mean": 0.2}, quality.PALINDROME: {"mean": 0.3}},
        "palindrome_gain": 0.1,
    }
    kept = {"methods": {quality.ORACLE: {"mean": 0.4}}, "oracle_steps": 60}
    args = argparse.Namespace(lora_rank=8, lr=None)
    out = quality._oracle(args, None, tmp_path / "c", tmp_path, "c", entry, kept)
    assert out["oracle_steps"] == 60 and out["gap_closed"] == 0.5


def test_keeping_a_palindrome_without_its_log_needs_the_records_oracle(tmp_path, capsys):
    """`--reuse R --keep palindrome oracle` with `--out` gone is refused before anything
    trains when R has no oracle (measured with `--no-oracle`): the oracle's steps would
    come from nowhere."""
    import pytest

    argv = [
        "--collections", "small_mixed", "--reuse", "quality-palindrome-zoom-small_mixed",
        "--keep", "palindrome", "oracle", "--out", str(tmp_path / "gone"),
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        quality.main(argv)
    assert "training_log.csv is missing" in capsys.readouterr().err


def test_four_template_methods_need_four_templates(capsys):
    """palindrome.py's (k) and (l) train two templates and judge with two: with
    `--n-templates 3` they are refused before anything renders or trains."""
    import pytest
    from palindrome import FOUR_TEMPLATE_METHODS
    from palindrome import main as palindrome_main

    with pytest.raises(SystemExit):
        palindrome_main(["--collections", "small_mixed", "--methods", FOUR_TEMPLATE_METHODS[1]])
    assert "needs 4 templates" in capsys.readouterr().err
