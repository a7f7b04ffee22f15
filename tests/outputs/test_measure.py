"""Tests of the morphometric measures (sam2pal.outputs.measure) and of the measurement tables.

Synthetic shapes are drawn with cv2.fillPoly on an 8x finer grid and a pixel is set
when at least half of it is covered: the pixel set is then an honest rasterisation of
a shape whose true size is known (plain fillPoly also sets pixels whose centre lies on
the outline, which makes every shape about one pixel too large).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import integrate
from scipy import ndimage as ndi
from skimage.draw import disk, line
from skimage.morphology import skeletonize

from sam2pal.errors import InputError
from sam2pal.io.masks import decode_segmentation, encode_rle
from sam2pal.outputs.measure import (
    MASK_MEASURES,
    MEASURE_COLUMNS,
    MM_COLUMNS,
    measure_coco,
    measure_mask,
    read_calibration,
)

# the NEON beetle part masks, vendored in the package for the synthetic generator
REAL_MASKS = Path(__file__).resolve().parents[2] / "src" / "sam2pal" / "data" / "neon_beetles_masks"
HEAD, PRONOTUM, ELYTRA, ANTENNA, LEGS = 1, 2, 3, 4, 5


# --------------------------------------------------------------------------------------
# synthetic shapes
# --------------------------------------------------------------------------------------


def rasterise(poly_xy: np.ndarray, pad: float = 8.0, k: int = 8) -> np.ndarray:
    """Bool mask of a polygon given in pixel-edge coordinates (x right, y down; pixel
    (r, c) is the square [c, c+1] x [r, r+1]): pixels at least half covered."""
    poly = poly_xy - poly_xy.min(axis=0) + pad
    width, height = np.ceil(poly.max(axis=0) + pad).astype(int)
    fine = np.zeros((height * k, width * k), np.uint8)
    # fine-grid pixel centres sit at integer cv2 coordinates; 4 bits of sub-pixel shift
    pts = np.round((poly * k - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(fine, [pts], 1, lineType=cv2.LINE_8, shift=4)
    coverage = fine.reshape(height, k, width, k).mean(axis=(1, 3))
    return coverage >= 0.5


def rectangle(w: float, h: float, angle_deg: float, offset=(0.3, 0.7)) -> np.ndarray:
    a = math.radians(angle_deg)
    u = np.array([math.cos(a), math.sin(a)])
    v = np.array([-math.sin(a), math.cos(a)])
    corners = np.array(
        [
            -u * w / 2 - v * h / 2,
            u * w / 2 - v * h / 2,
            u * w / 2 + v * h / 2,
            -u * w / 2 + v * h / 2,
        ]
    )
    return rasterise(corners + np.asarray(offset))


def stroke(centre_xy: np.ndarray, thickness: float) -> np.ndarray:
    """A band of constant thickness around a densely sampled centre line, with flat
    (butt) ends: the polygon of the two offset curves."""
    tangent = np.gradient(centre_xy, axis=0)
    tangent /= np.hypot(tangent[:, 0], tangent[:, 1])[:, None]
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    left = centre_xy + normal * thickness / 2
    right = centre_xy - normal * thickness / 2
    return rasterise(np.concatenate([left, right[::-1]]))


def arc_stroke(radius: float, angle_deg: float, thickness: float):
    a = 0.3 + np.linspace(0.0, math.radians(angle_deg), 3000)
    centre = np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)
    return stroke(centre, thickness), radius * math.radians(angle_deg)


def sine_stroke(
    amplitude: float, wavelength: float, extent: float, thickness: float, rotation_deg: float = 23.0
):
    x = np.linspace(0.0, extent, 6000)
    y = amplitude * np.sin(2 * np.pi * x / wavelength)
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    centre = np.stack([c * x - s * y, s * x + c * y], axis=1)

    def slope(t):
        return amplitude * 2 * np.pi / wavelength * np.cos(2 * np.pi * t / wavelength)

    true_length, _ = integrate.quad(lambda t: math.sqrt(1 + slope(t) ** 2), 0.0, extent, limit=200)
    return stroke(centre, thickness), true_length


def straight_stroke(length: float, angle_deg: float, thickness: float):
    a = math.radians(angle_deg)
    s = np.linspace(0.0, length, 500)
    centre = np.stack([0.37 + s * math.cos(a), 0.21 + s * math.sin(a)], axis=1)
    return stroke(centre, thickness), length


def worst(errors):
    """The case with the largest relative error, for failure messages."""
    return max(errors, key=lambda e: abs(e[0]))


# --------------------------------------------------------------------------------------
# measure_mask
# --------------------------------------------------------------------------------------


def test_keys_are_floats_and_area_is_the_pixel_count():
    rng = np.random.default_rng(3)
    for _ in range(5):
        mask = ndi.binary_opening(rng.random((80, 90)) > 0.4, iterations=2)
        result = measure_mask(mask)
        assert list(result) == MASK_MEASURES
        assert all(isinstance(v, float) for v in result.values())
        assert result["area_px"] == float(np.count_nonzero(mask))


def test_empty_mask_gives_zero_area_and_nan():
    result = measure_mask(np.zeros((30, 40), bool))
    assert list(result) == MASK_MEASURES
    assert result["area_px"] == 0.0
    for key in MASK_MEASURES[1:]:
        assert math.isnan(result[key]), key


@pytest.mark.parametrize("w,h", [(1, 1), (1, 7), (5, 3), (20, 13), (64, 40), (3, 90)])
def test_feret_of_pixel_rectangles_is_exact(w, h):
    mask = np.zeros((h + 10, w + 10), bool)
    mask[4 : 4 + h, 6 : 6 + w] = True
    result = measure_mask(mask)
    assert result["feret_max_px"] == pytest.approx(math.hypot(w, h), abs=1e-9)
    assert result["feret_min_px"] == pytest.approx(min(w, h), abs=1e-9)
    assert result["area_px"] == w * h
    assert result["solidity"] == pytest.approx(1.0)


def test_feret_of_rotated_rectangles_within_one_percent():
    # 1 % holds once the short side is ~150 px or more: the pixel squares of a
    # rasterised slanted edge stick out of it by up to half a pixel diagonal (see below)
    errors = []
    for w, h in [(160, 160), (240, 160), (330, 200)]:
        for angle in np.arange(0.0, 90.1, 7.5):
            result = measure_mask(rectangle(w, h, angle))
            true_max, true_min = math.hypot(w, h), min(w, h)
            errors.append(
                (
                    (result["feret_max_px"] - true_max) / true_max,
                    "max",
                    w,
                    h,
                    angle,
                    result["feret_max_px"],
                    true_max,
                )
            )
            errors.append(
                (
                    (result["feret_min_px"] - true_min) / true_min,
                    "min",
                    w,
                    h,
                    angle,
                    result["feret_min_px"],
                    true_min,
                )
            )
    e = worst(errors)
    assert abs(e[0]) <= 0.01, (
        f"Feret {e[1]} of {e[2]}x{e[3]} at {e[4]} deg: "
        f"measured {e[5]:.3f}, true {e[6]:.3f} ({e[0]:+.2%})"
    )


def test_feret_of_small_rotated_rectangles_within_rasterisation_bound():
    # On each side, the pixel squares of a slanted edge can stick out by half their
    # width in that direction, 0.5 * (|cos| + |sin|) <= 0.71 px: at most ~1.41 px in all
    # (plus a little for the 8x supersampled rasterisation).
    errors = []
    for w, h in [(30, 20), (45, 45), (60, 25), (100, 40)]:
        for angle in np.arange(0.0, 90.1, 7.5):
            result = measure_mask(rectangle(w, h, angle))
            for kind, measured, true in (
                ("max", result["feret_max_px"], math.hypot(w, h)),
                ("min", result["feret_min_px"], min(w, h)),
            ):
                errors.append((measured - true, kind, w, h, angle, measured, true))
    e = worst(errors)
    assert abs(e[0]) <= math.sqrt(2) + 0.2, (
        f"Feret {e[1]} of {e[2]}x{e[3]} at {e[4]} deg: measured {e[5]:.3f}, true {e[6]:.3f}"
    )


def test_disc_is_round_and_convex():
    mask = np.zeros((121, 121), bool)
    mask[disk((60, 60), 45)] = True
    result = measure_mask(mask)
    assert result["eccentricity"] < 0.05
    assert result["solidity"] > 0.98
    assert result["feret_max_px"] == pytest.approx(90, abs=2)
    assert result["feret_min_px"] == pytest.approx(90, abs=2)
    assert result["major_axis_px"] == pytest.approx(90, rel=0.02)
    assert result["minor_axis_px"] == pytest.approx(90, rel=0.02)
    # the 4-neighbourhood estimator reads round outlines a few per cent long
    assert result["perimeter_px"] == pytest.approx(2 * math.pi * 45, rel=0.05)


def test_l_shape_is_not_convex():
    mask = np.zeros((70, 70), bool)
    mask[5:65, 5:20] = True  # the upright
    mask[50:65, 5:65] = True  # the foot
    result = measure_mask(mask)
    area = 60 * 15 + 15 * 45
    assert result["area_px"] == area
    # convex hull of the pixel centres: the 59 x 59 square minus the triangle cut off by
    # the segment from the upright's top right (19, 5) to the foot's top right (64, 50)
    hull_area = 60 * 60 - 45 * 45 / 2
    assert result["solidity"] == pytest.approx(area / hull_area, rel=0.03)
    assert result["solidity"] < 0.8


def test_several_pieces_count_as_one_structure_except_for_the_curve_length():
    big = np.zeros((60, 200), bool)
    big[10:18, 10:110] = True  # a 100 x 8 bar
    small = np.zeros_like(big)
    small[40:50, 150:180] = True  # a 30 x 10 bar, far away
    both = big | small
    result = measure_mask(both)
    assert result["area_px"] == 800 + 300
    # widest extent: from the big bar's top left corner to the small bar's bottom right
    assert result["feret_max_px"] == pytest.approx(math.hypot(180 - 10, 50 - 10), abs=1e-9)
    assert result["solidity"] < 0.5
    assert result["perimeter_px"] == pytest.approx(
        measure_mask(big)["perimeter_px"] + measure_mask(small)["perimeter_px"]
    )
    # the curve length is that of the largest piece alone
    assert result["curve_length_px"] == measure_mask(big)["curve_length_px"]
    assert result["curve_length_px"] == pytest.approx(100, abs=1)


def test_measures_do_not_depend_on_the_position_in_the_image():
    shape, _ = arc_stroke(40, 150, 7)
    here = measure_mask(shape)
    canvas = np.zeros((shape.shape[0] + 300, shape.shape[1] + 200), bool)
    canvas[250 : 250 + shape.shape[0], 120 : 120 + shape.shape[1]] = shape
    there = measure_mask(canvas)
    for key in MASK_MEASURES:
        assert there[key] == pytest.approx(here[key], rel=1e-12), key


def _check_curve_lengths(cases, tolerance=0.03):
    errors = []
    for label, (mask, true) in cases:
        measured = measure_mask(mask)["curve_length_px"]
        errors.append(((measured - true) / true, label, measured, true))
    e = worst(errors)
    assert abs(e[0]) <= tolerance, (
        f"curve length of {e[1]}: measured {e[2]:.2f}, true {e[3]:.2f} ({e[0]:+.2%})"
    )
    return errors


def test_curve_length_of_circular_arcs():
    cases = []
    for radius in (30, 60, 120):
        for angle in (90, 180, 270):
            for thickness in (3, 7, 11, 15):
                if thickness > radius / 3:
                    continue
                cases.append(
                    (
                        f"arc r={radius} {angle} deg thickness {thickness}",
                        arc_stroke(radius, angle, thickness),
                    )
                )
    _check_curve_lengths(cases)


def test_curve_length_of_sine_strokes():
    cases = []
    for amplitude, wavelength in ((10, 120), (20, 160), (20, 100)):
        for thickness in (3, 7, 11, 15):
            cases.append(
                (
                    f"sine a={amplitude} wavelength {wavelength} thickness {thickness}",
                    sine_stroke(amplitude, wavelength, 300, thickness),
                )
            )
    _check_curve_lengths(cases)


def test_curve_length_of_straight_strokes_at_many_angles():
    cases = []
    for angle in np.arange(0.0, 90.1, 7.5):
        for length, thickness in ((60, 3), (60, 7), (60, 15), (150, 3), (150, 15)):
            cases.append(
                (
                    f"line {length} px at {angle} deg thickness {thickness}",
                    straight_stroke(length, angle, thickness),
                )
            )
    _check_curve_lengths(cases)


def test_curve_length_of_compact_shapes_is_their_long_axis():
    rect = np.zeros((80, 140), bool)
    rect[15:65, 20:120] = True  # 100 x 50
    assert measure_mask(rect)["curve_length_px"] == pytest.approx(100, rel=0.03)
    round_ = np.zeros((121, 121), bool)
    round_[disk((60, 60), 40)] = True
    assert measure_mask(round_)["curve_length_px"] == pytest.approx(80, rel=0.03)


def _box(h, w):
    mask = np.zeros((h + 6, w + 6), bool)
    mask[3 : 3 + h, 2 : 2 + w] = True
    return mask


def _within_feret(mask):
    result = measure_mask(mask)
    assert result["curve_length_px"] <= result["feret_max_px"], (
        f"curve length {result['curve_length_px']} > max Feret {result['feret_max_px']}"
    )
    return result["curve_length_px"]


@pytest.mark.parametrize(
    "h,w",
    [
        (4, 10),
        (10, 4),
        (3, 10),
        (4, 12),
        (6, 12),
        (8, 15),
        (15, 10),
        (2, 5),
        (2, 2),
        (5, 5),
        (1, 1),
        (1, 2),
        (2, 1),
        (1, 3),
    ],
)
def test_curve_length_of_small_rectangles_is_their_long_side(h, w):
    # the skeleton of a short bar forks into its corners; it measures its long side
    assert _within_feret(_box(h, w)) == pytest.approx(max(h, w), abs=0.02)


def test_curve_length_of_a_square_is_within_its_extent():
    for side in (3, 8, 15, 40):
        assert side <= _within_feret(_box(side, side)) <= side * math.sqrt(2)


def test_curve_length_of_discs_and_ellipses():
    for radius in (2, 3, 5, 10, 25):
        mask = np.zeros((2 * radius + 7, 2 * radius + 7), bool)
        mask[disk((radius + 3, radius + 3), radius)] = True
        # disk() keeps the pixels closer than the radius: 2 r - 1 pixels across
        assert _within_feret(mask) == pytest.approx(2 * radius - 1, abs=0.5), radius
    t = np.linspace(0.0, 2 * np.pi, 720, endpoint=False)
    for major, minor in ((60, 24), (40, 30), (100, 50), (80, 12)):
        for angle in (0, 20, 45, 70, 90, 135):
            a = math.radians(angle)
            x, y = major / 2 * np.cos(t), minor / 2 * np.sin(t)
            outline = (
                np.stack(
                    [math.cos(a) * x - math.sin(a) * y, math.sin(a) * x + math.cos(a) * y], axis=1
                )
                + 0.3
            )
            assert _within_feret(rasterise(outline)) == pytest.approx(major, rel=0.03), (
                major,
                minor,
                angle,
            )


def test_curve_length_of_one_and_two_pixels():
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    assert _within_feret(one) == pytest.approx(1.0)
    diagonal = np.zeros((5, 5), bool)
    diagonal[1, 1] = diagonal[2, 2] = True
    # corner to corner of the two touching squares: the max Feret diameter itself
    assert _within_feret(diagonal) == pytest.approx(2 * math.sqrt(2))


def test_curve_length_of_one_pixel_lines():
    for n in (4, 10, 37):
        row = np.zeros((5, n + 4), bool)
        row[2, 2 : 2 + n] = True
        assert _within_feret(row) == pytest.approx(n)
        assert _within_feret(row.T) == pytest.approx(n)
        diagonal = np.zeros((n + 4, n + 4), bool)
        diagonal[np.arange(n) + 2, np.arange(n) + 2] = True
        assert _within_feret(diagonal) == pytest.approx(n * math.sqrt(2))
        assert _within_feret(diagonal[::-1]) == pytest.approx(n * math.sqrt(2))
    # slanted lines (8-connected staircases) of 40 px between the end pixel centres:
    # they measure from the outline of one end pixel to that of the other
    for angle in range(0, 91, 5):
        a = math.radians(angle)
        r1, c1 = round(40 * math.sin(a)), round(40 * math.cos(a))
        mask = np.zeros((50, 50), bool)
        rr, cc = line(3, 3, 3 + r1, 3 + c1)
        mask[rr, cc] = True
        centres = math.hypot(r1, c1)
        assert centres <= _within_feret(mask) <= centres * 1.04, angle


# --------------------------------------------------------------------------------------
# real masks
# --------------------------------------------------------------------------------------

REAL_FILES = [
    "dubius/beetle_237_994.png",
    "dubius/beetle_207_38.png",
    "restrictus/beetle_114_144.png",
    "restrictus/beetle_99_633.png",
]


def _real_label_maps():
    if not REAL_MASKS.is_dir():
        pytest.skip(f"real masks not available at {REAL_MASKS}")
    from PIL import Image

    maps = []
    for name in REAL_FILES:
        path = REAL_MASKS / name
        if not path.is_file():
            pytest.skip(f"real mask {path} not available")
        maps.append((name, np.array(Image.open(path))))
    return maps


def test_real_masks_consistent_measures():
    for name, labels in _real_label_maps():
        for part in (HEAD, PRONOTUM, ELYTRA, ANTENNA, LEGS):
            mask = labels == part
            if not mask.any():
                continue
            result = measure_mask(mask)
            assert result["area_px"] == np.count_nonzero(mask), name
            assert 0 < result["feret_min_px"] <= result["feret_max_px"], name
            assert result["minor_axis_px"] <= result["major_axis_px"], name
            assert 0 < result["solidity"] <= 1, name
            assert 0 <= result["eccentricity"] < 1, name
            assert result["curve_length_px"] > 0, name
        # a compact part: its midline is about as long as its widest extent
        elytra = measure_mask(labels == ELYTRA)
        assert (
            0.7 * elytra["feret_max_px"]
            <= elytra["curve_length_px"]
            <= 1.3 * elytra["feret_max_px"]
        ), name


def test_real_parts_curve_length_within_feret_unless_a_bent_band():
    """Every vendored NEON part: the curve length is at most the max Feret diameter,
    except where the largest piece is a band (at least about four times as long as it
    is wide at its widest) whose centre line bends: a hooked antenna (e.g.
    torvus/beetle_118_1273), legs with their knees, two antennae touching at their
    bases. Such a centre line is longer than the part's widest extent by geometry, but
    not longer than half the piece's outline (the band's two sides, one on each side of
    the centre line, plus its ends)."""
    if not REAL_MASKS.is_dir():
        pytest.skip(f"real masks not available at {REAL_MASKS}")
    from PIL import Image

    files = sorted(REAL_MASKS.rglob("*.png"))
    parts = 0
    for path in files:
        labels = np.array(Image.open(path))
        for part in (HEAD, PRONOTUM, ELYTRA, ANTENNA, LEGS):
            mask = labels == part
            if not mask.any():
                continue
            parts += 1
            result = measure_mask(mask)
            if result["curve_length_px"] <= result["feret_max_px"]:
                continue
            where = (
                f"{path.relative_to(REAL_MASKS)} part {part}: curve length "
                f"{result['curve_length_px']:.1f} > max Feret {result['feret_max_px']:.1f}"
            )
            pieces, _ = ndi.label(mask, structure=np.ones((3, 3), bool))
            piece = pieces == np.argmax(np.bincount(pieces.ravel())[1:]) + 1
            widest = 2 * ndi.distance_transform_edt(np.pad(piece, 1)).max() - 1
            assert np.count_nonzero(piece) >= 4 * widest**2, f"{where}, on a compact piece"
            assert result["curve_length_px"] <= measure_mask(piece)["perimeter_px"] / 2, where
    assert parts >= len(files) > 100


def test_real_antenna_curve_length_between_feret_and_skeleton():
    checked = 0
    for name, labels in _real_label_maps():
        pieces, n = ndi.label(labels == ANTENNA, structure=np.ones((3, 3), bool))
        for i in range(1, n + 1):
            piece = pieces == i
            result = measure_mask(piece)
            # a single, elongated antenna piece
            if result["area_px"] < 150 or result["feret_max_px"] < 4 * result["feret_min_px"]:
                continue
            skeleton_px = int(skeletonize(piece).sum())
            # Bounds that hold for any band of width w around a midline of length L:
            # its widest extent is at most L + w, and w is at most the min Feret (so
            # L >= max Feret - min Feret; for a straight bar, max Feret = sqrt(L^2 + w^2)
            # exceeds L itself); the midline is no longer than the skeleton path,
            # whose steps are 1 or sqrt(2) px.
            low = result["feret_max_px"] - result["feret_min_px"]
            assert low <= result["curve_length_px"] <= skeleton_px * math.sqrt(2), (
                f"{name} antenna piece {i}: curve length {result['curve_length_px']:.1f}, "
                f"Feret {result['feret_max_px']:.1f} / {result['feret_min_px']:.1f}, "
                f"skeleton {skeleton_px} px"
            )
            # and for these thin pieces the midline is close to the widest extent
            assert result["curve_length_px"] == pytest.approx(result["feret_max_px"], rel=0.15)
            checked += 1
    assert checked >= 3


# --------------------------------------------------------------------------------------
# the reference implementation's values, and the fast implementation's parts
# --------------------------------------------------------------------------------------

# measure_mask must give the values of the plain scikit-image implementation
# (tests/measure_golden.py: its shapes and how the values were made) within 0.5 %;
# values near 0 get an absolute slack (the eccentricity of a disc is the square root of
# a difference of rounded moments, ~1e-8 instead of 0)
GOLDEN_REL = 0.005
GOLDEN_ABS = 1e-6


@pytest.mark.parametrize("group", ["test/", "pieces/", "real/", "real_x4/", "real_x8/", "photo/"])
def test_measures_agree_with_the_reference_implementation(group):
    import measure_golden

    golden = measure_golden.load()
    shapes = [(name, build) for name, build in measure_golden.shapes() if name.startswith(group)]
    assert len(shapes) >= 5 and all(name in golden for name, _ in shapes)
    errors = []
    for name, build in shapes:
        result = measure_mask(build())
        for key in MASK_MEASURES:
            value, expected = result[key], golden[name][key]
            if math.isnan(expected) or math.isnan(value):
                if not (math.isnan(expected) and math.isnan(value)):
                    errors.append((math.inf, name, key, value, expected))
                continue
            error = abs(value - expected)
            if error > GOLDEN_ABS:
                errors.append((error / abs(expected), name, key, value, expected))
    bad = sorted((e for e in errors if e[0] > GOLDEN_REL), reverse=True)
    assert not bad, f"{len(bad)} values off, worst: " + "; ".join(
        f"{name} {key}: {value!r} instead of {expected!r} ({rel:+.3%})"
        for rel, name, key, value, expected in bad[:5]
    )


def _random_masks(seed, n, size=(60, 70)):
    """Varied small masks: noise opened to blobs (with holes and specks), lines."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        mask = rng.random(size) > rng.uniform(0.15, 0.7)
        if i % 3:
            mask = ndi.binary_opening(mask, iterations=int(rng.integers(1, 3)))
        if i % 5 == 0:
            rr, cc = line(*rng.integers(1, min(size) - 1, 4))
            mask[rr, cc] = True
        if mask.any():
            yield mask


