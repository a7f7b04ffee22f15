"""Video collections end to end: a synthetic clip made with ffmpeg, run through the
Snakemake workflow (frame extraction checkpoint, keyframes, fine-tuning on the frames,
temporal propagation, COCO with frame ids, per-frame measurements, overlay video) and
through `sam2pal video` with the old tool's flags (train, then reload and predict)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import yaml
from pycocotools.coco import COCO
from test_evaluate import check_metrics_file
from test_workflow import planned_jobs, snakemake

from sam2pal.cli import main
from sam2pal.io.masks import decode_segmentation
from sam2pal.io.video import count_frames, read_video_frames
from sam2pal.synth.specimens import make_video

N_FRAMES = 12
FPS = 6


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return make_video(folder, n_frames=N_FRAMES, fps=FPS, seed=3, size=(160, 120), keyframes=(4, 9))


def _masks_by_frame(coco_path):
    coco = json.loads(open(coco_path).read())
    images = {im["id"]: im for im in coco["images"]}
    found = {}
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        found[(im["file_name"], ann["category_id"])] = decode_segmentation(
            ann["segmentation"], im["height"], im["width"]
        )
    return coco, found


def test_video_collections_in_the_workflow(tmp_path, clip):
    # the same clip as frames extracted beforehand, under names that only sort naturally
    frames = tmp_path / "my_frames"
    frames.mkdir()
    from PIL import Image

    for i, rgb in enumerate(read_video_frames(clip["video"])):
        Image.fromarray(rgb).save(frames / f"frame_{i}.png")
    keyframes = json.loads(open(clip["keyframes"]).read())
    for image in keyframes["images"]:
        image["file_name"] = f"frame_{int(image['file_name'].split('.')[0])}.png"
    (tmp_path / "keyframes_png.json").write_text(json.dumps(keyframes))

    config = {
        "collections": {
            "clip": {
                "video": str(clip["video"]),
                "templates": str(clip["keyframes"]),
                "ground_truth": str(clip["ground_truth"]),
                "px_per_mm": 10.0,
                "finetune": {"enabled": True},
                "outputs": {"overlay_video": True},
            },
            "clip_frames": {
                "frames": str(frames),
                "templates": str(tmp_path / "keyframes_png.json"),
                "video_options": {"mode": "independent", "fps": FPS},
            },
        },
        "model": {"checkpoint": "random", "image_size": 64},
        "propagate": {"cycle_consistency": True},
        "finetune": {
            "num_epochs": 1,
            "min_steps": 0,
            "max_images_per_epoch": 2,
            "accumulation_steps": 1,
            "lora_rank": 4,
        },
        "outputs": {"save_overlays": False, "save_masks": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "--configfile", "config.yaml")
    out = tmp_path / "results" / "clip"

    # frames: as many as ffmpeg decodes, 0-based five-digit names, times k / fps
    manifest = list(csv.DictReader(open(out / "frames.csv")))
    assert len(manifest) == count_frames(clip["video"]) == N_FRAMES
    assert [r["file"] for r in manifest] == [f"{k:05d}.jpg" for k in range(N_FRAMES)]
    assert [float(r["time_s"]) for r in manifest] == pytest.approx(
        [k / FPS for k in range(N_FRAMES)], abs=1e-3
    )

    # one COCO for the video: image id = frame index = the number in the file name
    coco = COCO(str(out / "predictions.json"))
    assert sorted(coco.getImgIds()) == list(range(N_FRAMES))
    for image in coco.loadImgs(coco.getImgIds()):
        assert (
            image["file_name"] == f"{image['id']:05d}.jpg" and image["frame_index"] == image["id"]
        )
    _, found = _masks_by_frame(out / "predictions.json")
    truth = clip["labels"]
    for k in (4, 9):  # keyframes carry their annotation
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[k]))
        assert anns and all(a["keyframe"] for a in anns)
        for a in anns:
            assert np.array_equal(
                found[(f"{k:05d}.jpg", a["category_id"])], truth[k] == a["category_id"]
            )
    tracked = coco.loadAnns(coco.getAnnIds(imgIds=[0, 1, 2, 3]))  # before the first keyframe
    assert tracked and not any(a.get("keyframe") for a in tracked)
    run = json.loads((out / "propagate" / "shard-0-of-1.run.json").read_text())
    assert run["video"]["mode"] == "video" and run["video"]["keyframes"] == [4, 9]
    assert (
        run["video"]["tone"]["tone"] == "auto"
    )  # the default; whether it lifts is the photos' matter
    assert isinstance(run["video"]["tone"]["lifts_dark_tones"], bool)
    assert run["model"]["adapter_kind"] == "lora"  # trained on the video's frames

    # per-frame measurements, metrics against the ground truth, the overlay video
    rows = list(csv.DictReader(open(out / "measurements.csv")))
    assert {int(r["frame_index"]) for r in rows} <= set(range(N_FRAMES))
    assert all(
        float(r["time_s"]) == pytest.approx(int(r["frame_index"]) / FPS, abs=1e-3) for r in rows
    )
    wide = list(csv.DictReader(open(out / "measurements_wide.csv")))
    assert [int(r["frame_index"]) for r in wide] == list(range(N_FRAMES))
    # metrics: keyframes (output as annotated) and the fine-tuning hold-out frame whose
    # ground truth picked the epoch are scored apart from the targets
    selection = json.loads((out / "finetune" / "adapter" / "sam2pal_adapter.json").read_text())[
        "selection"
    ]
    assert selection["by"] == "ground_truth_iou" and len(selection["ground_truth_images"]) == 1
    roles = {name: "finetune_holdout" for name in selection["ground_truth_images"]}
    roles.update({"00004.jpg": "keyframe", "00009.jpg": "keyframe"})
    rows = check_metrics_file(
        out / "metrics.csv", clip["ground_truth"], out / "predictions.json", roles
    )
    assert all(float(r["iou"]) == 1.0 for r in rows if r["role"] == "keyframe")
    assert {
        r["n_images"] for r in rows if r["level"] == "category_mean" and r["role"] == "target"
    } == {str(N_FRAMES - 3)}
    assert count_frames(out / "overlay.mp4") == N_FRAMES
    finetune_log = json.loads((out / "finetune" / "adapter" / "sam2pal_adapter.json").read_text())
    assert finetune_log["templates"] == ["00004.jpg", "00009.jpg"]

    # frames extracted beforehand: naturally ordered, keyframes matched by file name
    other = tmp_path / "results" / "clip_frames"
    manifest = list(csv.DictReader(open(other / "frames.csv")))
    assert [r["file"] for r in manifest] == [f"frame_{k}.png" for k in range(N_FRAMES)]
    coco = COCO(str(other / "predictions.json"))
    assert sorted(coco.getImgIds()) == list(range(N_FRAMES))
    assert coco.loadImgs([10])[0]["file_name"] == "frame_10.png"
    assert all(a["keyframe"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[4])))
    assert not (other / "finetune").exists() and not (other / "overlay.mp4").exists()

    # reruns: nothing to do; the mode re-segments without re-extracting; fps re-extracts
    assert "Nothing to be done" in snakemake(tmp_path, "--configfile", "config.yaml", "-n").stdout
    config["collections"]["clip"]["video_options"] = {"mode": "independent"}
    (tmp_path / "mode.yaml").write_text(yaml.safe_dump(config))
    plan = planned_jobs(snakemake(tmp_path, "--configfile", "mode.yaml", "-n").stdout)
    assert "propagate" in plan and "extract_frames" not in plan and "finetune" not in plan
    config["collections"]["clip"]["video_options"] = {"fps": 3}
    (tmp_path / "fps.yaml").write_text(yaml.safe_dump(config))
    plan = planned_jobs(snakemake(tmp_path, "--configfile", "fps.yaml", "-n").stdout)
    assert "extract_frames" in plan


def test_a_keyframe_that_is_not_a_frame_is_a_clear_error(tmp_path, clip):
    keyframes = json.loads(open(clip["keyframes"]).read())
    keyframes["images"][0]["file_name"] = "00099.jpg"
    (tmp_path / "bad.json").write_text(json.dumps(keyframes))
    config = {
        "collections": {
            "clip": {"video": str(clip["video"]), "templates": str(tmp_path / "bad.json")}
        },
        "model": {"checkpoint": "random", "image_size": 64},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--configfile", "config.yaml", check=False)
    assert result.returncode != 0
    assert "00099.jpg" in result.stdout + result.stderr


def test_a_collection_needs_exactly_one_source(tmp_path, clip):
    config = {
        "collections": {
            "clip": {
                "video": str(clip["video"]),
                "images": str(tmp_path),
                "templates": str(clip["keyframes"]),
            }
        }
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--configfile", "config.yaml", "-n", check=False)
    assert result.returncode != 0 and "exactly one of images" in result.stdout + result.stderr


# slow: trains an adapter on a clip and segments it twice (~30 s on 2 cores); adapters
# are reloaded in the default suite by test_cli.py's photo fine-tuning test
@pytest.mark.slow
def test_cli_video_trains_then_reloads_the_trained_weights(tmp_path, clip, capsys):
    """The old tool's recipe: train with --use_lora, then predict later with
    --checkpoint and --skip_training, on the frames folder; the reloaded adapter gives
    the same masks as the run that trained it."""
    first = tmp_path / "train"
    code = main(
        [
            "video",
            "--input",
            str(clip["video"]),
            "--annotations",
            str(clip["keyframes"]),
            "--output_dir",
            str(first),
            "--sam2_checkpoint",
            "random",
            "--model_cfg",
            "sam2.1_hiera_t",
            "--image_size",
            "64",
            "--use_lora",
            "--lora_rank",
            "4",
            "--epochs",
            "1",
            "--learning_rate",
            "1e-4",
            "--max_images_per_epoch",
            "2",
            "--accumulation_steps",
            "1",
            "--fps",
            str(FPS),
            "--max_frames",
            "10",
            "--export_predictions",
            "video_predictions.json",
            "--overlay_video",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert len(list((first / "frames").iterdir())) == 10
    assert (first / "finetune" / "adapter" / "adapter_model.safetensors").is_file()
    assert count_frames(first / "overlay.mp4") == 10
    _, trained = _masks_by_frame(first / "video_predictions.json")

    second = tmp_path / "predict"
    code = main(
        [
            "video",
            "--video_dir",
            str(first / "frames"),
            "--annotations",
            str(clip["keyframes"]),
            "--output_dir",
            str(second),
            "--sam2_checkpoint",
            "random",
            "--image_size",
            "64",
            "--checkpoint",
            str(first / "finetune" / "adapter"),
            "--skip_training",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    coco, reloaded = _masks_by_frame(second / "predictions.json")
    assert coco["info"]["model"]["adapter_kind"] == "lora"
    assert reloaded.keys() == trained.keys()
    assert all(np.array_equal(reloaded[k], trained[k]) for k in trained)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--video_dir", "x"], "one of them"),
        ([], "one of them"),
        (["--epochs", "2"], "need --use_lora"),
        (["--use_lora", "--checkpoint", "somewhere"], "--skip_training"),
    ],
)
def test_cli_video_flag_errors(tmp_path, clip, capsys, args, message):
    base = [
        "video",
        "--annotations",
        str(clip["keyframes"]),
        "--output_dir",
        str(tmp_path / "o"),
        "--sam2_checkpoint",
        "random",
    ]
    if "--video_dir" in args or not args:
        argv = base + args + (["--input", str(clip["video"])] if args else [])
    else:
        argv = base + ["--input", str(clip["video"])] + args
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_video_keyframe_not_a_frame(tmp_path, clip, capsys):
    keyframes = json.loads(open(clip["keyframes"]).read())
    keyframes["images"][0]["file_name"] = "00099.jpg"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(keyframes))
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
    code = main(
        [
            "video",
            "--input",
            str(clip["video"]),
            "--annotations",
            str(bad),
            "--output_dir",
            str(tmp_path / "o"),
            "--sam2_checkpoint",
            "random",
            "--image_size",
            "64",
        ]
    )
    assert code == 2
    err = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("sam2pal: error")
    ]
    assert len(err) == 1 and "00099.jpg" in err[0] and "bad.json" in err[0]


# -- an interrupted video run resumes with the same results -------------------------------


@pytest.fixture(scope="module")
def spread_keyframes(tmp_path_factory, clip):
    """The clip's frames, with structure 1 first annotated on frame 4 and the others on
    frame 9 (so frames 4..8 are tracked backwards first, their results spilled to disk),
    and the records of an uninterrupted run."""
    from sam2pal.inference import pipeline
    from sam2pal.io.video import extract_frames

    folder = tmp_path_factory.mktemp("spread")
    frames, manifest = folder / "frames", folder / "frames.csv"
    extract_frames(clip["video"], frames, manifest)
    keyframes = json.loads(open(clip["keyframes"]).read())
    names = {im["id"]: im["file_name"] for im in keyframes["images"]}
    keyframes["annotations"] = [
        a
        for a in keyframes["annotations"]
        if names[a["image_id"]] != "00004.jpg" or a["category_id"] == 1
    ]
    assert {a["category_id"] for a in keyframes["annotations"]} != {1}
    (folder / "keyframes.json").write_text(json.dumps(keyframes))
    templates = folder / "templates.json"
    pipeline.prepare_templates(str(folder / "keyframes.json"), frames, templates)
    common = dict(
        mode="video",
        checkpoint="random",
        image_size=64,
        device="cpu",
        progress=False,
        on_bad_image="fail",
        checkpoint_seconds=0,
        engine_settings={"cycle_consistency": False, "bbox_clamp": True},
    )

    def run(out, log=None, **changes):
        settings = {**common, **changes}
        return pipeline.segment_video(
            templates,
            frames,
            manifest,
            out / "records.jsonl",
            out / "run.json",
            log=log,
            **settings,
        )

    run(folder / "reference")
    return {
        "frames": frames,
        "run": run,
        "reference": (folder / "reference" / "records.jsonl").read_bytes(),
    }


@pytest.mark.parametrize("broken, kept", [(6, 0), (10, 10)])
def test_interrupted_video_resumes_with_the_same_results(tmp_path, spread_keyframes, broken, kept):
    """A run stopped by an unreadable frame (on_bad_image: fail), rerun once the frame
    is back, goes on from its last checkpoint and writes exactly the records of an
    uninterrupted run. Frame 6 stops it in the backward sweep (nothing written yet,
    the spilled frames 8 and 7 kept), frame 10 in the forward sweep (10 frames kept)."""
    from sam2pal.errors import InputError

    data = spread_keyframes
    frame = data["frames"] / f"{broken:05d}.jpg"
    good = frame.read_bytes()
    out = tmp_path / "run"
    partial = out / "records.jsonl.partial"
    try:
        frame.write_bytes(b"not a picture")
        with pytest.raises(InputError, match=f"{broken:05d}.jpg"):
            data["run"](out)
    finally:
        frame.write_bytes(good)
    assert partial.is_file() and (out / "records.jsonl.partial.state").is_file()
    assert not (out / "records.jsonl").exists()

    logs = []
    counts = data["run"](out, log=logs.append)
    assert any(line.startswith("resuming") for line in logs), logs
    assert counts["resumed"] == kept and counts["segmented"] == N_FRAMES - kept
    assert (out / "records.jsonl").read_bytes() == data["reference"]
    assert sorted(p.name for p in out.iterdir()) == ["records.jsonl", "run.json"]


def test_an_interrupted_video_is_not_resumed_with_other_settings(tmp_path, spread_keyframes):
    from sam2pal.errors import InputError

    data = spread_keyframes
    frame = data["frames"] / "00010.jpg"
    good = frame.read_bytes()
    out = tmp_path / "run"
    try:
        frame.write_bytes(b"not a picture")
        with pytest.raises(InputError):
            data["run"](out)
    finally:
        frame.write_bytes(good)
    logs = []
    counts = data["run"](
        out, log=logs.append, engine_settings={"cycle_consistency": False, "fill_hole_area": 0}
    )
    assert not any(line.startswith("resuming") for line in logs)
    assert counts["resumed"] == 0 and counts["segmented"] == N_FRAMES
