"""`sam2pal` on the command line, as users of the old script call it."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from sam2pal.cli import main

DEMO = REPO / "resources" / "demo"


@pytest.fixture()
def specimens(tmp_path):
    folder = tmp_path / "specimens"
    folder.mkdir()
    for name in ("specimen_003.jpg", "specimen_004.jpg"):
        shutil.copy(DEMO / "images" / name, folder / name)
    return folder


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sam2pal.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_segment_with_template_json_and_old_flags(tmp_path, specimens):
    out = tmp_path / "out"
    result = run_cli(
        "segment",
        "--template_json",
        DEMO / "templates.json",
        "--template_dir",
        DEMO / "images",
        "--image_dir",
        specimens,
        "--output_dir",
        out,
        "--sam2_checkpoint",
        "random",
        "--model_cfg",
        "sam2.1_hiera_t",
        "--image_size",
        "64",
        "--save_masks",
        "--visualize",
        "--output_category_prefix",
        "--px_per_mm",
        "20",
        "--area_growth_limit",
        "3",
        "--area_clamp_pad",
        "5",
        "--tone",
        "auto",
        "--device",
        "cpu",
        "--interleave_template",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--interleave_template has no effect" in result.stderr
    for name in (
        "predictions.json",
        "measurements.csv",
        "measurements_wide.csv",
        "qc.csv",
        "skipped.csv",
    ):
        assert (out / name).is_file(), name
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["info"]["settings"]["area_growth_limit"] == 3.0
    assert predictions["info"]["settings"]["area_clamp_pad"] == 5
    assert predictions["info"]["settings"]["tone"] == "auto"
    # the demo's dark beetles on light card: a lift is asked for; their light photos keep their pixels
    assert predictions["info"]["tone"] == {"tone": "auto", "lifts_dark_tones": True}
    assert sorted(im["file_name"] for im in predictions["images"]) == [
        "specimen_003.jpg",
        "specimen_004.jpg",
    ]
    header = next(csv.reader(open(out / "measurements.csv")))
    assert header[-1] == "curve_length_mm"
    masks = sorted(p.name for p in (out / "masks").glob("*.png"))
    assert masks and all(
        name.split("__")[0] in {"head", "pronotum", "elytra", "antenna", "legs"} for name in masks
    )
    assert len(list((out / "overlays").glob("*.jpg"))) == 2


def test_segment_with_template_image_and_mask(tmp_path, specimens):
    gt = json.loads((DEMO / "ground_truth.json").read_text())
    image = next(im for im in gt["images"] if im["file_name"] == "specimen_000.jpg")
    from sam2pal.io.masks import decode_segmentation

    antenna = np.zeros((image["height"], image["width"]), bool)
    for ann in gt["annotations"]:
        if ann["image_id"] == image["id"] and ann["category_id"] == 4:
            antenna |= decode_segmentation(ann["segmentation"], image["height"], image["width"])
    Image.fromarray(antenna.astype(np.uint8) * 255).save(tmp_path / "antenna_mask.png")
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            "--template_image",
            str(DEMO / "images" / "specimen_000.jpg"),
            "--template_mask",
            str(tmp_path / "antenna_mask.png"),
            "--image_dir",
            str(specimens),
            "--output_dir",
            str(out),
            "--sam2_checkpoint",
            "random",
            "--image_size",
            "64",
            "--output_timestamp",
            "--no_cycle_consistency",
        ]
    )
    assert code == 0
    (run_dir,) = out.iterdir()  # the timestamped folder
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert [c["name"] for c in predictions["categories"]] == ["antenna"]
    assert all(a["cycle_iou"] is None for a in predictions["annotations"])


def test_segment_template_image_picks_one_image_of_the_json(tmp_path, specimens):
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            "--template_json",
            str(DEMO / "templates.json"),
            "--template_image",
            str(DEMO / "images" / "specimen_001.jpg"),
            "--image_dir",
            str(specimens),
            "--output_dir",
            str(out),
            "--sam2_checkpoint",
            "random",
            "--image_size",
            "64",
            "--no_cycle_consistency",
        ]
    )
    assert code == 0
    templates = json.loads((out / "templates.json").read_text())
    assert [im["file_name"] for im in templates["images"]] == ["specimen_001.jpg"]


def test_segment_with_pal_finetuning_then_reuse_the_adapter(tmp_path, specimens):
    """The old tool's fine-tuning flags train an adapter; --adapter segments with it later."""
    out = tmp_path / "out"
    common = [
        "--template_json",
        DEMO / "templates.json",
        "--template_dir",
        DEMO / "images",
        "--image_dir",
        specimens,
        "--sam2_checkpoint",
        "random",
        "--image_size",
        "64",
        "--no_cycle_consistency",
    ]
    result = run_cli(
        "segment",
        *common,
        "--output_dir",
        out,
        "--pal_finetuning",
        "--use_lora",
        "--lora_rank",
        "4",
        "--num_epochs",
        "1",
        "--min_steps",
        "0",
        "--learning_rate",
        "1e-3",
        "--accumulation_steps",
        "1",
        "--max_images_per_epoch",
        "2",
        "--tone",
        "auto",
        "--absent",
        "blank",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = out / "finetune" / "adapter"
    meta = json.loads((adapter / "sam2pal_adapter.json").read_text())
    # the demo's dark beetles on light card: a lift is asked for, a light photo keeps its pixels
    assert meta["tone"] == {"tone": "auto", "lifts_dark_tones": True}
    # the epochs were judged with the segmentation's choice of mask
    assert meta["mask_rule"] == {"mask_choice": "templates", "absent": "blank"}
    assert (
        meta["kind"] == "lora"
        and meta["settings"]["lora_rank"] == 4
        and meta["settings"]["num_epochs"] == 1
    )
    first = json.loads((out / "predictions.json").read_text())["info"]["model"]
    assert first["adapter_kind"] == "lora" and len(first["adapter_sha256"]) == 64

    again = tmp_path / "again"
    result = run_cli("segment", *common, "--output_dir", again, "--adapter", adapter)
    assert result.returncode == 0, result.stderr[-3000:]
    second = json.loads((again / "predictions.json").read_text())
    assert second["info"]["model"]["adapter_sha256"] == first["adapter_sha256"]
    assert not (again / "finetune").exists()


def test_finetune_command(tmp_path, specimens):
    result = run_cli(
        "finetune",
        "--template_json",
        DEMO / "templates.json",
        "--template_dir",
        DEMO / "images",
        "--image_dir",
        specimens,
        "--output_dir",
        tmp_path / "ft",
        "--sam2_checkpoint",
        "random",
        "--image_size",
        "64",
        "--num_epochs",
        "1",
        "--min_steps",
        "0",
        "--max_images_per_epoch",
        "1",
        "--full",
        "--targets",
        "sam_mask_decoder",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ft" / "adapter" / "model.pt").is_file()
    log = list(csv.DictReader(open(tmp_path / "ft" / "training_log.csv")))
    assert [r["epoch"] for r in log] == ["0", "1"] and not any(
        r["val_iou"] for r in log
    )  # no ground truth
    assert all(0 <= float(r["val_cycle_iou"]) <= 1 for r in log)
    assert all(0 <= float(r["val_template_iou"]) <= 1 for r in log)
    # the record metrics.csv reads: one of the two photos held out; of the demo's two
    # templates, the second held out of the training, its true masks chose the epoch
    selection = json.loads((tmp_path / "ft" / "adapter" / "sam2pal_adapter.json").read_text())[
        "selection"
    ]
    assert selection["by"] == "template_iou" and not selection["ground_truth_images"]
    assert selection["validation_templates"] == ["specimen_001.jpg"]
    assert selection["untouched_structures"] == []  # a full adapter: no per-structure choice
    assert len(selection["holdout"]) == 1 and selection["holdout"][0] in (
        "specimen_003.jpg",
        "specimen_004.jpg",
    )

    # --no_holdout_template: both templates train, the cycle IoU chooses
    args = [str(a) for a in result.args[result.args.index("finetune") + 1 :]]
    out = args.index("--output_dir") + 1
    args[out] = str(tmp_path / "ft2")
    again = run_cli("finetune", *args, "--no_holdout_template", "--no_per_structure_choice")
    assert again.returncode == 0, again.stderr[-3000:]
    meta = json.loads((tmp_path / "ft2" / "adapter" / "sam2pal_adapter.json").read_text())
    assert meta["selection"]["by"] == "cycle_iou"
    assert meta["settings"]["per_structure_choice"] is False
    assert sorted(meta["training_templates"]) == ["specimen_000.jpg", "specimen_001.jpg"]


@pytest.mark.parametrize("flags", [["--use_lora"], ["--lora_rank", "8"], ["--num_epochs", "5"]])
def test_training_options_need_pal_finetuning(tmp_path, specimens, flags):
    out = tmp_path / "out"
    result = run_cli(
        "segment",
        "--template_json",
        DEMO / "templates.json",
        "--image_dir",
        specimens,
        "--output_dir",
        out,
        "--sam2_checkpoint",
        "random",
        *flags,
    )
    assert result.returncode == 2
    assert "need --pal_finetuning" in result.stderr and flags[0] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (out / "predictions.json").exists()


def test_user_errors_are_one_line(tmp_path, specimens):
    bad_mask = tmp_path / "small_mask.png"
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(bad_mask)
    cases = [
        (
            [
                "--template_image",
                DEMO / "images" / "specimen_000.jpg",
                "--template_mask",
                bad_mask,
                "--sam2_checkpoint",
                "random",
            ],
            "small_mask.png",
        ),
        (["--template_json", DEMO / "templates.json"], "--sam2_checkpoint"),
        (
            [
                "--template_json",
                DEMO / "templates.json",
                "--sam2_checkpoint",
                tmp_path / "finetuned.pt",
            ],
            "finetuned.pt",
        ),
        (
            ["--template_json", tmp_path / "missing.json", "--sam2_checkpoint", "random"],
            "missing.json",
        ),
    ]
    for extra, needle in cases:
        result = run_cli(
            "segment", "--image_dir", specimens, "--output_dir", tmp_path / "o", *extra
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("sam2pal: error:"), (
            result.stderr
        )


def test_measure_and_evaluate_commands(tmp_path):
    gt = DEMO / "ground_truth.json"
    result = run_cli(
        "measure",
        "--coco",
        gt,
        "--out",
        tmp_path / "m.csv",
        "--wide",
        tmp_path / "w.csv",
        "--px-per-mm",
        "10",
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert len(rows) == len(json.loads(gt.read_text())["annotations"])
    assert float(rows[0]["area_mm2"]) == pytest.approx(float(rows[0]["area_px"]) / 100)
    result = run_cli("evaluate", "--gt", gt, "--pred", gt, "--out", tmp_path / "metrics.csv")
    assert result.returncode == 0, result.stderr
    means = [
        r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r["level"] == "category_mean"
    ]
    assert all(float(r["iou"]) == 1.0 for r in means)


def test_version_and_help():
    assert run_cli("--version").stdout.startswith("sam2pal ")
    help_text = run_cli("segment", "--help").stdout
    for flag in (
        "--template_image",
        "--template_mask",
        "--template_json",
        "--image_dir",
        "--output_dir",
        "--sam2_checkpoint",
        "--sam2_config",
        "--model_cfg",
        "--save_masks",
        "--save_vis",
        "--visualize",
        "--area_growth_limit",
        "--area_clamp_pad",
        "--output_timestamp",
        "--output_category_prefix",
        "--device",
    ):
        assert flag in help_text, flag


# -- orientation search and framing ---------------------------------------------------------


def _parsed(*argv):
    from sam2pal import cli

    return cli.build_parser().parse_args([str(a) for a in argv])


def test_orientation_and_framing_flags_reach_the_engine_settings():
    from sam2pal import cli

    base = ("segment", "--image_dir", "x", "--output_dir", "y", "--template_json", "t.json")
    given = cli._segment_options(
        _parsed(
            *base,
            "--orientation",
            "rot4_mirror",
            "--mirror-swap",
            "--framing",
            "letterbox",
            "--framing_fill",
            " 10, 20,030",
        ),
        "sam2.1_hiera_t",
        "random",
        None,
    )["engine_settings"]
    assert {k: given[k] for k in ("orientation", "mirror_swap", "framing", "framing_fill")} == {
        "orientation": "rot4_mirror",
        "mirror_swap": True,
        "framing": "letterbox",
        "framing_fill": "10,20,30",
    }
    assert given["mirror_pairs"] == []  # config only
    default = cli._engine_settings(_parsed(*base))
    assert (default["orientation"], default["mirror_swap"]) == ("none", False)
    assert (default["framing"], default["framing_fill"]) == ("stretch", "border")
    assert cli._engine_settings(_parsed(*base, "--framing_fill", "128"))["framing_fill"] == "128"
    # the fine-tuning frames its images, and cuts the zoom windows, alike: `finetune`
    # takes the framing and zoom flags too
    finetune = ("finetune", "--image_dir", "x", "--output_dir", "y")
    zoom_defaults = {"zoom": "off", "zoom_below": 0.1, "zoom_margin": 0.5}
    assert cli._framing(_parsed(*finetune)) == {
        "framing": "stretch",
        "framing_fill": "border",
        "tone": "auto",
        **zoom_defaults,
        "mask_choice": "templates",
        "absent": "keep",
    }
    assert cli._framing(
        _parsed(
            *finetune,
            *("--framing", "letterbox", "--framing-fill", "0,0,0", "--zoom", "auto"),
            *("--tone", "none", "--mask_choice", "sam2", "--absent", "blank"),
        )
    ) == {
        "framing": "letterbox",
        "framing_fill": "0,0,0",
        "tone": "none",
        **zoom_defaults,
        "zoom": "auto",
        "mask_choice": "sam2",
        "absent": "blank",
    }


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            ["--framing_fill", "red"],
            "argument --framing_fill/--framing-fill: must be border, a grey level 0-255",
        ),
        (["--framing_fill", "256"], "got '256'"),
        (["--framing_fill", "1,2"], "R,G,B"),
        (["--framing", "pad"], "argument --framing: invalid choice: 'pad'"),
        (["--orientation", "rot8"], "argument --orientation: invalid choice: 'rot8'"),
    ],
)
def test_bad_orientation_and_framing_values_are_one_line_errors(capsys, extra, needle):
    argv = ["segment", "--image_dir", "x", "--output_dir", "y", "--template_json", "t.json"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *extra])
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and needle in error[0], error