def _padded(mask):
    from sam2pal.outputs.measure import _crop

    return _crop(mask)[0]


def test_border_pixels_are_the_outline_points():
    from sam2pal.outputs.measure import _Outline

    for mask in _random_masks(1, 200):
        crop = _padded(mask)
        cross = ndi.generate_binary_structure(2, 1)
        expected = np.flatnonzero(crop.astype(bool) & ~ndi.binary_erosion(crop, cross))
        assert np.array_equal(_Outline.of(crop).border(), expected)


def test_perimeter_is_scikit_images():
    from skimage.measure import perimeter

    for mask in _random_masks(2, 200):
        assert measure_mask(mask)["perimeter_px"] == perimeter(mask, neighborhood=4)


def test_hull_pixel_count_is_regionprops_area_convex():
    from skimage.measure import regionprops

    from sam2pal.outputs.measure import _hull_pixel_count, _Outline

    for mask in _random_masks(3, 200):
        crop = _padded(mask)
        expected = regionprops(crop)[0].area_convex
        assert _hull_pixel_count(_Outline.of(crop).hull()) == expected


def test_thinning_is_scikit_images_skeletonize():
    from sam2pal.outputs.measure import _Outline, _thin

    shapes = list(_random_masks(4, 200))
    shapes += [arc_stroke(60, 200, 11)[0], sine_stroke(20, 100, 300, 15)[0], rectangle(120, 40, 30)]
    for mask in shapes:
        crop = _padded(mask)
        assert np.array_equal(
            _thin(crop, _Outline.of(crop).border()), skeletonize(crop.astype(bool))
        )


