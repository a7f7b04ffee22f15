"""Orientation candidates, their transforms and mirror pairs (`sam2pal.inference.orientation`)."""

from __future__ import annotations

import numpy as np
import pytest

from sam2pal.inference.orientation import (
    ORIENTATIONS,
    Candidate,
    candidates,
    mirror_map,
    mirror_partner,
    transform_image,
    transform_masks,
)
from sam2pal.training.palindrome import _swap_mirrored


def test_candidates_of_each_mode():
    assert ORIENTATIONS == ("none", "rot4", "rot4_mirror")
    assert candidates("none") == [Candidate(0, False)]
    assert candidates("rot4") == [Candidate(r, False) for r in (0, 90, 180, 270)]
    eight = candidates("rot4_mirror")
    assert eight[0] == Candidate(0, False)
    assert len(eight) == len(set(eight)) == 8
    assert set(eight) == {Candidate(r, m) for r in (0, 90, 180, 270) for m in (False, True)}
    with pytest.raises(ValueError, match="orientation must be one of none, rot4, rot4_mirror"):
        candidates("rot8")


def test_clockwise_rotation_moves_the_top_left_corner_right():
    # a 2 x 3 image: turned 90 degrees clockwise, its first row becomes the last column
    image = np.arange(6).reshape(2, 3)
    turned = transform_image(image, Candidate(90, False))
    assert turned.tolist() == [[3, 0], [4, 1], [5, 2]]
    assert transform_image(image, Candidate(180, False)).tolist() == [[5, 4, 3], [2, 1, 0]]
    assert transform_image(image, Candidate(270, False)).tolist() == [[2, 5], [1, 4], [0, 3]]
    assert transform_image(image, Candidate(0, True)).tolist() == [[2, 1, 0], [5, 4, 3]]
    # mirrored first, then turned: the mirror image's first row becomes the last column
    assert transform_image(image, Candidate(90, True)).tolist() == [[5, 2], [4, 1], [3, 0]]


