"""Video input/output: frame extraction, manifests, encoding, the synthetic clip.

Everything runs the real ffmpeg (`sam2pal.io.video.ffmpeg_exe`) on small clips (160 x 120,
16 frames at 8 fps), so the whole file takes a few seconds.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam2pal.errors import InputError
from sam2pal.io import video
from sam2pal.io.images import read_image
from sam2pal.io.masks import decode_segmentation
from sam2pal.synth import specimens as synthetic

FPS = 8
N_FRAMES = 16
SIZE = (160, 120)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The synthetic clip, ffmpeg's own decoding of it, and its ground truth."""
    out = tmp_path_factory.mktemp("clip")
    info = synthetic.make_video(
        out, n_frames=N_FRAMES, fps=FPS, seed=1, size=SIZE, keyframes=(0, 5)
    )
    info["decoded"] = list(video.read_video_frames(info["video"]))
    return info


def ffmpeg(*args: str) -> None:
    """Run the same ffmpeg the package uses, to make test inputs."""
    cmd = [video.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    subprocess.run(cmd, check=True, capture_output=True)


def contrast(image: np.ndarray, labels: np.ndarray) -> float:
    """How much darker the pixels inside the specimen mask are than those outside."""
    gray = image.astype(np.float64).mean(axis=2)
    return float(gray[labels == 0].mean() - gray[labels > 0].mean())


def frame_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def no_leftovers(folder: Path) -> bool:
    """No temporary files or folders (names starting with '.') left in `folder`."""
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# -- extraction ----------------------------------------------------------------------


def test_extract_every_frame_matches_ffmpeg_and_ground_truth(clip, tmp_path):
    frames, manifest = tmp_path / "frames", tmp_path / "frames.csv"
    rows = video.extract_frames(clip["video"], frames, manifest)

    assert len(rows) == video.count_frames(clip["video"]) == N_FRAMES == len(clip["decoded"])
    names = [f"{k:05d}.jpg" for k in range(N_FRAMES)]
    assert frame_files(frames) == names
    assert [r.index for r in rows] == list(range(N_FRAMES))
    assert [r.file for r in rows] == names
    np.testing.assert_allclose([r.time_s for r in rows], np.arange(N_FRAMES) / FPS, atol=1e-6)
    assert video.read_manifest(manifest) == rows
    lines = manifest.read_text().splitlines()
    assert lines[0] == "index,file,time_s"
    assert lines[1] == "0,00000.jpg,0.000000" and lines[3] == "2,00002.jpg,0.250000"
    assert no_leftovers(tmp_path)

    labels = clip["labels"]
    for k, row in enumerate(rows):
        image = read_image(frames / row.file)
        assert image.shape == (SIZE[1], SIZE[0], 3)
        # the same picture as ffmpeg's own decoding of frame k, up to JPEG loss
        assert np.abs(image.astype(float) - clip["decoded"][k]).mean() < 3
        # and the specimen sits where frame k's ground truth says, not frame k +- 1's
        scores = [contrast(image, lab) for lab in labels]
        assert int(np.argmax(scores)) == k
        assert scores[k] > 40


def test_png_frames_are_lossless(clip, tmp_path):
    rows = video.extract_frames(
        clip["video"], tmp_path / "f", tmp_path / "m.csv", image_format="png"
    )
    assert [r.file for r in rows] == [f"{k:05d}.png" for k in range(N_FRAMES)]
    for k in (0, 7, N_FRAMES - 1):
        np.testing.assert_array_equal(read_image(tmp_path / "f" / rows[k].file), clip["decoded"][k])


def closest_decoded(clip, path: Path) -> int:
    image = read_image(path).astype(float)
    return int(np.argmin([np.abs(image - d).mean() for d in clip["decoded"]]))


def test_fps_resampling_halves_the_frames(clip, tmp_path):
    rows = video.extract_frames(clip["video"], tmp_path / "f", tmp_path / "m.csv", fps=FPS / 2)
    assert len(rows) == N_FRAMES // 2
    np.testing.assert_allclose(
        [r.time_s for r in rows], np.arange(N_FRAMES // 2) * 2 / FPS, atol=1e-6
    )
    for j, row in enumerate(rows):  # frame j of the 4 fps series is source frame 2j
        assert closest_decoded(clip, tmp_path / "f" / row.file) == 2 * j


@pytest.mark.parametrize(
    "start, end, first, count",
    [(0.5, 1.5, 4, 8), (1.0, None, 8, 8), (None, 0.75, 0, 6), (0.25, 0.26, 2, 1)],
)
def test_start_and_end_cut_the_source_times(clip, tmp_path, start, end, first, count):
    rows = video.extract_frames(
        clip["video"], tmp_path / "f", tmp_path / "m.csv", start=start, end=end
    )
    assert len(rows) == count
    assert frame_files(tmp_path / "f") == [f"{k:05d}.jpg" for k in range(count)]
    # times are source-video times (ffmpeg restarts them at the seek point; start is added back)
    np.testing.assert_allclose(
        [r.time_s for r in rows], (first + np.arange(count)) / FPS, atol=1e-6
    )
    assert closest_decoded(clip, tmp_path / "f" / rows[0].file) == first
    assert closest_decoded(clip, tmp_path / "f" / rows[-1].file) == first + count - 1


def test_start_with_fps_and_max_frames(clip, tmp_path):
    rows = video.extract_frames(
        clip["video"], tmp_path / "f", tmp_path / "m.csv", start=0.5, fps=4, max_frames=3
    )
    np.testing.assert_allclose([r.time_s for r in rows], [0.5, 0.75, 1.0], atol=1e-6)
    assert [closest_decoded(clip, tmp_path / "f" / r.file) for r in rows] == [4, 6, 8]


def test_max_frames_keeps_the_first_frames(clip, tmp_path):
    rows = video.extract_frames(clip["video"], tmp_path / "f", tmp_path / "m.csv", max_frames=5)
    assert frame_files(tmp_path / "f") == [f"{k:05d}.jpg" for k in range(5)]
    np.testing.assert_allclose([r.time_s for r in rows], np.arange(5) / FPS, atol=1e-6)
    assert video.read_manifest(tmp_path / "m.csv") == rows


@pytest.mark.parametrize("max_size, expected", [(80, (80, 60)), (100, (100, 75)), (1000, SIZE)])
def test_max_size_caps_the_longer_side(clip, tmp_path, max_size, expected):
    rows = video.extract_frames(
        clip["video"], tmp_path / "f", tmp_path / "m.csv", max_size=max_size, max_frames=2
    )
    with Image.open(tmp_path / "f" / rows[0].file) as im:
        assert im.size == expected


def test_portrait_video_caps_height(tmp_path):
    src = tmp_path / "portrait.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=96x160:rate=10",
        "-frames:v",
        "3",
        "-pix_fmt",
        "yuv420p",
        str(src),
    )
    rows = video.extract_frames(src, tmp_path / "f", tmp_path / "m.csv", max_size=80)
    assert len(rows) == 3
    with Image.open(tmp_path / "f" / rows[0].file) as im:
        assert im.size == (48, 80)


def test_reextraction_leaves_no_stale_frames(clip, tmp_path):
    frames, manifest = tmp_path / "f", tmp_path / "m.csv"
    video.extract_frames(clip["video"], frames, manifest)
    assert len(frame_files(frames)) == N_FRAMES
    rows = video.extract_frames(clip["video"], frames, manifest, max_frames=4)
    assert frame_files(frames) == [f"{k:05d}.jpg" for k in range(4)]
    assert video.read_manifest(manifest) == rows and len(rows) == 4
    assert no_leftovers(tmp_path)


def test_variable_frame_rate_keeps_every_frame_and_its_time(tmp_path):
    # frames 0-5 every 1/8 s, then every 1/4 s: a constant-rate output would duplicate
    src = tmp_path / "vfr.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=8",
        "-frames:v",
        "12",
        "-vf",
        "setpts='if(lt(N,6),N/8,N/4)/TB'",
        "-fps_mode",
        "vfr",
        "-pix_fmt",
        "yuv420p",
        str(src),
    )
    rows = video.extract_frames(src, tmp_path / "f", tmp_path / "m.csv")
    assert len(rows) == video.count_frames(src) == 12
    expected = [k / 8 for k in range(6)] + [k / 4 for k in range(6, 12)]
    np.testing.assert_allclose([r.time_s for r in rows], expected, atol=1e-6)