def test_widest_bounds_hold_the_largest_distance():
    from sam2pal.outputs.measure import _crop, _widest_bounds

    rng = np.random.default_rng(5)
    for i in range(60):
        mask = ndi.binary_opening(rng.random((150, 170)) > rng.uniform(0.1, 0.5), iterations=3)
        mask[disk((75, 85), rng.uniform(5, 40))] = True
        widest = ndi.distance_transform_edt(np.pad(mask, 1)).max()
        for block in (2, 3, 4, 7, 16):
            crop = np.zeros((-(-152 // block) * block, -(-172 // block) * block), np.uint8)
            crop[:152, :172] = _crop(mask)[0][:152, :172]
            low, high = _widest_bounds(crop, block)
            assert low <= widest <= high, (i, block, low, widest, high)


def test_median_half_width_is_exact():
    from sam2pal.outputs.measure import _longest_path, _median_half_width, _Outline, _skeleton_graph

    shapes = [arc_stroke(r, a, t)[0] for r, a, t in ((60, 200, 11), (120, 90, 15), (30, 270, 3))]
    shapes += [sine_stroke(20, 100, 300, t)[0] for t in (3, 7, 15)] + [rectangle(200, 30, 17)]
    for mask in shapes:
        crop = _padded(mask)
        coords, graph = _skeleton_graph(skeletonize(crop.astype(bool)))
        path = coords[_longest_path(graph)]
        for cut in (len(path), len(path) - 1, 7, 2, 1):
            dt = ndi.distance_transform_edt(crop)
            expected = float(np.median(dt[path[:cut, 0], path[:cut, 1]] - 0.5))
            assert _median_half_width(crop, _Outline.of(crop).border(), path[:cut]) == expected


def test_any_dtype_gives_the_same_measures():
    mask = arc_stroke(40, 150, 7)[0]
    expected = measure_mask(mask)
    for other in (
        mask.astype(np.uint8) * 255,
        mask.astype(np.int32),
        mask.astype(np.float32) * 0.5,
        np.asfortranarray(mask),
        mask[:, ::-1][:, ::-1],
    ):
        assert measure_mask(other) == expected


def test_measuring_workers_use_one_opencv_thread(tmp_path):
    """measure_coco's workers (forked where the platform can) run OpenCV sequentially,
    also when the parent has used OpenCV's thread pool before: no oversubscription, no
    hang."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "workers.py"
    script.write_text(
        "import multiprocessing\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "import cv2, numpy as np\n"
        "from sam2pal.outputs.measure import _worker_init, measure_mask\n"
        "def threads(_):\n"
        "    return cv2.getNumThreads()\n"
        "if __name__ == '__main__':\n"
        "    mask = np.zeros((2000, 2000), bool)\n"
        "    mask[100:1900, 300:400] = True\n"
        "    measure_mask(mask)  # the parent uses OpenCV (and its threads) first\n"
        "    method = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'\n"
        "    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method),\n"
        "                             initializer=_worker_init) as pool:\n"
        "        used = list(pool.map(threads, range(4)))\n"
        "        length = pool.submit(measure_mask, mask).result()['curve_length_px']\n"
        "    print(used, length)\n"
    )
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the measuring workers hang")
    assert process.returncode == 0
    used, length = out.rsplit(" ", 1)
    assert used == "[1, 1, 1, 1]"
    assert float(length) == pytest.approx(1800, abs=1)


# --------------------------------------------------------------------------------------
# measure_coco
# --------------------------------------------------------------------------------------

H, W = 90, 120


def _bar(r0, r1, c0, c1):
    mask = np.zeros((H, W), bool)
    mask[r0:r1, c0:c1] = True
    return mask


def _uncompressed_rle(mask):
    """COCO uncompressed RLE (column-major run lengths, starting with background)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [H, W], "counts": counts}


@pytest.fixture
def coco_case(tmp_path):
    """A small predictions file: three images (listed out of order), three categories
    (one named with a space, one never predicted), two leg instances on one image."""
    masks = {
        # image 7 "b.jpg": a head, two legs (instance ranks opposite to the ids)
        101: _bar(10, 30, 10, 40),
        102: _bar(50, 56, 10, 100),
        103: _bar(70, 74, 20, 60),
        # image 3 "a.jpg": a head (polygon) and a leg (uncompressed RLE), no instance field
        201: _bar(20, 40, 30, 70),
        202: _bar(60, 65, 5, 115),
    }
    anns = [
        {
            "id": 103,
            "image_id": 7,
            "category_id": 3,
            "segmentation": encode_rle(masks[103]),
            "instance": 1,
            "score": 0.8,
        },
        {
            "id": 101,
            "image_id": 7,
            "category_id": 1,
            "segmentation": encode_rle(masks[101]),
            "instance": 1,
            "score": 0.9,
        },
        {
            "id": 102,
            "image_id": 7,
            "category_id": 3,
            "segmentation": encode_rle(masks[102]),
            "instance": 2,
            "score": 0.7,
        },
        {
            "id": 201,
            "image_id": 3,
            "category_id": 1,
            "segmentation": [[30, 20, 70, 20, 70, 40, 30, 40]],
        },
        {"id": 202, "image_id": 3, "category_id": 3, "segmentation": _uncompressed_rle(masks[202])},
    ]
    for ann in anns:
        ann["bbox"] = [0, 0, 1, 1]
        ann["area"] = 1
    coco = {
        "images": [
            {"id": 7, "file_name": "b.jpg", "width": W, "height": H},
            {"id": 3, "file_name": "a.jpg", "width": W, "height": H},
            {"id": 9, "file_name": "sub/c.jpg", "width": W, "height": H},
        ],
        "annotations": anns,
        "categories": [
            {"id": 3, "name": "legs"},
            {"id": 1, "name": "head"},
            {"id": 2, "name": "left antenna"},
        ],
    }
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(coco))
    return path, coco, masks


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_long_table_columns_order_and_values(coco_case, tmp_path):
    coco_path, coco, masks = coco_case
    out = tmp_path / "out" / "measurements.csv"
    summary = measure_coco(coco_path, out)
    assert summary == {
        "n_images": 3,
        "n_annotations": 5,
        "calibrated": False,
        "images_without_scale": 0,
    }
    rows = _rows(out)
    assert rows[0] == MEASURE_COLUMNS
    # sorted by file name, then category id (head=1 before legs=3), then instance
    assert [(r[0], r[1], r[2], r[3]) for r in rows[1:]] == [
        ("a.jpg", "3", "201", "head"),
        ("a.jpg", "3", "202", "legs"),
        ("b.jpg", "7", "101", "head"),
        ("b.jpg", "7", "103", "legs"),
        ("b.jpg", "7", "102", "legs"),
    ]
    # the polygon outlines the pixel squares of the 40 x 20 head bar of a.jpg
    polygon = coco["annotations"][3]["segmentation"]
    assert np.array_equal(decode_segmentation(polygon, H, W), masks[201])
    table = pd.read_csv(out)
    assert len(table) == 5
    for _, row in table.iterrows():
        ann_id = int(row["annotation_id"])
        expected = measure_mask(masks[ann_id])
        for key in MASK_MEASURES:
            assert row[key] == pytest.approx(expected[key], rel=1e-9), (ann_id, key)


def test_global_scale_adds_mm_columns(coco_case, tmp_path):
    coco_path, _, masks = coco_case
    out = tmp_path / "m.csv"
    summary = measure_coco(coco_path, out, px_per_mm=12.5)
    assert summary["calibrated"] is True
    table = pd.read_csv(out)
    assert list(table.columns) == MEASURE_COLUMNS + MM_COLUMNS
    assert table["area_mm2"].to_numpy() == pytest.approx(table["area_px"] / 12.5**2)
    for mm, px in (
        ("perimeter_mm", "perimeter_px"),
        ("feret_max_mm", "feret_max_px"),
        ("feret_min_mm", "feret_min_px"),
        ("curve_length_mm", "curve_length_px"),
    ):
        assert table[mm].to_numpy() == pytest.approx(table[px] / 12.5), mm
    # the 90 x 6 px leg bar at 12.5 px/mm: 90 px long, 7.2 mm
    leg = table[table["annotation_id"] == 102].iloc[0]
    assert leg["feret_min_mm"] == pytest.approx(6 / 12.5)


def test_per_image_calibration_with_and_without_fallback(coco_case, tmp_path):
    coco_path, _, _ = coco_case
    calib = tmp_path / "scales.csv"
    # a.jpg by its name, c.jpg by its bare name (the COCO file says sub/c.jpg);
    # b.jpg is missing; an extra column is ignored
    calib.write_text("file_name,px_per_mm,note\na.jpg,20,ruler\nc.jpg,10,\n", encoding="utf-8")
    assert read_calibration(calib) == {"a.jpg": 20.0, "c.jpg": 10.0}

    out = tmp_path / "m.csv"
    summary = measure_coco(coco_path, out, calibration_csv=calib)
    assert summary["calibrated"] is True and summary["images_without_scale"] == 1
    table = pd.read_csv(out)
    assert list(table.columns) == MEASURE_COLUMNS + MM_COLUMNS
    a = table[table["file_name"] == "a.jpg"]
    assert a["feret_max_mm"].to_numpy() == pytest.approx(a["feret_max_px"] / 20)
    assert a["area_mm2"].to_numpy() == pytest.approx(a["area_px"] / 400)
    b = table[table["file_name"] == "b.jpg"]
    assert b[MM_COLUMNS].isna().all().all()  # no scale: empty millimetre cells

    summary = measure_coco(coco_path, out, px_per_mm=5.0, calibration_csv=calib)
    assert summary["images_without_scale"] == 0
    table = pd.read_csv(out)
    a = table[table["file_name"] == "a.jpg"]
    b = table[table["file_name"] == "b.jpg"]
    assert a["curve_length_mm"].to_numpy() == pytest.approx(a["curve_length_px"] / 20)
    assert b["curve_length_mm"].to_numpy() == pytest.approx(b["curve_length_px"] / 5)


def test_wide_table_single_and_multiple_instances(coco_case, tmp_path):
    coco_path, _, _ = coco_case
    out, wide = tmp_path / "long.csv", tmp_path / "wide.csv"
    measure_coco(coco_path, out, px_per_mm=10, wide_csv=wide)
    measures = MASK_MEASURES + MM_COLUMNS
    expected_columns = (
        ["file_name", "image_id"]
        + [f"head_{m}" for m in measures]  # id 1: never more than one per image
        + [f"left antenna_{m}" for m in measures]  # id 2: never predicted
        + [f"legs_{k}_{m}" for k in (1, 2) for m in measures]  # id 3: up to two
    )
    table = pd.read_csv(wide)
    assert list(table.columns) == expected_columns
    assert list(table["file_name"]) == ["a.jpg", "b.jpg", "sub/c.jpg"]
    assert list(table["image_id"]) == [3, 7, 9]
    long = pd.read_csv(out).set_index("annotation_id")
    by_name = table.set_index("file_name")
    for m in measures:
        assert by_name.loc["b.jpg", f"head_{m}"] == pytest.approx(long.loc[101, m])
        assert by_name.loc["b.jpg", f"legs_1_{m}"] == pytest.approx(long.loc[103, m])
        assert by_name.loc["b.jpg", f"legs_2_{m}"] == pytest.approx(long.loc[102, m])
        assert by_name.loc["a.jpg", f"legs_1_{m}"] == pytest.approx(long.loc[202, m])
    assert by_name.loc["a.jpg", [f"legs_2_{m}" for m in measures]].isna().all()
    assert by_name.loc["sub/c.jpg"].drop("image_id").isna().all()  # nothing predicted
    assert table[[f"left antenna_{m}" for m in measures]].isna().all().all()


def test_wide_table_without_multiple_instances_has_plain_names(coco_case, tmp_path):
    coco_path, coco, _ = coco_case
    coco["annotations"] = [a for a in coco["annotations"] if a["id"] != 102]
    coco_path.write_text(json.dumps(coco))
    wide = tmp_path / "wide.csv"
    measure_coco(coco_path, tmp_path / "long.csv", wide_csv=wide)
    header = _rows(wide)[0]
    assert header == (
        ["file_name", "image_id"]
        + [f"{c}_{m}" for c in ("head", "left antenna", "legs") for m in MASK_MEASURES]
    )


def _antenna_coco(tmp_path, anns):
    """A predictions file with images a.jpg (id 1), b.jpg (id 2) and the categories
    antenna (id 1) and head (id 2); `anns`: (annotation id, image id, category id,
    instance or None, mask)."""
    annotations = []
    for ann_id, image_id, cat_id, instance, mask in anns:
        ann = {
            "id": ann_id,
            "image_id": image_id,
            "category_id": cat_id,
            "segmentation": encode_rle(mask),
            "bbox": [0, 0, 1, 1],
            "area": 1,
        }
        if instance is not None:
            ann["instance"] = instance
        annotations.append(ann)
    coco = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "b.jpg", "width": W, "height": H},
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "antenna"}, {"id": 2, "name": "head"}],
    }
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(coco))
    return path


