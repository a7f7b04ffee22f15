"""Framing a photo in the model's square: the geometry of both framings, the stretched
frame against the engine's own resizes (bit for bit), the letterbox's way back to the
photo's pixels (exact where the sizes line up, a linear ramp where they do not), and
the letterbox's fill colours."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sam2pal.inference.engine import (
    IMG_MEAN,
    IMG_STD,
    binary_mask_input,
    preprocess,
    upsample_to_box,
)
from sam2pal.inference.framing import (
    FRAMINGS,
    Frame,
    fill_colour,
    frame_index,
    framed_image,
    framed_masks,
    make_frame,
    parse_fill,
    unframe_to_box,
)
from sam2pal.io.masks import BoxMask, mask_iou, source_index

SIZE = 64
LOW = SIZE // 4


def _photo(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _masks(rng, count, height, width):
    masks = np.zeros((count, height, width), bool)
    for b in range(count):
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        masks[b, y0 : y0 + int(rng.integers(1, height)), x0 : x0 + int(rng.integers(1, width))] = 1
        masks[b] ^= rng.random((height, width)) < 0.03
    return masks


def _inner(frame: Frame, array: np.ndarray) -> np.ndarray:
    return array[
        ...,
        frame.top : frame.top + frame.inner_height,
        frame.left : frame.left + frame.inner_width,
    ]


# -- geometry ------------------------------------------------------------------------------


def test_the_framings():
    assert FRAMINGS == ("stretch", "letterbox")


def test_a_stretched_frame_fills_the_square():
    frame = make_frame(300, 100, SIZE)
    assert frame == Frame(300, 100, SIZE, 0, 0, SIZE, SIZE)
    assert frame.stretched
    assert make_frame(300, 100, SIZE, "stretch") == frame


def test_letterbox_keeps_the_aspect_ratio_and_centres_the_photo():
    # tall: 100 * 64 / 300 = 21.33 -> 21 columns, (64 - 21) // 2 = 21 to the left
    assert make_frame(300, 100, SIZE, "letterbox") == Frame(300, 100, SIZE, 0, 21, 64, 21)
    # wide: 90 * 64 / 200 = 28.8 -> 29 rows, (64 - 29) // 2 = 17 above
    assert make_frame(90, 200, SIZE, "letterbox") == Frame(90, 200, SIZE, 17, 0, 29, 64)
    # a half pixel rounds up: 3 * 4 / 8 = 1.5 -> 2
    assert make_frame(3, 8, 4, "letterbox") == Frame(3, 8, 4, 1, 0, 2, 4)
    # a sliver keeps one pixel
    assert make_frame(1, 1000, SIZE, "letterbox") == Frame(1, 1000, SIZE, 31, 0, 1, SIZE)
    # a square photo is stretched either way
    square = make_frame(500, 500, SIZE, "letterbox")
    assert square.stretched and square == make_frame(500, 500, SIZE)
    assert not make_frame(300, 100, SIZE, "letterbox").stretched


@pytest.mark.parametrize("size", [64, 1024])
def test_letterbox_geometry_over_many_sizes(size):
    rng = np.random.default_rng(size)
    for _ in range(500):
        height, width = (int(v) for v in rng.integers(1, 5000, 2))
        frame = make_frame(height, width, size, "letterbox")
        longest = max(height, width)
        for side, inner, start in (
            (height, frame.inner_height, frame.top),
            (width, frame.inner_width, frame.left),
        ):
            exact = side * size / longest
            assert 1 <= inner <= size
            assert abs(inner - exact) <= 0.5 or inner == 1
            if side == longest:
                assert inner == size and start == 0
            # centred: the margins differ by at most a pixel, the extra one after the photo
            assert start == (size - inner) // 2
            assert 0 <= (size - inner - start) - start <= 1


def test_bad_frames_raise():
    with pytest.raises(ValueError, match="framing: expected one of stretch, letterbox"):
        make_frame(10, 20, SIZE, "crop")
    with pytest.raises(ValueError, match="at least 1 pixel"):
        make_frame(0, 20, SIZE, "letterbox")
    with pytest.raises(ValueError, match="axis"):
        frame_index(make_frame(10, 20, SIZE), 2, LOW)


# -- a stretched frame is what the engine did ----------------------------------------------


def test_a_stretched_image_is_the_engine_preprocess():
    rng = np.random.default_rng(0)
    for height, width in [(SIZE, SIZE), (90, 140), (37, 300), (200, 20), (5, 7)]:
        rgb = _photo(rng, height, width)
        framed = framed_image(rgb, make_frame(height, width, SIZE))
        assert framed.shape == (SIZE, SIZE, 3) and framed.dtype == np.uint8
        pillow = Image.fromarray(rgb).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        assert np.array_equal(framed, np.asarray(pillow))
        # normalised as preprocess normalises, it is preprocess's tensor bit for bit
        tensor = torch.from_numpy(framed / 255.0).permute(2, 0, 1).float()
        tensor -= torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
        tensor /= torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]
        assert torch.equal(tensor[None], preprocess(rgb, SIZE, torch.device("cpu")))


def test_a_reduced_photo_is_resized_to_the_frame():
    rng = np.random.default_rng(1)
    reduced = _photo(rng, 50, 75)  # a 200 x 300 photo decoded at a quarter of its size
    stretched = framed_image(reduced, make_frame(200, 300, SIZE))
    expected = Image.fromarray(reduced).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    assert np.array_equal(stretched, np.asarray(expected))
    frame = make_frame(200, 300, SIZE, "letterbox")
    boxed = framed_image(reduced, frame, fill=0)
    inner = Image.fromarray(reduced).resize(
        (frame.inner_width, frame.inner_height), Image.Resampling.BICUBIC
    )
    assert np.array_equal(_inner(frame, boxed.transpose(2, 0, 1)).transpose(1, 2, 0), inner)


def test_stretched_masks_are_the_engine_mask_input():
    rng = np.random.default_rng(2)
    for height, width in [(SIZE, SIZE), (90, 140), (37, 300), (200, 20), (5, 7)]:
        masks = _masks(rng, 3, height, width)
        framed = framed_masks(masks, make_frame(height, width, SIZE))
        assert framed.shape == (3, SIZE, SIZE) and framed.dtype == np.float32
        engine = binary_mask_input(masks, SIZE, torch.device("cpu"))[:, 0].numpy()
        assert np.array_equal(framed, engine)
        assert set(np.unique(framed)) <= {0.0, 1.0}
        frame = make_frame(height, width, SIZE, "letterbox")
        on_device = framed_masks(masks, frame, device=torch.device("cpu"))
        assert np.array_equal(on_device, framed_masks(masks, frame))
    # two-pixel stripes halved: resized values of exactly 0.5, which are in the mask
    stripes = np.zeros((4, 2 * SIZE, 2 * SIZE), bool)
    for b in range(4):
        stripes[b, :, b + 10 : b + 12] = True
    framed = framed_masks(stripes, make_frame(2 * SIZE, 2 * SIZE, SIZE))
    resized = F.interpolate(
        torch.from_numpy(stripes[:, None].astype(np.float32)),
        size=(SIZE, SIZE),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    assert (resized == 0.5).any()
    assert np.array_equal(framed, binary_mask_input(stripes, SIZE, torch.device("cpu"))[:, 0])
    assert np.array_equal(framed, (resized[:, 0] >= 0.5).float().numpy())
    assert framed_masks(np.zeros((0, 30, 40), bool), make_frame(30, 40, SIZE)).shape == (
        0,
        SIZE,
        SIZE,
    )


def test_a_stretched_frame_index_is_the_source_index():
    for height, width in [(SIZE, SIZE), (90, 140), (3000, 4000), (7, 5), (1, 1)]:
        for size in (SIZE, 1024):
            frame = make_frame(height, width, size)
            for low in (LOW, 256, 3):
                for axis, n in ((0, height), (1, width)):
                    got, expected = frame_index(frame, axis, low), source_index(n, low)
                    for a, b in zip(got, expected):
                        assert a.dtype == b.dtype and np.array_equal(a, b)
    # the long side of a letterbox fills the square: that axis is the stretched one's
    frame = make_frame(300, 100, SIZE, "letterbox")
    for a, b in zip(frame_index(frame, 0, LOW), source_index(300, LOW)):
        assert np.array_equal(a, b)


def test_stretched_unframing_is_the_engine_upsample():
    """Random logits (sparse, dense, all below, all above): the very mask of the
    engine's `upsample_to_box`, and of torch's full-size resize."""
    rng = np.random.default_rng(3)
    for trial in range(120):
        h, w = (LOW, LOW) if trial % 3 else (int(rng.integers(2, 40)), int(rng.integers(2, 40)))
        height, width = int(rng.integers(h // 2 + 1, 300)), int(rng.integers(w // 2 + 1, 300))
        logits = (rng.normal(size=(h, w)) - rng.uniform(0, 3)).astype(np.float32)
        if trial % 10 == 0:
            logits[:] = -1.0
        if trial % 10 == 1:
            logits[:] = 2.0
        threshold = 0.0 if trial % 4 else float(rng.normal())
        frame = make_frame(height, width, SIZE)
        got = unframe_to_box(torch.from_numpy(logits), frame, threshold)
        engine = upsample_to_box(torch.from_numpy(logits), (height, width), threshold)
        assert got.size == (height, width)
        assert (got.y0, got.x0) == (engine.y0, engine.x0)
        assert np.array_equal(got.crop, engine.crop), trial
        full = F.interpolate(
            torch.from_numpy(logits)[None, None],
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )
        assert np.array_equal(got.full(), (full[0, 0] > threshold).numpy()), trial
        # numpy logits give the same
        same = unframe_to_box(logits, frame, threshold)
        assert (same.y0, same.x0) == (got.y0, got.x0) and np.array_equal(same.crop, got.crop)


def test_unframing_a_photo_smaller_than_the_grid():
    """A cell above the threshold that no pixel of a small photo reads: an empty mask,
    as torch's resize gives (the engine's `upsample_to_box` raised an IndexError)."""
    logits = torch.full((LOW, LOW), -1.0)
    logits[3, 3] = 5.0  # 5 pixels over 16 cells read cells 1-2, 4-5, 7-8, ...: not cell 3
    assert 3 not in np.concatenate(source_index(5, LOW)[:2])
    frame = make_frame(5, 5, SIZE)
    full = F.interpolate(logits[None, None], size=(5, 5), mode="bilinear", align_corners=False)
    assert not (full > 0).any()
    mask = unframe_to_box(logits, frame)
    assert mask.size == (5, 5) and mask.area == 0


# -- a letterbox goes back to the photo's pixels ---------------------------------------------


def test_letterbox_round_trip_is_pixel_exact_where_the_sizes_line_up():
    """A photo whose letterbox is the square's own size: framing an image or masks pastes
    them unchanged, and unframing logits of the square's size reads back the very
    pixels."""
    rng = np.random.default_rng(4)
    for height, width in [(SIZE, SIZE // 2), (SIZE // 2, SIZE), (SIZE, 10), (24, SIZE)]:
        frame = make_frame(height, width, SIZE, "letterbox")
        assert (frame.inner_height, frame.inner_width) == (height, width)
        rgb = _photo(rng, height, width)
        image = framed_image(rgb, frame, fill="7,8,9")
        assert np.array_equal(_inner(frame, image.transpose(2, 0, 1)).transpose(1, 2, 0), rgb)
        masks = _masks(rng, 4, height, width)
        framed = framed_masks(masks, frame)
        assert np.array_equal(_inner(frame, framed), masks.astype(np.float32))
        assert framed.sum() == masks.sum()  # nothing in the margins
        for b in range(len(masks)):
            logits = torch.from_numpy(framed[b] * 2.0 - 1.0)
            back = unframe_to_box(logits, frame)
            assert back.size == (height, width)
            assert np.array_equal(back.full(), masks[b])
            assert back.rle() == BoxMask.from_full(masks[b]).rle()


def test_letterbox_round_trip_through_the_low_resolution_grid():
    """A photo four times the grid's letterbox: each photo pixel reads one grid cell."""
    rng = np.random.default_rng(5)
    height, width = LOW, LOW // 2  # the letterbox at grid resolution: LOW x LOW // 2
    frame = make_frame(height, width, SIZE, "letterbox")
    cells = rng.normal(size=(LOW, LOW)).astype(np.float32)
    mask = unframe_to_box(cells, frame).full()
    left = (LOW - width) // 2
    assert np.array_equal(mask, cells[:, left : left + width] > 0)


