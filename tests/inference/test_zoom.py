"""The geometry of the zoom-in pass: windows around structures (padded past the photo's
edges, never shifted), the same framing on template and target, a missing structure placed
from a reference, crops of the photo and its masks, the way back from the model's logits to
the photo's grid (pixel-exact where the mask lines up with the logit grid, the bilinear rule
where it does not, torch's own resize for any logits), and windows grouped into clusters."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam2pal.inference.framing import fill_colour
from sam2pal.inference.zoom import (
    Crop,
    clusters,
    crop_around,
    crop_box,
    crop_image,
    crop_masks,
    paste_box,
    paste_logits,
    placed_from_reference,
    same_framing,
    union_crop,
)
from sam2pal.io.masks import BoxMask, mask_bbox

SIZE = 64
LOW = SIZE // 4


def _logits_of(mask: np.ndarray) -> torch.Tensor:
    """+10 on the mask, -10 off it."""
    return torch.from_numpy(np.where(mask, 10.0, -10.0).astype(np.float32))


def _window(crop: Crop) -> np.ndarray:
    """The window's part of the photo, as a full-size bool mask."""
    out = np.zeros(crop.size, bool)
    y0, y1, x0, x1 = crop.inside
    out[y0:y1, x0:x1] = True
    return out


# --------------------------------------------------------------------------------------
# windows
# --------------------------------------------------------------------------------------


def test_a_crop_knows_its_part_inside_the_photo():
    crop = Crop(-3, 5, 10, 20, 12)
    assert (crop.bottom, crop.right, crop.box) == (7, 15, (5, -3, 10, 10))
    assert crop.inside == (0, 7, 5, 12)
    assert crop.inside_crop == (3, 10, 0, 7)
    assert crop.padded and not crop.empty and crop.area == 100 and crop.size == (20, 12)
    inner = Crop(2, 1, 5, 20, 12)
    assert not inner.padded and inner.inside == (2, 7, 1, 6) and inner.inside_crop == (0, 5, 0, 5)
    outside = Crop(30, -40, 4, 20, 12)
    assert outside.empty and outside.padded
    y0, y1, x0, x1 = outside.inside
    assert y0 == y1 or x0 == x1
    assert Crop(np.int64(1), 2, 3, 4, 5).top == 1
    with pytest.raises(ValueError):
        Crop(0, 0, 0, 10, 10)
    with pytest.raises(ValueError):
        Crop(0, 0, 4, 0, 10)
    with pytest.raises(TypeError):
        Crop(0.5, 0, 4, 10, 10)


def test_crop_around_centres_a_square_with_the_margin():
    # a 20 x 10 box centred at (x 40, y 35): side ceil(20 * 1.5) = 30
    crop = crop_around((30, 30, 20, 10), (100, 200), margin=0.25, min_side=8)
    assert (crop.side, crop.left, crop.top, crop.size) == (30, 25, 20, (100, 200))
    assert crop.left + crop.side / 2 == 40 and crop.top + crop.side / 2 == 35
    # the longer side rules, whichever it is
    assert crop_around((30, 30, 10, 20), (100, 200), 0.25, 8).side == 30
    # a tiny structure gets min_side; its centre (51.5, 61): left 35.5, halves up
    tiny = crop_around((50, 60, 3, 2), (100, 200), margin=0.5, min_side=32)
    assert tiny.side == 32 and (tiny.left, tiny.top) == (36, 45)
    # ceil, not round
    assert crop_around((0, 0, 11, 11), (100, 100), 0.1, 1).side == math.ceil(11 * 1.2)
    # an odd difference rounds the top-left corner half up, from the float box too
    odd = crop_around([10.0, 10.0, 5.0, 5.0], (100, 100), 0.0, 8)
    assert (odd.side, odd.left, odd.top) == (8, 9, 9)
    with pytest.raises(ValueError):
        crop_around((0, 0, 5, 5), (10, 10), margin=-0.1, min_side=4)
    with pytest.raises(ValueError):
        crop_around((0, 0, 0, 0), (10, 10), margin=0.5, min_side=0)
    with pytest.raises(ValueError):
        crop_around((0, 0, -1, 5), (10, 10), margin=0.5, min_side=4)