def test_wide_table_columns_follow_the_instance_number(tmp_path):
    # a.jpg: both antennae; b.jpg: only antenna 2 was found (and a head)
    path = _antenna_coco(
        tmp_path,
        [
            (1, 1, 1, 1, _bar(10, 14, 10, 80)),
            (2, 1, 1, 2, _bar(30, 36, 10, 60)),
            (3, 2, 1, 2, _bar(50, 53, 20, 110)),
            (4, 2, 2, 1, _bar(60, 80, 40, 70)),
        ],
    )
    wide = tmp_path / "wide.csv"
    measure_coco(path, tmp_path / "long.csv", wide_csv=wide)
    table = pd.read_csv(wide).set_index("file_name")
    long = pd.read_csv(tmp_path / "long.csv").set_index("annotation_id")
    assert list(table.columns) == (
        ["image_id"]
        + [f"antenna_{k}_{m}" for k in (1, 2) for m in MASK_MEASURES]
        + [f"head_{m}" for m in MASK_MEASURES]
    )
    for m in MASK_MEASURES:
        assert table.loc["a.jpg", f"antenna_1_{m}"] == pytest.approx(long.loc[1, m])
        assert table.loc["a.jpg", f"antenna_2_{m}"] == pytest.approx(long.loc[2, m])
        assert table.loc["b.jpg", f"antenna_2_{m}"] == pytest.approx(long.loc[3, m])
        assert table.loc["b.jpg", f"head_{m}"] == pytest.approx(long.loc[4, m])
    # antenna 1 was not found on b.jpg: its cells are empty
    assert table.loc["b.jpg", [f"antenna_1_{m}" for m in MASK_MEASURES]].isna().all()
    assert table.loc["b.jpg", "antenna_2_area_px"] == 3 * 90