def test_video_has_no_orientation_search(capsys):
    argv = ["video", "--video_dir", "x", "--annotations", "a.json", "--output_dir", "y"]
    for flag in (["--orientation", "rot4"], ["--mirror_swap"]):
        with pytest.raises(SystemExit):
            main([*argv, *flag])
        assert f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err


# -- flags that would change nothing are refused -------------------------------------------


def _refused(capsys, argv, needle):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sam2pal: error:") and needle in lines[0], lines


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            ["--output_category_prefix"],
            "--output_category_prefix names the mask PNGs: add --save_masks",
        ),
        (
            ["--structure_name", "head"],
            "--structure_name names the structures of a --template_mask",
        ),
        (
            ["--template_labels", "1=head"],
            "--template_labels names the structures of a --template_mask",
        ),
        (["--seed", "3", "--sam2_checkpoint", "sam2.1_hiera_tiny"], "here nothing is random"),
    ],
)
def test_segment_refuses_flags_that_do_nothing(tmp_path, specimens, capsys, extra, needle):
    argv = [
        "segment",
        "--template_json",
        str(DEMO / "templates.json"),
        "--image_dir",
        str(specimens),
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]
    if "--sam2_checkpoint" not in extra:
        argv += ["--sam2_checkpoint", "random"]
    _refused(capsys, argv, needle)
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_template_dir_with_a_mask_and_templates_flags_are_refused(tmp_path, specimens, capsys):
    image = str(DEMO / "images" / "specimen_000.jpg")
    _refused(
        capsys,
        [
            "segment",
            "--template_image",
            image,
            "--template_mask",
            str(tmp_path / "m.png"),
            "--template_dir",
            str(DEMO / "images"),
            "--image_dir",
            str(specimens),
            "--output_dir",
            str(tmp_path / "out"),
            "--sam2_checkpoint",
            "random",
        ],
        "--template_dir is the folder of the --template_json photos",
    )
    _refused(
        capsys,
        [
            "templates",
            "--coco",
            str(DEMO / "templates.json"),
            "--structure_name",
            "head",
            "--out",
            str(tmp_path / "t.json"),
        ],
        "--structure_name goes with --mask",
    )
    _refused(
        capsys,
        [
            "templates",
            "--coco",
            str(DEMO / "templates.json"),
            "--mask",
            str(tmp_path / "m.png"),
            "--image",
            image,
            "--out",
            str(tmp_path / "t.json"),
        ],
        "either --coco or --mask",
    )
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--image_format", "png"], "--video_dir frames are used as they are"),
        (["--max_size", "256"], "--video_dir frames are used as they are"),
        (["--seed", "3", "--sam2_checkpoint", "sam2.1_hiera_tiny"], "here nothing is random"),
    ],
)
def test_video_refuses_flags_that_do_nothing(tmp_path, specimens, capsys, extra, needle):
    argv = [
        "video",
        "--video_dir",
        str(specimens),
        "--annotations",
        str(DEMO / "templates.json"),
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]
    if "--sam2_checkpoint" not in extra:
        argv += ["--sam2_checkpoint", "random"]
    _refused(capsys, argv, needle)
    assert not (tmp_path / "out" / "frames.csv").exists()