def test_a_window_past_the_photo_is_padded_not_shifted():
    # a structure in the top-left corner keeps its place in the middle of its window
    crop = crop_around((0, 0, 10, 10), (50, 80), margin=0.5, min_side=4)
    assert (crop.side, crop.left, crop.top) == (20, -5, -5)
    far = crop_around((75, 45, 5, 5), (50, 80), margin=1.0, min_side=4)
    assert far.right > 80 and far.bottom > 50 and far.padded
    assert far.left + far.side / 2 == 77.5 and far.top + far.side / 2 == 47.5


# --------------------------------------------------------------------------------------
# same framing, and a structure placed from a reference
# --------------------------------------------------------------------------------------


def test_same_framing_of_the_same_box_is_the_same_window():
    box = (37, 12, 21, 9)
    crop = crop_around(box, (120, 90), margin=0.4, min_side=16)
    assert same_framing(box, crop, box, (120, 90)) == crop
    # on a photo of another size: the same window on that photo
    again = same_framing(box, crop, box, (300, 200))
    assert (again.top, again.left, again.side, again.size) == (
        crop.top,
        crop.left,
        crop.side,
        (300, 200),
    )


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 3.0])
def test_same_framing_keeps_the_relative_scale_and_offset(scale):
    template_box = (100, 80, 40, 20)
    # a window off the box's centre (as a cluster's union window is for one structure)
    template_crop = Crop(60, 90, 80, 400, 400)
    target_box = (300 + 7, 210 - 3, 40 * scale, 20 * scale)
    crop = same_framing(template_box, template_crop, target_box, (1000, 800))
    assert crop.size == (1000, 800)
    assert crop.side == round(80 * scale)
    # the box sits at the same place in both windows, as shares of the side, to the pixel
    for t_edge, t_start, g_edge, g_start in (
        (template_box[0], template_crop.left, target_box[0], crop.left),
        (template_box[1], template_crop.top, target_box[1], crop.top),
    ):
        relative_t = (t_edge - t_start) / template_crop.side
        relative_g = (g_edge - g_start) / crop.side
        assert abs(relative_t - relative_g) <= 1 / crop.side
    # the box's share of the window's side is the same
    assert abs(40 / 80 - target_box[2] / crop.side) < 1e-9


def test_same_framing_of_a_window_past_the_edge_is_not_shifted_either():
    box = (2, 3, 10, 10)
    crop = crop_around(box, (100, 100), margin=1.0, min_side=8)
    assert crop.left < 0 and crop.top < 0
    target = same_framing(box, crop, (500, 600, 20, 20), (700, 700))
    assert target.side == 2 * crop.side
    assert target.left == 500 - 2 * (2 - crop.left) and target.top == 600 - 2 * (3 - crop.top)


def test_same_framing_needs_boxes_with_an_extent():
    crop = Crop(0, 0, 10, 50, 50)
    with pytest.raises(ValueError):
        same_framing((0, 0, 0, 0), crop, (1, 1, 3, 3), (50, 50))
    with pytest.raises(ValueError):
        same_framing((1, 1, 3, 3), crop, (5, 5, 0, 0), (50, 50))


def test_placed_from_reference_maps_the_template_box_onto_the_target():
    # the same reference: the same place
    assert placed_from_reference((10, 20, 5, 8), (0, 0, 100, 50), (0, 0, 100, 50)) == (10, 20, 5, 8)
    # translated and scaled by 2 (the same aspect ratio): a similarity
    box = placed_from_reference((30, 40, 10, 6), (20, 30, 100, 50), (200, 100, 200, 100))
    assert box == pytest.approx((200 + 2 * 10, 100 + 2 * 10, 20, 12))
    # another aspect ratio: the centre keeps its share of the reference box along each
    # axis, the size scales by the geometric mean (sqrt(2 * 0.5) = 1)
    x, y, w, h = placed_from_reference((40, 10, 20, 10), (0, 0, 100, 100), (0, 0, 200, 50))
    assert (w, h) == pytest.approx((20, 10))
    assert ((x + w / 2) / 200, (y + h / 2) / 50) == pytest.approx((0.5, 0.15))
    # a structure outside its reference box (an antenna beyond a larger structure)
    x, y, w, h = placed_from_reference((-20, 0, 10, 10), (0, 0, 50, 50), (100, 100, 100, 100))
    assert (x, y, w, h) == pytest.approx((60, 100, 20, 20))
    with pytest.raises(ValueError):
        placed_from_reference((0, 0, 5, 5), (0, 0, 0, 10), (0, 0, 10, 10))