# -- errors ----------------------------------------------------------------------------


def make_bad_input(kind: str, folder: Path, clip) -> Path:
    if kind == "missing":
        return folder / "nowhere.mp4"
    if kind == "text":
        path = folder / "notes.mp4"
        path.write_text("this is not a video\n")
        return path
    if kind == "audio":
        path = folder / "sound.m4a"
        ffmpeg(
            "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "0.5", "-c:a", "aac", str(path)
        )
        return path
    if kind == "codec":  # a Matroska file whose codec id no decoder knows
        mkv = folder / "plain.mkv"
        ffmpeg("-i", str(clip["video"]), "-c", "copy", str(mkv))
        path = folder / "odd_codec.mkv"
        data = mkv.read_bytes()
        assert b"V_MPEG4/ISO/AVC" in data
        path.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_XXXXX/ISO/XYZ"))
        mkv.unlink()
        return path
    return clip["video"]  # "late": start beyond the end


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "video file not found"),
        ("text", "not a video file that ffmpeg can read"),
        ("audio", "has no video stream"),
        ("codec", "cannot be decoded by this ffmpeg"),
        ("late", "start 5 s is at or beyond the end"),
    ],
)
def test_bad_input_raises_one_line_error_and_writes_nothing(clip, tmp_path, kind, message):
    src = make_bad_input(kind, tmp_path, clip)
    out = tmp_path / "out"
    out.mkdir()
    start = 5.0 if kind == "late" else None
    with pytest.raises(InputError) as err:
        video.extract_frames(src, out / "frames", out / "frames.csv", start=start)
    text = str(err.value)
    assert text.startswith(f"{src}: ") and message in text
    assert "\n" not in text and len(text) < 400
    assert list(out.iterdir()) == []  # no frames folder, no manifest, no temporary folder
    if kind != "late":
        with pytest.raises(InputError, match="^" + str(src)):
            video.count_frames(src)