def test_wide_table_instance_columns_come_from_the_largest_instance_number(tmp_path):
    # never more than one antenna per image, but one of them is instance 2: the table
    # has the columns of both instances, and nothing of instance 2 lands in those of 1
    path = _antenna_coco(
        tmp_path,
        [
            (1, 1, 1, 1, _bar(10, 14, 10, 80)),
            (2, 2, 1, 2, _bar(50, 53, 20, 110)),
        ],
    )
    wide = tmp_path / "wide.csv"
    measure_coco(path, tmp_path / "long.csv", wide_csv=wide)
    table = pd.read_csv(wide).set_index("file_name")
    assert list(table.columns) == (
        ["image_id"]
        + [f"antenna_{k}_{m}" for k in (1, 2) for m in MASK_MEASURES]
        + [f"head_{m}" for m in MASK_MEASURES]
    )
    assert table.loc["a.jpg", "antenna_1_area_px"] == 4 * 70
    assert table.loc["b.jpg", "antenna_2_area_px"] == 3 * 90
    assert pd.isna(table.loc["a.jpg", "antenna_2_area_px"])
    assert pd.isna(table.loc["b.jpg", "antenna_1_area_px"])


@pytest.mark.parametrize(
    "second_instance,fragment",
    [
        (1, "annotations 1 and 2 are both instance 1 of 'antenna'"),
        (None, "annotation 1 of 'antenna' has an 'instance' and annotation 2 has none"),
    ],
)
def test_wide_table_refuses_ambiguous_instances(tmp_path, second_instance, fragment):
    path = _antenna_coco(
        tmp_path,
        [
            (1, 2, 1, 1, _bar(10, 14, 10, 80)),
            (2, 2, 1, second_instance, _bar(30, 36, 10, 60)),
        ],
    )
    out, wide = tmp_path / "long.csv", tmp_path / "wide.csv"
    with pytest.raises(InputError) as info:
        measure_coco(path, out, wide_csv=wide)
    message = str(info.value)
    assert (
        "\n" not in message and str(path) in message and "b.jpg" in message and fragment in message
    )
    _no_outputs(tmp_path, out.name, wide.name)
    # the long table alone has no columns per instance: it lists both
    measure_coco(path, out)
    assert list(pd.read_csv(out)["annotation_id"]) == [1, 2]