def test_letterbox_of_a_ramp_is_the_ramp_at_the_mapped_coordinates():
    """Bilinear interpolation of a linear ramp is the ramp itself: unframed, a ramp of
    logits over the grid reads at each photo pixel the ramp's value where that pixel's
    centre falls in the square (clamped to the grid's cell centres), thresholded."""
    low = 32
    a, b, c = 0.37, -0.21, 1.5
    cell = np.arange(low, dtype=np.float64)
    ramp = (a * cell[:, None] + b * cell[None, :] + c).astype(np.float32)
    for height, width in [(90, 200), (200, 90), (333, 71), (17, 23)]:
        frame = make_frame(height, width, SIZE, "letterbox")
        # the centre of photo pixel i, as a fraction of the photo, in the square and in
        # the grid's cell coordinates
        ys = frame.top + (np.arange(height) + 0.5) / height * frame.inner_height
        xs = frame.left + (np.arange(width) + 0.5) / width * frame.inner_width
        gy = np.clip(ys * low / SIZE - 0.5, 0, low - 1)
        gx = np.clip(xs * low / SIZE - 0.5, 0, low - 1)
        expected = a * gy[:, None] + b * gx[None, :] + c
        # the index maps land on those coordinates
        for axis, coords in ((0, gy), (1, gx)):
            i0, i1, weight = frame_index(frame, axis, low)
            assert np.allclose(i0 + weight * (i1 - i0), coords, atol=1e-5)
        for threshold in np.linspace(expected.min() + 0.01, expected.max() - 0.01, 9):
            mask = unframe_to_box(torch.from_numpy(ramp), frame, float(threshold)).full()
            sure = np.abs(expected - threshold) > 1e-4
            assert np.array_equal(mask[sure], (expected > threshold)[sure])
            assert mask.any() and not mask.all()