def test_a_placed_box_frames_the_target_crop_like_the_template_crop():
    """The pieces together: where the first pass found nothing, the placed box frames
    the target's window as the template's box frames the template's."""
    template_box, template_ref = (50, 60, 12, 8), (20, 20, 200, 100)
    target_ref = (100, 300, 400, 200)
    template_crop = crop_around(template_box, (200, 300), margin=0.5, min_side=16)
    placed = placed_from_reference(template_box, template_ref, target_ref)
    target_crop = same_framing(template_box, template_crop, placed, (800, 900))
    assert target_crop.side == 2 * template_crop.side
    assert target_crop.left == 100 + 2 * (template_crop.left - 20)
    assert target_crop.top == 300 + 2 * (template_crop.top - 20)


# --------------------------------------------------------------------------------------
# crops of the photo and its masks
# --------------------------------------------------------------------------------------


def test_crop_image_inside_the_photo_is_its_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    crop = Crop(5, 7, 20, 40, 50)
    out = crop_image(rgb, crop)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb[5:25, 7:27])
    out[:] = 0
    assert rgb[5:25, 7:27].any()  # a copy, not a view


def test_crop_image_pads_with_the_photos_border_colour_or_a_given_one():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    crop = Crop(-4, 30, 16, 30, 40)  # past the top and the right edge
    out = crop_image(rgb, crop)
    np.testing.assert_array_equal(out[4:, :10], rgb[0:12, 30:40])
    border = np.asarray(fill_colour(rgb, "border"), np.uint8)
    assert (out[:4] == border).all() and (out[:, 10:] == border).all()
    grey = crop_image(rgb, crop, fill=128)
    assert (grey[:4] == 128).all() and (grey[:, 10:] == 128).all()
    coloured = crop_image(rgb, crop, fill="1,2,3")
    assert (coloured[:4] == np.array([1, 2, 3], np.uint8)).all()
    np.testing.assert_array_equal(coloured[4:, :10], rgb[0:12, 30:40])
    # a window that misses the photo is all fill
    assert (crop_image(rgb, Crop(100, 100, 5, 30, 40), fill=7) == 7).all()
    with pytest.raises(ValueError, match="framing_fill"):
        crop_image(rgb, crop, fill="nonsense")
    with pytest.raises(ValueError):
        crop_image(rgb[:10], crop)


def test_crop_masks_are_background_outside_the_photo():
    rng = np.random.default_rng(2)
    masks = rng.random((3, 30, 40)) < 0.5
    crop = Crop(20, -6, 15, 30, 40)  # past the bottom and the left edge
    out = crop_masks(masks, crop)
    assert out.shape == (3, 15, 15) and out.dtype == bool
    np.testing.assert_array_equal(out[:, :10, 6:], masks[:, 20:30, 0:9])
    assert not out[:, 10:].any() and not out[:, :, :6].any()
    assert crop_masks(np.zeros((0, 30, 40), bool), crop).shape == (0, 15, 15)
    with pytest.raises(ValueError):
        crop_masks(masks[0], crop)


def test_crop_box_is_the_box_in_the_windows_grid():
    assert crop_box((30, 40, 5, 6), Crop(35, 25, 20, 100, 100)) == (5, 5, 5, 6)
    assert crop_box((0, 0, 5, 6), Crop(-5, -3, 20, 100, 100)) == (3, 5, 5, 6)