def test_threads_give_the_same_tables(coco_case, tmp_path):
    coco_path, _, _ = coco_case
    measure_coco(coco_path, tmp_path / "1.csv", px_per_mm=3, wide_csv=tmp_path / "1w.csv")
    measure_coco(
        coco_path, tmp_path / "2.csv", px_per_mm=3, wide_csv=tmp_path / "2w.csv", threads=3
    )
    assert (tmp_path / "1.csv").read_bytes() == (tmp_path / "2.csv").read_bytes()
    assert (tmp_path / "1w.csv").read_bytes() == (tmp_path / "2w.csv").read_bytes()


def _no_outputs(folder: Path, *names):
    leftovers = sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") or p.name in names
    )
    assert leftovers == [], leftovers


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("file_name,scale\na.jpg,20\n", "missing column(s) px_per_mm"),
        ("file_name,px_per_mm\na.jpg,twenty\n", "line 2"),
        ("file_name,px_per_mm\na.jpg,20\nb.jpg,0\n", "line 3"),
        ("file_name,px_per_mm\na.jpg,-4\n", "positive"),
        ("file_name,px_per_mm\na.jpg,20\nb.jpg,9\na.jpg,20\n", "line 4"),
        ("file_name,px_per_mm\n,20\n", "empty file_name"),
        ("", "empty calibration file"),
    ],
)
def test_bad_calibration_file_is_an_input_error(coco_case, tmp_path, content, fragment):
    coco_path, _, _ = coco_case
    calib = tmp_path / "scales.csv"
    calib.write_text(content, encoding="utf-8")
    out, wide = tmp_path / "long.csv", tmp_path / "wide.csv"
    with pytest.raises(InputError) as info:
        measure_coco(coco_path, out, calibration_csv=calib, wide_csv=wide)
    message = str(info.value)
    assert "\n" not in message and str(calib) in message and fragment in message
    _no_outputs(tmp_path, out.name, wide.name)