def test_letterbox_masks_survive_the_trip_through_the_model_grid():
    """A template's masks framed, pooled to the grid as the model's logits would be, and
    unframed: the photo's masks again, up to the grid's resolution."""
    for height, width in [(300, 170), (120, 410)]:
        frame = make_frame(height, width, SIZE, "letterbox")
        masks = np.zeros((2, height, width), bool)
        masks[0, height // 5 : height // 2, width // 4 : 3 * width // 4] = True
        masks[1, height // 2 :, : width // 3] = True
        framed = torch.from_numpy(framed_masks(masks, frame))
        pooled = F.avg_pool2d(framed[:, None], SIZE // LOW)[:, 0] * 2.0 - 1.0
        for b in range(2):
            back = unframe_to_box(pooled[b], frame).full()
            assert mask_iou(back, masks[b]) > 0.85, (height, width, b)
        # cells in the margins above the threshold are not the photo's
        margin = torch.full((LOW, LOW), -1.0)
        if frame.top:
            margin[0] = 1.0
        else:
            margin[:, 0] = 1.0
        assert unframe_to_box(margin, frame).area == 0


def test_letterbox_masks_are_the_antialiased_resize_in_the_rectangle():
    rng = np.random.default_rng(7)
    height, width = 150, 90
    frame = make_frame(height, width, SIZE, "letterbox")
    masks = _masks(rng, 3, height, width)
    framed = framed_masks(masks, frame)
    resized = F.interpolate(
        torch.from_numpy(masks[:, None].astype(np.float32)),
        size=(frame.inner_height, frame.inner_width),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    assert np.array_equal(_inner(frame, framed), (resized[:, 0] >= 0.5).float().numpy())
    outside = framed.copy()
    _inner(frame, outside)[:] = 0
    assert not outside.any()


# -- fill colours ------------------------------------------------------------------------------


def test_the_border_fill_is_the_median_of_the_outermost_ring():
    rng = np.random.default_rng(8)
    rgb = _photo(rng, 40, 60)  # the inside: noise
    ring = np.zeros((40, 60), bool)
    ring[0] = ring[-1] = ring[:, 0] = ring[:, -1] = True
    rgb[ring] = (10, 200, 30)
    # a few odd pixels on the ring (a structure touching the edge) do not move the median
    rgb[0, :5] = (255, 0, 255)
    rgb[10:14, -1] = (0, 0, 0)
    assert fill_colour(rgb, "border") == (10, 200, 30)
    assert fill_colour(rgb) == (10, 200, 30)
    frame = make_frame(40, 60, SIZE, "letterbox")
    image = framed_image(rgb, frame)
    margins = np.ones((SIZE, SIZE), bool)
    _inner(frame, margins)[:] = False
    assert margins.any() and (image[margins] == (10, 200, 30)).all()


def test_the_border_of_tiny_photos():
    # the ring of a photo one or two pixels thick is the whole photo, each pixel once
    row = np.array([[[0, 0, 0], [10, 10, 10], [10, 10, 10], [12, 12, 12], [250, 0, 7]]], np.uint8)
    assert fill_colour(row, "border") == (10, 10, 10)
    assert fill_colour(row.transpose(1, 0, 2), "border") == (10, 10, 10)
    assert fill_colour(np.full((1, 1, 3), 42, np.uint8), "border") == (42, 42, 42)
    two = np.array([[[10, 0, 0], [13, 1, 0]]], np.uint8)
    assert fill_colour(two, "border") == (12, 0, 0)  # 11.5 -> 12 (halves to even), 0.5 -> 0
    three = np.zeros((3, 3, 3), np.uint8)
    three[1, 1] = 255  # the only pixel off the ring
    three[0, 0] = three[2, 2] = 9
    assert fill_colour(three, "border") == (0, 0, 0)


@pytest.mark.parametrize(
    ("value", "colour"),
    [
        ("border", "border"),
        (" Border ", "border"),
        (0, (0, 0, 0)),
        (255, (255, 255, 255)),
        (np.int64(7), (7, 7, 7)),
        (128.0, (128, 128, 128)),
        ("128", (128, 128, 128)),
        ("12,34,56", (12, 34, 56)),
        (" 12, 34 ,56 ", (12, 34, 56)),
        ([1, 2, 3], (1, 2, 3)),
        ((1, 2, 3), (1, 2, 3)),
        (["1", "2", "3"], (1, 2, 3)),
        (np.array([4, 5, 6]), (4, 5, 6)),
    ],
)
def test_fill_values(value, colour):
    assert parse_fill(value) == colour
    assert parse_fill(parse_fill(value)) == colour
    if colour != "border":
        rgb = np.full((20, 10, 3), 99, np.uint8)
        assert fill_colour(rgb, value) == colour
        frame = make_frame(20, 10, 16, "letterbox")
        image = framed_image(rgb, frame, fill=value)
        assert (image[:, : frame.left] == colour).all()
        assert (image[:, frame.left + frame.inner_width :] == colour).all()


@pytest.mark.parametrize(
    "value",
    [
        "",
        "white",
        "1,2",
        "1,2,3,4",
        "1,2,x",
        "256",
        "-1",
        "12.5",
        "nan",
        12.5,
        -3,
        300,
        True,
        None,
        [1, 2],
        [1, 2, 300],
        [1, 2, True],
        [[1, 2, 3]],
        {"r": 1},
        float("nan"),
    ],
)
def test_bad_fill_values_raise_one_line(value):
    with pytest.raises(ValueError) as raised:
        parse_fill(value)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("framing_fill: expected")
    assert repr(value) in message
    # every function that takes a fill checks it, a stretched frame too
    rgb = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="framing_fill"):
        fill_colour(rgb, value)
    with pytest.raises(ValueError, match="framing_fill"):
        framed_image(rgb, make_frame(8, 8, 16), fill=value)


def test_the_module_imports_no_torch():
    """The settings layer names the framings without torch."""
    code = (
        "import sys, sam2pal.inference.framing\n"
        "print(','.join(sorted(m for m in ('torch', 'sam2') if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