def _masks(predictions):
    from sam2pal.io.masks import decode_segmentation

    coco = json.loads(predictions.read_text())
    images = {im["id"]: im for im in coco["images"]}
    return coco, {
        (images[a["image_id"]]["file_name"], a["category_id"], a["instance"]): decode_segmentation(
            a["segmentation"], images[a["image_id"]]["height"], images[a["image_id"]]["width"]
        )
        for a in coco["annotations"]
    }


def test_seed_seeds_random_weights(tmp_path, specimens):
    """With --sam2_checkpoint random, --seed chooses the weights: the same seed gives the
    same masks, another seed other weights (recorded in the provenance)."""
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / name
        code = main(
            [
                "segment",
                "--template_json",
                str(DEMO / "templates.json"),
                "--template_dir",
                str(DEMO / "images"),
                "--max_templates",
                "1",
                "--image_dir",
                str(specimens),
                "--output_dir",
                str(out),
                "--sam2_checkpoint",
                "random",
                "--model_cfg",
                "sam2.1_hiera_t",
                "--image_size",
                "64",
                "--no_cycle_consistency",
                "--device",
                "cpu",
                "--seed",
                seed,
            ]
        )
        assert code == 0
        runs[name] = _masks(out / "predictions.json")
    assert [runs[n][0]["info"]["model"]["seed"] for n in "abc"] == [1, 1, 2]
    base = {n: runs[n][0]["info"]["model"]["base_id"] for n in "abc"}
    assert base["a"] == base["b"] != base["c"]
    same, other = runs["b"][1], runs["c"][1]
    assert same.keys() == runs["a"][1].keys() and all(
        np.array_equal(same[k], runs["a"][1][k]) for k in same
    )
    assert any(not np.array_equal(other[k], same[k]) for k in same)