# --------------------------------------------------------------------------------------
# back to the photo's grid
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "crop",
    [
        Crop(10, 20, SIZE, 100, 120),  # inside the photo
        Crop(-9, 80, SIZE, 100, 120),  # past the top and the right edge
        Crop(70, -30, SIZE, 100, 120),  # past the bottom and the left edge
    ],
)
def test_round_trip_at_the_models_grid_is_pixel_exact(crop):
    """side == size: logits of +10/-10 at the model's input resolution come back as the
    cropped mask, clipped to the photo."""
    rng = np.random.default_rng(3)
    mask = rng.random(crop.size) < 0.3
    mask[40:60, 40:70] = True
    cropped = crop_masks(mask[None], crop)[0]
    pasted = paste_logits(_logits_of(cropped), crop, SIZE)
    assert pasted.size == crop.size
    np.testing.assert_array_equal(pasted.full(), mask & _window(crop))
    # the box is tight
    assert pasted.bbox() == mask_bbox(mask & _window(crop))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("factor", [1, 2, 3])
def test_edges_on_the_low_res_grid_come_back_pixel_exact(factor, axis):
    """Bands of the low-res grid's cells (4 * factor crop pixels each, the crop being factor
    times the model's input) come back exactly from +10/-10 low-res logits: the bilinear
    value changes sign halfway between two cells' centres, on the cells' edge. (A cell's
    convex corner is rounded off by the bilinear rule, as in the model's own masks, so
    the bands run across the whole crop.) The window passes the photo's top edge by a
    part of a cell."""
    side = SIZE * factor
    cell = side // LOW
    crop = Crop(-cell * 3 - 1, 40, side, 200, 250)
    rng = np.random.default_rng(4 + factor)
    bands = rng.random(LOW) < 0.5
    bands[[3, 4, 9]] = True, False, True
    cells = np.repeat(bands[:, None], LOW, 1) if axis == 0 else np.repeat(bands[None], LOW, 0)
    in_crop = np.kron(cells, np.ones((cell, cell), bool))
    mask = np.zeros(crop.size, bool)
    r0, r1, c0, c1 = crop.inside_crop
    y0, y1, x0, x1 = crop.inside
    mask[y0:y1, x0:x1] = in_crop[r0:r1, c0:c1]
    # the crop shows the bands where they lie in the photo
    cropped = crop_masks(mask[None], crop)[0]
    np.testing.assert_array_equal(cropped[r0:r1, c0:c1], in_crop[r0:r1, c0:c1])
    assert not cropped[:r0].any()
    # the bands run on past the photo's edge (zero logits there would make a corner at
    # the edge, rounded as a lone cell's are), and are clipped on the way back
    pasted = paste_logits(_logits_of(cells), crop, SIZE)
    np.testing.assert_array_equal(pasted.full(), mask)


def test_a_cells_corner_is_rounded_by_the_bilinear_rule():
    """One cell alone at 4 crop pixels a cell: its corner pixels read it with weight
    0.625 ** 2 < 0.5 and fall off; the rest of it comes back."""
    crop = Crop(0, 0, SIZE, 100, 100)
    low = np.zeros((LOW, LOW), bool)
    low[5, 7] = True
    pasted = paste_logits(_logits_of(low), crop, SIZE).full()
    expected = np.zeros((100, 100), bool)
    expected[20:24, 28:32] = True
    expected[[20, 20, 23, 23], [28, 31, 28, 31]] = False
    np.testing.assert_array_equal(pasted, expected)


@pytest.mark.parametrize("side", [100, 37])
@pytest.mark.parametrize("axis", [0, 1])
def test_a_ramp_comes_back_on_the_bilinear_rule(side, axis):
    """side != size: logits rising along one axis (value = cell index - t) cross the
    threshold where the crop pixel's centre, mapped to the low-res grid, passes t:
    (i + 0.5) * LOW / side - 0.5 > t; the window is pasted past the photo's edges."""
    t = 7.3
    ramp = np.arange(LOW, dtype=np.float32) - np.float32(t)
    logits = np.repeat(ramp[:, None], LOW, axis=1) if axis == 0 else np.repeat(ramp[None], LOW, 0)
    src = (np.arange(side) + 0.5) * LOW / side - 0.5
    assert np.abs(src - t).min() > 1e-3  # no pixel within rounding of the threshold
    on = src > t  # along the axis; the other axis is all on
    in_crop = np.repeat(on[:, None], side, 1) if axis == 0 else np.repeat(on[None], side, 0)
    crop = Crop(-5, 200 - side + 9, side, 200, 200)
    expected = np.zeros(crop.size, bool)
    r0, r1, c0, c1 = crop.inside_crop
    y0, y1, x0, x1 = crop.inside
    expected[y0:y1, x0:x1] = in_crop[r0:r1, c0:c1]
    assert expected.any() and not expected.all()
    pasted = paste_logits(torch.from_numpy(logits), crop, SIZE)
    np.testing.assert_array_equal(pasted.full(), expected)
    # numpy logits and the letterbox framing (a square fills the square) agree
    again = paste_logits(logits, crop, SIZE, framing="letterbox")
    np.testing.assert_array_equal(again.full(), expected)