def test_failed_reextraction_keeps_the_previous_frames(clip, tmp_path):
    frames, manifest = tmp_path / "f", tmp_path / "m.csv"
    rows = video.extract_frames(clip["video"], frames, manifest, max_frames=3)
    with pytest.raises(InputError, match="beyond the end"):
        video.extract_frames(clip["video"], frames, manifest, start=60)
    assert frame_files(frames) == [r.file for r in rows]
    assert video.read_manifest(manifest) == rows
    assert no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"start": -1}, "start must be >= 0"),
        ({"start": 2, "end": 1}, "end"),
        ({"fps": 0}, "fps must be positive"),
        ({"max_frames": 0}, "max_frames"),
        ({"max_size": -5}, "max_size"),
        ({"image_format": "gif"}, "image_format"),
        ({"jpeg_quality": 95}, "jpeg_quality"),
    ],
)
def test_bad_settings_are_rejected(clip, tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        video.extract_frames(clip["video"], tmp_path / "f", tmp_path / "m.csv", **kwargs)
    assert list(tmp_path.iterdir()) == []


# -- frames the user extracted ------------------------------------------------------------


def touch_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pixel = Image.new("RGB", (4, 4))
    for name in names:
        pixel.save(folder / name)


def test_frames_from_dir_orders_integer_stems_by_value(tmp_path):
    touch_images(tmp_path / "f", ["10.jpg", "2.jpg", "0.jpg", "1.jpg", "003.jpg"])
    (tmp_path / "f" / "notes.txt").write_text("not a frame")
    rows = video.frames_from_dir(tmp_path / "f", tmp_path / "m.csv", fps=4)
    assert [r.file for r in rows] == ["0.jpg", "1.jpg", "2.jpg", "003.jpg", "10.jpg"]
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    assert [r.time_s for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert video.read_manifest(tmp_path / "m.csv") == rows


def test_frames_from_dir_natural_sort_and_no_times(tmp_path):
    touch_images(tmp_path / "f", ["frame10.png", "frame2.png", "frame1.png", "Frame3.jpg"])
    rows = video.frames_from_dir(tmp_path / "f", tmp_path / "m.csv")
    assert [r.file for r in rows] == ["frame1.png", "frame2.png", "Frame3.jpg", "frame10.png"]
    assert all(r.time_s is None for r in rows)
    assert (tmp_path / "m.csv").read_text().splitlines()[1] == "0,frame1.png,"
    assert video.read_manifest(tmp_path / "m.csv") == rows


def test_frames_from_dir_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        video.frames_from_dir(tmp_path / "empty", tmp_path / "m.csv")
    with pytest.raises(InputError, match="not found"):
        video.frames_from_dir(tmp_path / "missing", tmp_path / "m.csv")
    touch_images(tmp_path / "dup", ["1.jpg", "01.jpg"])
    with pytest.raises(InputError, match="same number"):
        video.frames_from_dir(tmp_path / "dup", tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("frame,file,time\n0,a.jpg,0\n", "header"),
        ("", "empty"),
        ("index,file,time_s\n0,a.jpg,0\n2,b.jpg,1\n", "out of order"),
        ("index,file,time_s\n1,a.jpg,0\n", "out of order"),
        ("index,file,time_s\nx,a.jpg,0\n", "not an integer"),
        ("index,file,time_s\n0,,0\n", "empty file name"),
        ("index,file,time_s\n0,a.jpg,soon\n", "not a number"),
        ("index,file,time_s\n0,a.jpg\n", "3 fields"),
    ],
)
def test_read_manifest_validates(tmp_path, text, message):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        video.read_manifest(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_read_manifest_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        video.read_manifest(tmp_path / "none.csv")


# -- writing videos -------------------------------------------------------------------------


def smooth_frames(n: int, height: int, width: int):
    """Frames of a moving colour gradient (smooth, so H.264 keeps them close)."""
    yy, xx = np.mgrid[0:height, 0:width]
    for t in range(n):
        r = (xx * 255 / width + 8 * t) % 256
        g = yy * 255 / height
        b = np.full_like(r, 40 + 10 * t)
        yield np.stack([r, g, b], axis=2).astype(np.uint8)


def test_write_video_round_trip(tmp_path):
    path = tmp_path / "clip.mp4"
    assert video.write_video(smooth_frames(10, 48, 64), path, fps=5) == 10
    assert video.count_frames(path) == 10
    decoded = list(video.read_video_frames(path))
    assert len(decoded) == 10
    for original, back in zip(smooth_frames(10, 48, 64), decoded):
        assert back.shape == original.shape
        assert np.abs(back.astype(float) - original).mean() < 6
    rows = video.extract_frames(path, tmp_path / "f", tmp_path / "m.csv")
    np.testing.assert_allclose([r.time_s for r in rows], np.arange(10) / 5, atol=1e-6)
    assert no_leftovers(tmp_path)


def test_write_video_pads_odd_sizes(tmp_path):
    path = tmp_path / "odd.mp4"
    assert video.write_video(smooth_frames(3, 47, 63), path, fps=10) == 3
    assert video.count_frames(path) == 3
    first = next(video.read_video_frames(path))
    assert first.shape == (48, 64, 3)
    original = next(smooth_frames(1, 47, 63))
    assert np.abs(first[:47, :63].astype(float) - original).mean() < 6


def test_write_video_rejects_mismatched_frames(tmp_path):
    path = tmp_path / "bad.mp4"
    frames = [np.zeros((32, 32, 3), np.uint8), np.zeros((32, 34, 3), np.uint8)]
    with pytest.raises(InputError, match="frame 1 is 34x32"):
        video.write_video(frames, path, fps=5)
    with pytest.raises(InputError, match="RGB uint8"):
        video.write_video([np.zeros((32, 32), np.uint8)], path, fps=5)
    with pytest.raises(InputError, match="no frames"):
        video.write_video([], path, fps=5)
    assert list(tmp_path.iterdir()) == []


# -- the synthetic clip --------------------------------------------------------------------------


def test_make_video_is_deterministic_and_moves(clip, tmp_path):
    again = synthetic.make_video(
        tmp_path, n_frames=N_FRAMES, fps=FPS, seed=1, size=SIZE, keyframes=(0, 5)
    )
    assert again["mask_name"] == clip["mask_name"]
    for a, b in zip(again["labels"], clip["labels"]):
        np.testing.assert_array_equal(a, b)
    other = synthetic.make_video(tmp_path / "other", n_frames=3, fps=FPS, seed=2, size=SIZE)
    assert not np.array_equal(other["labels"][1], clip["labels"][1])

    labels = clip["labels"]
    assert len(labels) == N_FRAMES
    for t, lab in enumerate(labels):
        assert lab.dtype == np.uint8 and lab.shape == (SIZE[1], SIZE[0])
        assert set(np.unique(lab)) == {0, 1, 2, 3, 4, 5}  # every part visible
        border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
        assert not border.any()  # fully inside the frame
        if t:
            assert not np.array_equal(lab, labels[t - 1])  # it moves every frame


def test_make_video_coco_files(clip):
    gt = json.loads(Path(clip["ground_truth"]).read_text())
    kf = json.loads(Path(clip["keyframes"]).read_text())
    assert [c["name"] for c in gt["categories"]] == list(synthetic.PARTS.values())
    assert [im["id"] for im in gt["images"]] == list(range(N_FRAMES))
    assert [im["file_name"] for im in gt["images"]] == [f"{k:05d}.jpg" for k in range(N_FRAMES)]
    assert [a["id"] for a in gt["annotations"]] == list(range(1, len(gt["annotations"]) + 1))
    width, height = SIZE
    for ann in gt["annotations"]:
        mask = decode_segmentation(ann["segmentation"], height, width)
        np.testing.assert_array_equal(mask, clip["labels"][ann["image_id"]] == ann["category_id"])

    assert [im["file_name"] for im in kf["images"]] == ["00000.jpg", "00005.jpg"]
    assert all(im["id"] != im["frame_index"] for im in kf["images"])
    by_id = {im["id"]: im for im in kf["images"]}
    assert len(kf["annotations"]) == 10
    for ann in kf["annotations"]:
        frame = int(by_id[ann["image_id"]]["file_name"][:5])
        mask = decode_segmentation(ann["segmentation"], height, width)
        np.testing.assert_array_equal(mask, clip["labels"][frame] == ann["category_id"])


def test_make_video_rejects_bad_settings(tmp_path):
    with pytest.raises(InputError, match="even"):
        synthetic.make_video(tmp_path, size=(161, 120))
    with pytest.raises(InputError, match="keyframes"):
        synthetic.make_video(tmp_path, n_frames=4, keyframes=(4,))
    with pytest.raises(InputError, match="fps"):
        synthetic.make_video(tmp_path, fps=0)
    assert list(tmp_path.iterdir()) == []


def test_awkward_file_names(clip, tmp_path):
    # ':' reads as a protocol, a leading '-' as an option, '%' as a frame-number pattern
    folder = tmp_path / "take:2 at 50%"
    folder.mkdir()
    src = folder / "-clip:1.mp4"
    src.write_bytes(Path(clip["video"]).read_bytes())
    rows = video.extract_frames(src, folder / "frames %d", folder / "m:1.csv", max_frames=3)
    assert frame_files(folder / "frames %d") == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert video.read_manifest(folder / "m:1.csv") == rows
    assert video.count_frames(src) == N_FRAMES
    out = folder / "out%03d.mp4"
    assert video.write_video(video.read_video_frames(src), out, fps=FPS) == N_FRAMES
    assert video.count_frames(out) == N_FRAMES