def test_too_many_bad_files_stop_segment_with_their_list(tmp_path, specimens):
    folder = tmp_path / "drawer"
    folder.mkdir()
    shutil.copy(specimens / "specimen_003.jpg", folder / "good.jpg")
    (folder / "cut.jpg").write_bytes((specimens / "specimen_004.jpg").read_bytes()[:2500])
    (folder / "notes.jpg").write_text("not a photo")
    (folder / "empty.png").write_bytes(b"")
    common = [
        "segment",
        "--template_json",
        DEMO / "templates.json",
        "--template_dir",
        DEMO / "images",
        "--max_templates",
        "1",
        "--image_dir",
        folder,
        "--sam2_checkpoint",
        "random",
        "--model_cfg",
        "sam2.1_hiera_t",
        "--image_size",
        "64",
        "--no_cycle_consistency",
        "--device",
        "cpu",
    ]
    out = tmp_path / "out"
    result = run_cli(*common, "--output_dir", out)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"sam2pal: error: {folder}: 3 of 4 images are bad image files (75%")
    assert error.endswith(f"(all of them in {out / 'skipped.csv'})")
    assert (
        all(name in error for name in ("cut.jpg", "notes.jpg", "empty.png"))
        and "good.jpg" not in error
    )
    assert sorted(r["file_name"] for r in csv.DictReader(open(out / "skipped.csv"))) == [
        "cut.jpg",
        "empty.png",
        "notes.jpg",
    ]
    assert not (out / "predictions.json").exists() and not (out / "measurements.csv").exists()

    result = run_cli(*common, "--output_dir", out, "--max_skipped_fraction", "0.8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((out / "predictions.json").read_text())["images"]) == 1