@pytest.mark.parametrize("side", [SIZE, 90, 200, 23])
def test_paste_logits_is_torchs_bilinear_resize_of_the_crop_placed_in_the_photo(side):
    rng = np.random.default_rng(side)
    logits = torch.from_numpy(rng.normal(0, 3, (LOW, LOW)).astype(np.float32))
    logits = F.avg_pool2d(logits[None, None], 3, 1, 1)[0, 0] - 0.5  # smooth blobs
    crop = Crop(150 - side // 2, -side // 3, side, 150, 180)
    resized = F.interpolate(logits[None, None], size=(side, side), mode="bilinear")[0, 0]
    expected = np.zeros(crop.size, bool)
    r0, r1, c0, c1 = crop.inside_crop
    y0, y1, x0, x1 = crop.inside
    expected[y0:y1, x0:x1] = (resized > 0.5).numpy()[r0:r1, c0:c1]
    pasted = paste_logits(logits, crop, SIZE, threshold=0.5)
    np.testing.assert_array_equal(pasted.full(), expected)


@pytest.mark.parametrize(
    "box",
    [
        (40, 30, 32, 32),  # square: the window is the box
        (40, 30, 32, 16),  # wide: the window is as wide as the box
        (0, 50, 16, 16),  # on the left edge
        (168, 138, 32, 12),  # in the bottom-right corner: the window passes the bottom
    ],
)
def test_a_structure_that_fills_the_crop_comes_back_where_it_was(box):
    """With no margin the window is the box's longer side; the structure's mask at the
    low-res grid (the crop's side a multiple of it) comes back at its place in the photo,
    and a window that is all structure comes back as the window, clipped."""
    size = (150, 200)
    x, y, w, h = box
    structure = np.zeros(size, bool)
    structure[y : y + h, x : x + w] = True
    crop = crop_around(box, size, margin=0.0, min_side=1)
    assert crop.side == max(w, h)
    assert crop_box(box, crop)[:2] == ((crop.side - w) // 2, (crop.side - h) // 2)
    cropped = crop_masks(structure[None], crop)[0]
    cell = crop.side // LOW
    blocks = cropped.reshape(LOW, cell, LOW, cell)
    assert (blocks.all(axis=(1, 3)) == blocks.any(axis=(1, 3))).all()  # lines up
    pasted = paste_logits(_logits_of(blocks.any(axis=(1, 3))), crop, SIZE)
    np.testing.assert_array_equal(pasted.full(), structure)
    assert pasted.bbox() == [float(v) for v in box]
    # a structure filling the whole window, from all-positive low-res logits
    full = paste_logits(torch.full((LOW, LOW), 10.0), crop, SIZE)
    np.testing.assert_array_equal(full.full(), _window(crop))
    if w == h:
        np.testing.assert_array_equal(full.full(), structure)


def test_nothing_above_the_threshold_or_a_window_off_the_photo_is_an_empty_mask():
    crop = Crop(10, 10, 40, 100, 100)
    empty = paste_logits(torch.full((LOW, LOW), -5.0), crop, SIZE)
    assert empty.area == 0 and empty.size == (100, 100)
    off = paste_logits(torch.full((LOW, LOW), 5.0), Crop(200, 0, 40, 100, 100), SIZE)
    assert off.area == 0 and off.size == (100, 100)


def test_paste_box_places_and_clips_a_windows_mask():
    mask = np.zeros((10, 10), bool)
    mask[0:3, 8:10] = True
    mask[6, 1] = True
    boxed = BoxMask.from_full(mask)
    pasted = paste_box(boxed, Crop(-1, 15, 10, 20, 20))
    # rows 1..2 of the block land on photo rows 0..1 but its columns 23..24 fall past the
    # right edge, its row 0 past the top; only the lone pixel is left
    expected = np.zeros((20, 20), bool)
    expected[5, 16] = True
    np.testing.assert_array_equal(pasted.full(), expected)
    assert pasted.crop.shape == (1, 1)  # tight
    with pytest.raises(ValueError):
        paste_box(boxed, Crop(0, 0, 12, 20, 20))


# --------------------------------------------------------------------------------------
# clusters of windows
# --------------------------------------------------------------------------------------


def test_clusters_join_windows_that_overlap_more_than_the_share():
    photo = (500, 500)
    crops = [
        Crop(0, 0, 40, *photo),
        Crop(10, 10, 40, *photo),  # shares 30 * 30 = 900 > 0.5 * 1600 with 0
        Crop(300, 300, 40, *photo),
        Crop(310, 305, 20, *photo),  # inside 2: all of the smaller one's area
        Crop(0, 200, 40, *photo),  # alone
    ]
    assert clusters(crops) == [[0, 1], [2, 3], [4]]
    # a share of 0 joins windows that touch by a pixel, and nothing else
    assert clusters(
        [Crop(0, 0, 10, *photo), Crop(9, 9, 10, *photo), Crop(19, 0, 5, *photo)], 0.0
    ) == [
        [0, 1],
        [2],
    ]
    # exactly the share is not more than it
    half = [Crop(0, 0, 10, *photo), Crop(0, 5, 10, *photo)]
    assert clusters(half, 0.5) == [[0], [1]]
    assert clusters(half, 0.49) == [[0, 1]]
    assert clusters(half, 1.0) == [[0], [1]]
    assert clusters([]) == []


def test_clusters_follow_chains_and_keep_the_order():
    photo = (500, 500)
    # 3 overlaps 1, 1 overlaps 0 (the chain 0-1-3), 2 is alone: order by first index
    crops = [
        Crop(0, 0, 20, *photo),
        Crop(0, 8, 20, *photo),
        Crop(200, 200, 20, *photo),
        Crop(0, 16, 20, *photo),
    ]
    assert clusters(crops) == [[0, 1, 3], [2]]
    reordered = [crops[3], crops[2], crops[1], crops[0]]
    assert clusters(reordered) == [[0, 2, 3], [1]]


def test_union_crop_is_the_smallest_square_covering_a_group():
    photo = (300, 400)
    one = Crop(-5, 10, 30, *photo)
    assert union_crop([one]) == one
    crops = [Crop(10, 20, 30, *photo), Crop(15, 45, 35, *photo)]  # rows 10..50, columns 20..80
    union = union_crop(crops)
    assert union.side == 60 and union.left == 20 and union.top == 10 - 10
    for crop in crops:
        assert union.top <= crop.top and union.bottom >= crop.bottom
        assert union.left <= crop.left and union.right >= crop.right
    # an odd difference: the extra pixel goes after the rectangle
    odd = union_crop([Crop(0, 0, 10, *photo), Crop(0, 11, 10, *photo)])
    assert (odd.side, odd.top, odd.left) == (21, -5, 0)
    # one window per cluster
    windows = [*crops, Crop(200, 300, 10, *photo)]
    groups = clusters(windows, overlap=0.0)
    assert [union_crop([windows[i] for i in group]).side for group in groups] == [60, 10]
    with pytest.raises(ValueError):
        union_crop([])
    with pytest.raises(ValueError):
        union_crop([Crop(0, 0, 5, 10, 10), Crop(0, 0, 5, 10, 11)])


def test_the_module_imports_no_torch():
    code = (
        "import sys, sam2pal.inference.zoom\n"
        "print(','.join(sorted(m for m in ('torch', 'sam2') if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