def test_missing_calibration_file_and_bad_global_scale(coco_case, tmp_path):
    coco_path, _, _ = coco_case
    out = tmp_path / "long.csv"
    with pytest.raises(InputError, match="scales.csv"):
        measure_coco(coco_path, out, calibration_csv=tmp_path / "scales.csv")
    for bad in (0, -2.5, float("nan"), "abc"):
        with pytest.raises(InputError, match="px_per_mm"):
            measure_coco(coco_path, out, px_per_mm=bad)
    _no_outputs(tmp_path, out.name)


def _break(coco, how):
    if how == "no annotations":
        del coco["annotations"]
    elif how == "unknown image":
        coco["annotations"][0]["image_id"] = 42
    elif how == "unknown category":
        coco["annotations"][0]["category_id"] = 8
    elif how == "no segmentation":
        del coco["annotations"][1]["segmentation"]
    elif how == "image without width":
        del coco["images"][1]["width"]
    elif how == "wrong RLE size":
        # the last image measured: the long table is half written when this fails
        coco["annotations"][2]["segmentation"]["size"] = [H + 1, W]
    return coco


@pytest.mark.parametrize(
    "how,fragment",
    [
        ("no annotations", "annotations"),
        ("unknown image", "image_id 42"),
        ("unknown category", "category_id 8"),
        ("no segmentation", "segmentation"),
        ("image without width", "width"),
        ("wrong RLE size", "annotation 102"),
    ],
)
def test_bad_coco_is_an_input_error_and_leaves_nothing(coco_case, tmp_path, how, fragment):
    coco_path, coco, _ = coco_case
    coco_path.write_text(json.dumps(_break(coco, how)))
    out, wide = tmp_path / "long.csv", tmp_path / "wide.csv"
    with pytest.raises(InputError) as info:
        measure_coco(coco_path, out, wide_csv=wide, threads=2)
    message = str(info.value)
    assert "\n" not in message and str(coco_path) in message and fragment in message
    _no_outputs(tmp_path, out.name, wide.name)