def test_transforms_are_the_spec_convention_and_contiguous():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    masks = rng.random((3, 5, 7)) > 0.5
    for c in candidates("rot4_mirror"):
        expected = np.fliplr(rgb) if c.mirrored else rgb
        expected = np.rot90(expected, k=-(c.rotation // 90))
        out = transform_image(rgb, c)
        assert np.array_equal(out, expected)
        assert out.flags.c_contiguous and out.dtype == np.uint8
        assert out.shape == ((7, 5, 3) if c.rotation % 180 else (5, 7, 3))
        got = transform_masks(masks, c)
        assert got.flags.c_contiguous and got.dtype == bool
        for b in range(3):
            assert np.array_equal(got[b], transform_image(masks[b], c))
    # always a copy, never a view of the input
    assert not np.shares_memory(transform_image(rgb, Candidate(0, False)), rgb)
    assert not np.shares_memory(transform_masks(masks, Candidate(0, False)), masks)


def test_transforms_reject_bad_input():
    with pytest.raises(ValueError, match="rotation must be one of 0, 90, 180, 270"):
        transform_image(np.zeros((2, 2)), Candidate(45, False))
    with pytest.raises(ValueError, match=r"\(B, H, W\) masks"):
        transform_masks(np.zeros((2, 2), bool), Candidate(0, False))


def test_a_mirrored_clockwise_turn_is_undone_by_the_inverse():
    rng = np.random.default_rng(1)
    masks = rng.random((2, 4, 6)) > 0.5
    for c in candidates("rot4_mirror"):
        out = transform_masks(masks, c)
        back = np.rot90(out, k=c.rotation // 90, axes=(1, 2))
        if c.mirrored:
            back = back[:, :, ::-1]
        assert np.array_equal(back, masks)


@pytest.mark.parametrize(
    "name, partner",
    [
        ("left_antenna", "right_antenna"),
        ("right_antenna", "left_antenna"),
        ("antenna_left", "antenna_right"),
        ("antenna_right", "antenna_left"),
        ("l_antenna", "r_antenna"),
        ("R_antenna", "L_antenna"),
        ("antenna_l", "antenna_r"),
        ("left antenna", "right antenna"),
        ("Left antenna", "Right antenna"),
        ("LEFT_WING", "RIGHT_WING"),
        ("fore leg, left", "fore leg, right"),
        ("left-eye", "right-eye"),
        ("antenna", None),
        ("leftover", None),
        ("cleft", None),
        ("wrong", None),
        ("labrum", None),
        ("l", None),
        ("", None),
    ],
)
def test_mirror_partner_names(name, partner):
    assert mirror_partner(name) == partner
    if partner is not None:
        assert mirror_partner(partner) == name


def test_palindrome_training_swaps_masks_by_the_same_names():
    objects = [(1, 1), (2, 1), (3, 1)]
    categories = {1: "l_antenna", 2: "r_antenna", 3: "head"}
    masks = np.stack([np.full((2, 2), i) for i in range(3)])
    swapped = _swap_mirrored(masks, objects, categories)
    assert [int(m[0, 0]) for m in swapped] == [1, 0, 2]


def _box(shape, top, left, height, width):
    mask = np.zeros(shape, bool)
    mask[top : top + height, left : left + width] = True
    return mask


def test_mirror_map_by_name_and_by_config_pairs():
    categories = {1: "left_antenna", 2: "right_antenna", 3: "head", 4: "fore wing", 5: "hind wing"}
    objects = [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (1, 2)]
    shape = (20, 20)
    template = {key: _box(shape, 2 * i, 2 * i, 2, 2) for i, key in enumerate(objects)}
    got = mirror_map(objects, categories, template)
    # instance 2 of left_antenna has no right_antenna instance 2 to pair with
    assert got == {(1, 1): (2, 1), (2, 1): (1, 1)}
    got = mirror_map(objects, categories, template, pairs=[["fore wing", "hind wing"]])
    assert got == {(1, 1): (2, 1), (2, 1): (1, 1), (4, 1): (5, 1), (5, 1): (4, 1)}
    # only keys that are tracked
    assert mirror_map([(1, 1), (3, 1)], categories, template) == {}


def test_mirror_map_rejects_unknown_pair_names():
    categories = {1: "head", 2: "fore wing"}
    with pytest.raises(ValueError, match="mirror_pairs: 'hind wing' is not a category"):
        mirror_map([(1, 1)], categories, {}, pairs=[["fore wing", "hind wing"]])
    with pytest.raises(ValueError, match="mirror_pairs: each pair must be two category names"):
        mirror_map([(1, 1)], categories, {}, pairs=[["head"]])


def test_mirror_map_pairs_instances_of_one_category_by_side():
    # a head in the middle, two antennae left and right of it, a third antenna on the
    # axis (it is its own mirror image: no partner), legs in two rows of three
    shape = (100, 100)
    categories = {1: "head", 2: "antenna", 3: "leg"}
    template = {
        (1, 1): _box(shape, 40, 40, 20, 20),
        (2, 1): _box(shape, 10, 20, 10, 4),  # left, x ~ 21.5
        (2, 2): _box(shape, 12, 75, 10, 4),  # right, x ~ 76.5
        (2, 3): _box(shape, 85, 48, 4, 4),  # on the axis
        (3, 1): _box(shape, 30, 10, 4, 4),
        (3, 2): _box(shape, 50, 12, 4, 4),
        (3, 3): _box(shape, 70, 10, 4, 4),
        (3, 4): _box(shape, 72, 86, 4, 4),  # mirror image of (3, 3)
        (3, 5): _box(shape, 32, 87, 4, 4),  # of (3, 1)
        (3, 6): _box(shape, 49, 85, 4, 4),  # of (3, 2)
    }
    objects = list(template)
    got = mirror_map(objects, categories, template)
    assert got == {
        (2, 1): (2, 2),
        (2, 2): (2, 1),
        (3, 1): (3, 5),
        (3, 5): (3, 1),
        (3, 2): (3, 6),
        (3, 6): (3, 2),
        (3, 3): (3, 4),
        (3, 4): (3, 3),
    }
    assert all(got[got[k]] == k for k in got)


def test_mirror_map_by_side_skips_structures_the_template_does_not_show():
    shape = (40, 40)
    categories = {1: "antenna"}
    template = {
        (1, 1): _box(shape, 5, 2, 4, 4),
        (1, 2): _box(shape, 5, 34, 4, 4),
        (1, 3): np.zeros(shape, bool),
    }
    got = mirror_map([(1, 1), (1, 2), (1, 3), (1, 4)], categories, template)
    assert got == {(1, 1): (1, 2), (1, 2): (1, 1)}
    # one instance shown: nothing to pair
    assert mirror_map([(1, 1), (1, 3)], categories, template) == {}


def test_silhouette_keeps_the_pose_and_drops_place_and_size():
    """A specimen's silhouette is the same wherever it lies and at any size, and tells
    its turns and its mirror image apart."""
    from sam2pal.inference.orientation import mask_silhouette, silhouette_iou

    def specimen(height, width, y, x, scale):
        mask = np.zeros((height, width), bool)
        mask[y : y + 30 * scale, x : x + 10 * scale] = True  # body
        mask[y : y + 6 * scale, x + 10 * scale : x + 16 * scale] = True  # one antenna
        return mask

    upright = mask_silhouette(specimen(200, 300, 40, 50, 3))
    assert silhouette_iou(upright, upright) == pytest.approx(1.0)
    moved = mask_silhouette(specimen(400, 240, 150, 120, 6))
    assert silhouette_iou(upright, moved) > 0.85
    base = specimen(200, 300, 40, 50, 3)
    for candidate in (Candidate(90, False), Candidate(180, False), Candidate(0, True)):
        other = mask_silhouette(transform_image(base, candidate))
        assert silhouette_iou(upright, other) < 0.7, candidate
    assert silhouette_iou(upright, np.zeros_like(upright)) == 0.0