def test_streamed_coco_in_any_key_order(coco_case, tmp_path):
    """The file is streamed: its top-level keys may come in any order (annotations
    before images), with the same tables as a result."""
    coco_path, coco, _ = coco_case
    measure_coco(coco_path, tmp_path / "long.csv", wide_csv=tmp_path / "wide.csv")
    turned = tmp_path / "turned.json"
    turned.write_text(
        json.dumps(
            {
                "annotations": coco["annotations"],
                "info": {"x": [1, {"y": 2}]},
                "categories": coco["categories"],
                "images": coco["images"],
            }
        )
    )
    measure_coco(turned, tmp_path / "long2.csv", wide_csv=tmp_path / "wide2.csv", threads=2)
    assert (tmp_path / "long.csv").read_text() == (tmp_path / "long2.csv").read_text()
    assert (tmp_path / "wide.csv").read_text() == (tmp_path / "wide2.csv").read_text()
    for text, message in (
        ("[]", "must hold a JSON object"),
        ('{"images": {}, "annotations": [], "categories": []}', "'images' must be a list"),
        ("", "not valid JSON"),
    ):
        turned.write_text(text)
        with pytest.raises(InputError, match=message):
            measure_coco(turned, tmp_path / "long3.csv")


def test_missing_or_invalid_coco_file(tmp_path):
    out = tmp_path / "long.csv"
    with pytest.raises(InputError, match="not found"):
        measure_coco(tmp_path / "nope.json", out)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [}')
    with pytest.raises(InputError, match="not valid JSON") as info:
        measure_coco(broken, out)
    assert str(broken) in str(info.value)
    _no_outputs(tmp_path, out.name)


def test_failed_run_keeps_the_previous_table(coco_case, tmp_path):
    coco_path, coco, _ = coco_case
    out = tmp_path / "long.csv"
    measure_coco(coco_path, out)
    before = out.read_bytes()
    coco_path.write_text(json.dumps(_break(coco, "wrong RLE size")))
    with pytest.raises(InputError):
        measure_coco(coco_path, out)
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
