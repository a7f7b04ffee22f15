"""Morphometric measurements of predicted masks, and the measurement tables.

`measure_mask` turns one binary mask into a handful of size and shape measures, all in
pixels (the comment above it says what each one is). `measure_coco` reads a COCO predictions
file written by the project and writes:

* a long table, one row per predicted structure (annotation), and
* optionally a wide table, one row per image (specimen), one column per structure and
  measure, which is what most statistics software wants.

With a scale (pixels per millimetre, for all images or per image from a calibration
CSV) the tables also carry the measures in millimetres.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
from array import array
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_write
from sam2pal.io.coco import annotation_mask, scan_coco, stream_annotations
from sam2pal.progress import progress

__all__ = [
    "MASK_MEASURES",
    "MEASURE_COLUMNS",
    "MM_COLUMNS",
    "measure_mask",
    "measure_coco",
    "read_calibration",
]

#: The measures of `measure_mask`, in pixels (eccentricity and solidity have no unit).
MASK_MEASURES = [
    "area_px",
    "perimeter_px",
    "feret_max_px",
    "feret_min_px",
    "major_axis_px",
    "minor_axis_px",
    "eccentricity",
    "solidity",
    "curve_length_px",
]

#: Columns of the long measurement table, in this order.
MEASURE_COLUMNS = ["file_name", "image_id", "annotation_id", "category", *MASK_MEASURES]

#: Columns appended to the tables when a scale (pixels per millimetre) is known.
FRAME_COLUMNS = ["frame_index", "time_s"]  # after image_id, for video frames
MM_COLUMNS = ["area_mm2", "perimeter_mm", "feret_max_mm", "feret_min_mm", "curve_length_mm"]

# which pixel measure each millimetre column comes from, and the power of the scale
_MM_SOURCE = {
    "area_mm2": ("area_px", 2),
    "perimeter_mm": ("perimeter_px", 1),
    "feret_max_mm": ("feret_max_px", 1),
    "feret_min_mm": ("feret_min_px", 1),
    "curve_length_mm": ("curve_length_px", 1),
}

# Curve length settings. _BAND: a piece is a band (measured along its centre line) when
# its area is at least this many times the square of its largest width, i.e. when it is
# at least about this many widths long; else it is compact (measured along its long
# axis). _SMOOTH_SIGMA: Gaussian smoothing of the skeleton path, in path samples (about
# one pixel each). _TRIM: each end of the path is cut back by this many times the
# median half width before being prolonged to the outline. _REACH: path length (px)
# over which the end directions are taken. _STRAIGHT: a centre line at most this much
# (relative) longer than the distance between its two ends is straight, and measures
# that distance (on the smoothed pixel path, straight strokes read 0.1 to 0.6 % long,
# short thick ones up to about 1 %). _GAP: gaps (px) along a prolongation that are
# crossed, the staircase of a thin slanted line. Tuned on synthetic strokes (arcs, sine
# waves, straight bars, 3 to 15 px thick), where the length comes within 3 %.
_BAND = 4.0
_SMOOTH_SIGMA = 2.0
_TRIM = 2.0
_REACH = 1.0
_STRAIGHT = 0.01
_GAP = 1.0


# --------------------------------------------------------------------------------------
# one mask
# --------------------------------------------------------------------------------------

# How the measures are computed fast on the masks of large photos (none of this
# changes what is measured; tests/test_measure.py holds them to the values of a plain
# scikit-image implementation, tests/data/measure_golden.json):
#
# * everything works on the bounding box, with a background margin;
# * the outlines (OpenCV's findContours, Suzuki and Abe's border following) give the
#   pieces, the border pixels (exactly the pixels with a 4-neighbour in the background)
#   and the convex hulls: the perimeter is summed over the border pixels only, the
#   hull's pixel count (solidity) is counted row by row from its vertices;
# * the moments come from OpenCV (the same second moments as regionprops');
# * the skeleton is scikit-image's Zhang-Suen thinning, pixel for pixel, done by a
#   thinning that visits only the outline pixels of each pass (`_thin`);
# * the largest width (the maximum of the distance transform) decides band or compact.
#   Crops of at most _EXACT_DT pixels get their whole distance transform; larger ones
#   first get bounds on its maximum from two copies reduced by whole blocks to about
#   _DT_BLOCK_PIXELS pixels (`_widest_bounds`), and the whole transform only where the
#   bounds do not settle the question; the median half width of a band then comes from
#   exact distances at just enough of its centre-line pixels (`_median_half_width`).
_EXACT_DT = 600_000
_DT_BLOCK_PIXELS = 40_000
# up to this many pieces, the largest is found by filling each outline; more, by labelling
_PIECE_FILLS = 256
# the centre-line pixels whose distance to the background is computed first (every
# _MEDIAN_STEP-th): it bounds the others' (a distance changes no faster than the position)
_MEDIAN_STEP = 8

# scikit-image's perimeter estimator (`measure.perimeter`, 4-neighbourhood): weight of
# each border pixel by its code, 1 + 2 x (4-neighbours on the border) + 10 x (diagonal
# neighbours on the border)
_PERIMETER_WEIGHTS = np.zeros(50, dtype=np.float64)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = math.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + math.sqrt(2)) / 2


# What `measure_mask` measures, in pixels (the keys of MASK_MEASURES):
#
# * ``area_px``: number of pixels.
# * ``perimeter_px``: scikit-image's ``measure.perimeter`` (4-neighbourhood, the
#   estimator `regionprops` also uses): boundary pixels weighted by their local
#   configuration, i.e. a contour through the centres of the boundary pixels. It is
#   therefore a little shorter than the outline of the pixel squares (a 10 x 10 square
#   gives 36, not 40) and 0 for a single pixel. Holes add their own boundary.
# * ``feret_max_px`` / ``feret_min_px``: largest and smallest caliper (Feret)
#   diameter: the widest and narrowest extent of the structure over all directions.
#   Measured on the convex hull of the pixel squares (pixel corners), so a w x h
#   pixel rectangle gives exactly sqrt(w^2 + h^2) and min(w, h).
# * ``major_axis_px`` / ``minor_axis_px`` / ``eccentricity``: the axes of the ellipse
#   with the same second moments as the pixels (``regionprops`` axis_major_length,
#   axis_minor_length, eccentricity: 0 for a disc, towards 1 for elongated shapes).
# * ``solidity``: pixel count over the pixel count of the convex hull (``regionprops``:
#   the pixels whose centre lies in the convex hull of the midpoints of the pixels'
#   edges); 1 for convex shapes, lower for concave or fragmented ones.
# * ``curve_length_px``: the length of the structure along its midline, the length to
#   use for curved thin parts (antennae, legs). Measured on the largest piece, in one
#   of two ways:
#
#   - A *band*, a piece at least about four times as long as it is wide at its widest
#     (area >= 4 x the square of the diameter of the largest disc inside it), is
#     measured along its centre line: the longest path through its skeleton
#     (scikit-image's ``skeletonize``), its two ends cut back (there the skeleton
#     forks into the corners) and smoothed (to remove the pixel staircase), then
#     prolonged straight at both ends to the outline, so a stroke with flat ends
#     measures end to end. A centre line within 1 % of the distance between its two
#     ends is straight and measures that distance. Only a centre line that bends (an
#     arched antenna, a leg with its knee, two antennae touching at their bases)
#     measures longer than the maximum Feret diameter, as it must.
#   - A *compact* piece (head, pronotum, elytra, a blob, a short stub), whose
#     skeleton branches into every corner and bump and is no midline, is measured
#     along its long axis: its extent (caliper width) along the major axis of its
#     ellipse. That is never more than the maximum Feret diameter: a rectangle gives
#     its long side, a disc its diameter, an ellipse its major axis.
#
#   For a straight piece both give its length; they differ only for a short, thick,
#   bent piece, which is measured along its long axis. A single pixel measures 1, a
#   one-pixel line its number of pixels (times sqrt 2 on the diagonal).


def measure_mask(mask: np.ndarray) -> dict:
    """Size and shape measures of one binary mask, in pixels.

    The whole mask is treated as one structure, even when it is made of several
    separate pieces (connected components): area, perimeter, Feret diameters, the
    ellipse axes, eccentricity and solidity use all its pixels. The curve length alone
    is measured on the largest piece (8-connected), because a centre line only makes
    sense for one piece. What each measure is: see the comment above this function.

    Args:
        mask: a 2-D array; any dtype, non-zero is the structure.

    Returns:
        A dict of floats with the keys of `MASK_MEASURES`. An empty mask gives area 0
        and NaN for every other measure. A mask of a 12-megapixel photo takes some
        milliseconds to some tens of milliseconds (benchmarks/measure_speed.py).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    out = {key: math.nan for key in MASK_MEASURES}
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        out["area_px"] = 0.0
        return out
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    # all measures are translation invariant: work on the bounding box, with a
    # background margin so that the image edge reads as the structure's outline
    crop, block = _crop(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])

    area = cv2.countNonZero(crop)
    out["area_px"] = float(area)
    outline = _Outline.of(crop)
    border = outline.border()
    out["perimeter_px"] = _perimeter(crop.shape, border)
    centres = outline.hull()
    corners = _corner_hull(centres)
    out["feret_max_px"], out["feret_min_px"] = _feret(corners)
    moments = cv2.moments(crop)  # pixel values 0 and 1: the moments of the pixels
    out["major_axis_px"], out["minor_axis_px"], out["eccentricity"] = _ellipse(moments)
    out["solidity"] = float(area) / float(_hull_pixel_count(centres))
    if outline.pieces > 1:
        crop, block, outline = _largest_piece(crop, outline, area)
        area = cv2.countNonZero(crop)
        border = outline.border()
        corners = _corner_hull(outline.hull())
        moments = None
    out["curve_length_px"] = _curve_length(crop, block, area, corners, border, moments)
    return out


def curve_length(mask: np.ndarray) -> float:
    """Midline length of the largest 8-connected piece of a mask (see `measure_mask`)."""
    return measure_mask(mask)["curve_length_px"]


def feret_diameters(mask: np.ndarray) -> tuple[float, float]:
    """(max, min) caliper diameters of the pixel squares of a non-empty mask."""
    crop, _ = _crop(np.asarray(mask))
    return _feret(_corner_hull(_Outline.of(crop).hull()))


def _crop(region: np.ndarray) -> tuple[np.ndarray, int]:
    """(uint8 0/1 copy of a region (non-zero: 1) with a background margin of at least
    1 px, the block size of `_widest_bounds` for it): the copy's sides are multiples of
    the block size."""
    h, w = region.shape
    pixels = (h + 2) * (w + 2)
    block = 1 if pixels <= _EXACT_DT else min(16, max(2, int(math.sqrt(pixels / _DT_BLOCK_PIXELS))))
    crop = np.zeros((-(-(h + 2) // block) * block, -(-(w + 2) // block) * block), np.uint8)
    inner = crop[1 : h + 1, 1 : w + 1]
    if region.dtype == np.bool_:
        inner[...] = region.view(np.uint8)
    else:
        np.not_equal(region, 0, out=inner.view(np.bool_))
    return crop, block


class _Outline:
    """The outlines of a mask with a background margin: those of its 8-connected pieces
    and of their holes (OpenCV's findContours, every border pixel, as (x, y) points).

    Suzuki and Abe's border following visits exactly the border pixels, those with a
    4-neighbour in the background; the outline of a piece is one closed chain, each
    hole's another."""

    def __init__(self, shape, contours, depth, parent):
        self.shape = shape
        self.contours = contours
        self.depth = depth  # 0: a piece's outline, 1: a hole's, 2: a piece in a hole ...
        self.parent = parent  # the index of the enclosing outline, -1 for none
        self.outer = np.flatnonzero(depth % 2 == 0)
        self.pieces = len(self.outer)

    @classmethod
    def of(cls, crop: np.ndarray) -> _Outline:
        contours, hierarchy = cv2.findContours(crop, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
        parent = hierarchy[0][:, 3]
        depth = np.zeros(len(parent), np.intp)
        up = parent.copy()
        while (up >= 0).any():
            depth += up >= 0
            up = np.where(up >= 0, parent[np.maximum(up, 0)], -1)
        return cls(crop.shape, [c.reshape(-1, 2) for c in contours], depth, parent)

    def hull(self) -> np.ndarray:
        """Vertices (x, y) of the convex hull of the pixel centres."""
        points = np.concatenate([self.contours[k] for k in self.outer])
        return cv2.convexHull(points).reshape(-1, 2)

    def border(self) -> np.ndarray:
        """Flat indices (row-major) of the border pixels, each once, sorted."""
        points = np.concatenate(self.contours)
        return np.unique(points[:, 1].astype(np.intp) * self.shape[1] + points[:, 0])


def _perimeter(shape: tuple[int, int], border: np.ndarray) -> float:
    """scikit-image's ``measure.perimeter(mask, neighborhood=4)`` from the border pixels
    of a mask with a margin (the other pixels' codes have weight 0): the same sum, to the
    bit."""
    cols = shape[1]
    on_border = np.zeros(shape[0] * cols, np.uint8)
    on_border[border] = 1
    code = (
        1
        + 2
        * (
            on_border[border - 1]
            + on_border[border + 1]
            + on_border[border - cols]
            + on_border[border + cols]
        )
        + 10
        * (
            on_border[border - cols - 1]
            + on_border[border - cols + 1]
            + on_border[border + cols - 1]
            + on_border[border + cols + 1]
        )
    )
    return float(np.bincount(code, minlength=50) @ _PERIMETER_WEIGHTS)


def _corner_hull(centres: np.ndarray) -> np.ndarray:
    """Vertices (x, y) of the convex hull of the pixel squares (pixel (r, c) is the
    square [c, c+1] x [r, r+1]) from that of their centres: its corners are among the
    corners of the hull's pixels."""
    corners = centres.astype(np.float32)[:, None, :] + np.array(
        [[0, 0], [1, 0], [0, 1], [1, 1]], np.float32
    )
    return cv2.convexHull(corners.reshape(-1, 2)).reshape(-1, 2).astype(np.float64)


def _feret(hull: np.ndarray) -> tuple[float, float]:
    """(max, min) caliper diameters of a convex polygon."""
    feret_max = float(pdist(hull).max())
    # rotating calipers: the narrowest width of a convex polygon is attained with one
    # caliper flush against an edge; for each edge, the width is the largest distance
    # of a vertex from the edge's line
    edges = np.roll(hull, -1, axis=0) - hull
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    keep = lengths > 0
    edges, starts = edges[keep] / lengths[keep, None], hull[keep]
    rel = hull[None, :, :] - starts[:, None, :]
    dist = np.abs(rel[..., 0] * edges[:, None, 1] - rel[..., 1] * edges[:, None, 0])
    feret_min = float(dist.max(axis=1).min())
    return feret_max, feret_min


def _hull_pixel_count(centres: np.ndarray) -> int:
    """Pixel count of scikit-image's convex hull image (``regionprops`` area_convex):
    the pixel centres inside or on the convex hull of the midpoints of the pixels'
    edges, counted exactly, row by row, from the hull's vertices.

    `centres`: the vertices (x, y) of the convex hull of the pixel centres. Coordinates
    are doubled so that every point is on the integer grid: pixel (r, c) has its centre
    at (2c, 2r) and its edge midpoints at (2c +- 1, 2r), (2c, 2r +- 1).
    """
    doubled = centres.astype(np.int64)[:, None, :] * 2
    diamond = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], np.int64)
    points = (doubled + diamond).reshape(-1, 2).astype(np.int32)
    poly = cv2.convexHull(points).reshape(-1, 2).astype(np.int64)
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    slanted = y1 != y2  # the ends of level edges are ends of the edges next to them
    x1, y1, x2, y2 = x1[slanted], y1[slanted], x2[slanted], y2[slanted]
    # the rows of pixel centres (even y) each edge spans, ends included
    first = -((-np.minimum(y1, y2)) // 2) * 2
    last = (np.maximum(y1, y2) // 2) * 2
    counts = np.maximum((last - first) // 2 + 1, 0)
    edge = np.repeat(np.arange(len(counts)), counts)
    step = np.arange(len(edge)) - np.repeat(np.cumsum(counts) - counts, counts)
    y = first[edge] + 2 * step
    # where the edge crosses row y: x = num / den exactly, den > 0
    dy = y2[edge] - y1[edge]
    num = x1[edge] * dy + (y - y1[edge]) * (x2[edge] - x1[edge])
    num, den = np.where(dy > 0, num, -num), np.abs(dy)
    lowest = -((-num) // (2 * den))  # ceil(x / 2): the first pixel centre at or after x
    highest = num // (2 * den)  # floor(x / 2)
    row = (y - y.min()) // 2
    n_rows = int(row.max()) + 1
    lo = np.full(n_rows, np.iinfo(np.int64).max)
    hi = np.full(n_rows, np.iinfo(np.int64).min)
    np.minimum.at(lo, row, lowest)
    np.maximum.at(hi, row, highest)
    return int(np.maximum(hi - lo + 1, 0).sum())


def _ellipse(moments: dict) -> tuple[float, float, float]:
    """(major axis, minor axis, eccentricity) of the ellipse with the same second
    moments as the pixels, as `regionprops` computes them from its inertia tensor."""
    mu0 = moments["m00"]
    # regionprops' inertia tensor, (row, col): [[mu_cc, -mu_rc], [-mu_rc, mu_rr]] / mu0;
    # OpenCV's mu20 is the column (x) moment
    tensor = np.array(
        [
            [moments["mu20"] / mu0, -moments["mu11"] / mu0],
            [-moments["mu11"] / mu0, moments["mu02"] / mu0],
        ]
    )
    eigvals = np.clip(np.linalg.eigvalsh(tensor), 0, None)
    l1, l2 = sorted(eigvals, reverse=True)
    eccentricity = 0.0 if l1 == 0 else math.sqrt(1 - l2 / l1)
    return 4 * math.sqrt(l1), 4 * math.sqrt(l2), float(eccentricity)


def _largest_piece(crop: np.ndarray, outline: _Outline, area: int):
    """(crop, block, outline) of the largest 8-connected piece of a mask with a margin
    (its pixel count `area`), cropped (`_crop`); of pieces of the same size, the first in
    row order (as `ndimage.label` numbers them).

    With few pieces, none inside another's hole, each piece's outline is filled and
    intersected with the mask; that gives its pixels, unless the fill missed some, which
    the pixel counts adding up to the mask's shows. Else the pieces are labelled."""
    if outline.pieces <= _PIECE_FILLS and outline.depth.max() <= 1:
        best = None
        total = 0
        for k in outline.outer:
            points = outline.contours[k]
            (x, y), (x2, y2) = points.min(axis=0), points.max(axis=0)
            piece = np.zeros((y2 - y + 1, x2 - x + 1), np.uint8)
            cv2.drawContours(piece, [points], 0, 1, thickness=cv2.FILLED, offset=(-int(x), -int(y)))
            cv2.bitwise_and(piece, crop[y : y2 + 1, x : x2 + 1], dst=piece)
            count = cv2.countNonZero(piece)
            total += count
            # the first pixel in row order: the leftmost of the top row
            first = (int(y), int(points[points[:, 1] == y, 0].min()))
            if best is None or (count, -first[0], -first[1]) > (best[0], -best[1][0], -best[1][1]):
                best = (count, first, k, piece, int(x), int(y))
        if total == area:
            _, _, k, piece, x, y = best
            comp, block = _crop(piece)
            # the piece's outline and its holes', moved by the crop (1 px margin)
            keep = [k, *np.flatnonzero(outline.parent == k)]
            shift = np.array([1 - x, 1 - y], np.int32)
            contours = [outline.contours[j] + shift for j in keep]
            parent = np.array([-1] + [0] * (len(keep) - 1))
            return comp, block, _Outline(comp.shape, contours, outline.depth[keep], parent)
    ltype = cv2.CV_16U if outline.pieces < 65535 else cv2.CV_32S
    _, labels, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8, ltype=ltype)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    best = np.flatnonzero(sizes == sizes.max()) + 1
    left, top, width = cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH
    if len(best) > 1:
        # a piece's first pixel is on the top row of its box
        best = [
            min(
                best,
                key=lambda j: (
                    stats[j, top],
                    stats[j, left]
                    + int(
                        np.argmax(
                            labels[stats[j, top], stats[j, left] : stats[j, left] + stats[j, width]]
                            == j
                        )
                    ),
                ),
            )
        ]
    x, y, w, h = (int(v) for v in stats[best[0], :4])
    comp, block = _crop(labels[y : y + h, x : x + w] == best[0])
    return comp, block, _Outline.of(comp)


def _principal_axis(moments: dict) -> np.ndarray:
    """Unit vector (row, col) of the long axis of the second-moment ellipse of a mask's
    pixels (along the columns when the pixels have no long axis, e.g. a square)."""
    n = moments["m00"]
    if n < 2:
        return np.array([0.0, 1.0])
    # the covariance of the pixel coordinates (row, col), as numpy.cov computes it
    cov = np.array([[moments["mu02"], moments["mu11"]], [moments["mu11"], moments["mu20"]]]) / (
        n - 1
    )
    values, vectors = np.linalg.eigh(cov)
    if values[1] - values[0] <= 1e-9 * max(values[1], 1e-12):
        return np.array([0.0, 1.0])
    return vectors[:, 1]


def _exact_distance(value) -> np.ndarray:
    """Euclidean distances between pixel centres (square roots of integers) from their
    float32 values (OpenCV's distance transform), exactly as float64."""
    value = np.asarray(value, np.float64)
    return np.sqrt(np.round(value * value))


def _distance_transform(comp: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance from each pixel to the nearest background pixel
    (``ndimage.distance_transform_edt``), in float32."""
    return cv2.distanceTransform(comp, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _widest_bounds(comp: np.ndarray, block: int) -> tuple[float, float]:
    """Lower and upper bounds on the largest distance of a pixel to the background (the
    maximum of the distance transform) of a mask with a margin whose sides are
    multiples of `block`, from exact distance transforms of two copies reduced by
    `block` x `block` blocks: one whose blocks are set where the mask covers them
    wholly, one where it touches them.

    A block's centre is within (block - 1) / sqrt 2 of each of its pixels and within
    c = 0.5 sqrt 2 (block even) or 0 (odd) of its nearest pixel. Every background pixel
    lies in a block not wholly covered, every pixel of an untouched block is
    background; hence, for the pixel nearest the centre of the block farthest from any
    block not wholly covered (d_all blocks away) and for any pixel of any block (at most
    d_any blocks from an untouched one):
    block d_all - (block - 1) / sqrt 2 - c <= max <= block d_any + (block - 1) / sqrt 2 + c.
    """
    rows, cols = comp.shape
    mean = cv2.resize(
        comp * np.uint8(255), (cols // block, rows // block), interpolation=cv2.INTER_AREA
    )
    # block <= 16: a block is wholly covered exactly when its mean rounds to 255, and
    # touched exactly when it rounds to at least 1
    widest = []
    for reduced in (mean == 255, mean > 0):
        reduced = cv2.copyMakeBorder(
            reduced.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0
        )
        widest.append(float(_exact_distance(_distance_transform(reduced).max())))
    slack = (block - 1) / math.sqrt(2) + (math.sqrt(0.5) if block % 2 == 0 else 0.0)
    return max(1.0, block * widest[0] - slack), block * widest[1] + slack


def _median_half_width(comp: np.ndarray, border: np.ndarray, path: np.ndarray) -> float:
    """The median over the centre-line pixels `path` (row, col) of a mask with a margin
    of their distance to the background minus 0.5 (their half width), exact, without
    the whole distance transform.

    The distance to the background is the distance to the nearest background pixel next
    to a border pixel (a k-d tree of those). It is computed at every `_MEDIAN_STEP`-th
    pixel of the path; as it changes by at most the distance moved, that bounds it at
    the others, and only those whose bounds reach into the range where the median can
    be are computed as well. The others are replaced by -inf or +inf, which leaves the
    median as it is."""
    cols = comp.shape[1]
    outside = (border[:, None] + np.array([-1, 1, -cols, cols])).ravel()
    outside = np.unique(outside[comp.ravel()[outside] == 0])
    tree = cKDTree(np.stack(np.divmod(outside, cols), axis=1))
    n = len(path)
    index = np.arange(n)
    before = np.minimum(index // _MEDIAN_STEP * _MEDIAN_STEP, n - 1)
    after = np.minimum(before + _MEDIAN_STEP, n - 1)
    known = np.zeros(n, bool)
    known[before] = known[after] = True
    value = np.full(n, np.nan)
    value[known] = tree.query(path[known])[0]
    low, high = np.full(n, -np.inf), np.full(n, np.inf)
    for anchor in (before, after):
        gap = np.hypot(*(path - path[anchor]).T)
        low = np.maximum(low, value[anchor] - gap)
        high = np.minimum(high, value[anchor] + gap)
    middle = ((n - 1) // 2, n // 2)
    lowest = np.partition(low, middle[0])[middle[0]]
    highest = np.partition(high, middle[1])[middle[1]]
    needed = ~known & (high >= lowest) & (low <= highest)
    value[needed] = tree.query(path[needed])[0]
    value[~known & ~needed & (high < lowest)] = -np.inf
    value[~known & ~needed & (low > highest)] = np.inf
    return float(np.median(value - 0.5))


def _curve_length(
    comp: np.ndarray,
    block: int,
    area: int,
    corners: np.ndarray,
    border: np.ndarray,
    moments: dict | None,
) -> float:
    """Midline length of one 8-connected piece (uint8 0/1 with a margin whose sides are
    multiples of `block`; its pixel count, the vertices of the convex hull of its pixel
    squares, its border pixels and, if known, its moments): the centre-line length of a
    band (`_band_length`), else the extent along the long axis of a compact piece
    (`_axis_extent`)."""
    feret_max = float(pdist(corners).max())

    def long_axis() -> np.ndarray:
        return _principal_axis(cv2.moments(comp) if moments is None else moments)

    dt = None
    if block > 1:
        # settle band or compact from bounds on the largest width where they suffice
        low, high = _widest_bounds(comp, block)
        if area < _BAND * (2.0 * low - 1.0) ** 2:
            return _axis_extent(corners, long_axis(), feret_max)
        if area < _BAND * (2.0 * high - 1.0) ** 2:
            dt = _distance_transform(comp)
    else:
        dt = _distance_transform(comp)
    if dt is not None:
        # the largest width: the diameter of the largest disc of pixel squares inside
        width = 2.0 * float(_exact_distance(dt.max())) - 1.0
        if area < _BAND * width**2:
            return _axis_extent(corners, long_axis(), feret_max)
    coords, graph = _skeleton_graph(_thin(comp, border))
    path = coords[_longest_path(graph)]
    # local half width: distance from the skeleton pixel's centre to the outline
    if dt is not None:
        half_width = float(np.median(_exact_distance(dt[path[:, 0], path[:, 1]]) - 0.5))
    else:
        half_width = _median_half_width(comp, border, path)
    return _band_length(comp, path.astype(np.float64), half_width, feret_max, long_axis)


# Zhang-Suen thinning as scikit-image's `skeletonize` does it (its look-up table: 1 and
# 3 are removed in the first pass of an iteration, 2 and 3 in the second)
_ZHANG_LUT = np.array(
    [
        0,
        0,
        0,
        1,
        0,
        0,
        1,
        3,
        0,
        0,
        3,
        1,
        1,
        0,
        1,
        3,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
        0,
        2,
        0,
        3,
        0,
        3,
        3,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        3,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
        0,
        0,
        0,
        3,
        0,
        2,
        2,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
        0,
        0,
        0,
        2,
        0,
        0,
        0,
        3,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        3,
        0,
        0,
        0,
        3,
        0,
        2,
        0,
        0,
        0,
        3,
        1,
        0,
        0,
        1,
        3,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        1,
        3,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
        3,
        1,
        3,
        0,
        0,
        1,
        3,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
        3,
        0,
        1,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        3,
        3,
        0,
        1,
        0,
        0,
        0,
        0,
        2,
        2,
        0,
        0,
        2,
        0,
        0,
        0,
    ],
    np.uint8,
)
_ZHANG_REMOVE = (np.isin(_ZHANG_LUT, (1, 3)), np.isin(_ZHANG_LUT, (2, 3)))
# a pixel's code: the sum of these weights over its set neighbours, plus _SET if set
_SET = 20000
_ZHANG_WEIGHTS = np.array([[1, 2, 4], [128, _SET, 8], [64, 32, 16]], np.float32)


def _thin(comp: np.ndarray, border: np.ndarray) -> np.ndarray:
    """scikit-image's ``skeletonize`` (Zhang-Suen thinning) of a mask with a margin
    (and its border pixels, flat indices), pixel for pixel, in time proportional to the
    pixels removed rather than to the image size times the number of passes: each pass
    looks only at the pixels on the current outline, and the codes of their
    neighbourhoods are kept up to date as pixels go.

    As in scikit-image, each pass decides for all outline pixels at once from the image
    before the pass, and thinning stops after an iteration (two passes) that removes
    nothing.
    """
    rows, cols = comp.shape
    code = cv2.filter2D(comp, cv2.CV_16S, _ZHANG_WEIGHTS, borderType=cv2.BORDER_CONSTANT).ravel()
    full = _SET + 255
    # the outline: set pixels with a neighbour not set. Each is a border pixel or next to
    # one (where it touches the background at a corner only, the two neighbours beside
    # that corner are border pixels)
    near = np.unique(
        (
            border[:, None]
            + np.array([0, -cols - 1, -cols, -cols + 1, -1, 1, cols - 1, cols, cols + 1])
        ).ravel()
    )
    candidates = near[(code[near] >= _SET) & (code[near] != full)]
    # (neighbour offset, the weight of the pixel itself in that neighbour's code)
    neighbours = [
        (-cols - 1, 16),
        (-cols, 32),
        (-cols + 1, 64),
        (1, 128),
        (cols + 1, 1),
        (cols, 2),
        (cols - 1, 4),
        (-1, 8),
    ]
    while True:
        removed = False
        for remove in _ZHANG_REMOVE:
            going = remove[code.take(candidates) - _SET]
            gone = candidates[going]
            if not gone.size:
                continue
            removed = True
            parts = [candidates[~going]]
            code[gone] -= _SET
            for offset, weight in neighbours:
                near = gone + offset
                before = code.take(near)
                code[near] = before - weight
                # a set pixel whose neighbours were all set is now on the outline
                fresh = near[before == full]
                if fresh.size:
                    parts.append(fresh)
            candidates = np.concatenate(parts)
        if not removed:
            break
    return (code >= _SET).reshape(rows, cols)


def _skeleton_graph(skeleton: np.ndarray):
    """(coordinates (row, col), sparse 8-connected graph with weights 1 and sqrt 2) of
    the skeleton pixels, in row order."""
    n_cols = skeleton.shape[1]
    flat = np.flatnonzero(skeleton)
    coords = np.stack(np.divmod(flat, n_cols), axis=1)
    col = coords[:, 1]
    n = len(flat)
    src, dst, wts = [], [], []
    for dr, dc, w in ((0, 1, 1.0), (1, 0, 1.0), (1, 1, math.sqrt(2)), (1, -1, math.sqrt(2))):
        target = flat + dr * n_cols + dc
        pos = np.minimum(np.searchsorted(flat, target), max(n - 1, 0))
        ok = (flat[pos] == target) & (col + dc >= 0) & (col + dc < n_cols)
        src.append(np.flatnonzero(ok))
        dst.append(pos[ok])
        wts.append(np.full(ok.sum(), w))
    src, dst, wts = np.concatenate(src), np.concatenate(dst), np.concatenate(wts)
    graph = sparse.coo_matrix((wts, (src, dst)), shape=(n, n)).tocsr()
    return coords, graph


def _longest_path(graph) -> np.ndarray:
    """Node indices of a longest shortest path (repeated farthest-node sweeps)."""
    start, best = 0, -1.0
    for _ in range(4):
        dist, pred = csgraph.dijkstra(
            graph, directed=False, indices=start, return_predecessors=True
        )
        dist[~np.isfinite(dist)] = -1.0
        far = int(np.argmax(dist))
        if dist[far] <= best:
            break
        best, path_pred, path_start, path_end = dist[far], pred, start, far
        start = far
    if best <= 0:
        return np.array([0])
    path = [path_end]
    while path[-1] != path_start:
        path.append(int(path_pred[path[-1]]))
    return np.array(path[::-1])


def _ray_exit(mask: np.ndarray, point: np.ndarray, direction: np.ndarray) -> float:
    """Distance from `point` (row, col; pixel centres at integers) along the unit vector
    `direction` to where the ray leaves the mask's pixel squares for good, computed
    exactly: the ray is followed cell by cell through the pixel grid. Gaps shorter than
    `_GAP` along the ray, between the steps of a thin slanted line, are crossed (they
    are the pixel staircase, not the outline); where the ray passes through a corner at
    which two pixels touch diagonally it goes on into the diagonal one. 0 when the point
    is not on a mask pixel."""
    d = (float(direction[0]), float(direction[1]))
    if d == (0.0, 0.0):
        return 0.0
    p = (float(point[0]), float(point[1]))
    cell = [int(math.floor(p[0] + 0.5)), int(math.floor(p[1] + 0.5))]
    rows, cols = mask.shape

    def inside() -> bool:
        return 0 <= cell[0] < rows and 0 <= cell[1] < cols and bool(mask[cell[0], cell[1]])

    if not inside():
        return 0.0
    step, t_next, t_step = [0, 0], [math.inf, math.inf], [math.inf, math.inf]
    for a in (0, 1):
        if d[a] > 0:
            step[a], t_next[a], t_step[a] = 1, (cell[a] + 0.5 - p[a]) / d[a], 1.0 / d[a]
        elif d[a] < 0:
            step[a], t_next[a], t_step[a] = -1, (cell[a] - 0.5 - p[a]) / d[a], -1.0 / d[a]
    left = None  # where the ray last left the mask, while it is outside
    while True:
        t = min(t_next)
        if left is not None and t - left >= _GAP:
            return left
        # crossing a row and a column edge at once (within rounding): through a corner
        both = abs(t_next[0] - t_next[1]) <= 1e-9 * max(1.0, t)
        for a in (0, 1):
            if both or t_next[a] == t:
                cell[a] += step[a]
                t_next[a] += t_step[a]
        if not (0 <= cell[0] < rows and 0 <= cell[1] < cols):
            return t if left is None else left
        if inside():
            left = None
        elif left is None:
            left = t


def _axis_extent(hull: np.ndarray, axis: np.ndarray, feret_max: float) -> float:
    """Extent of the pixel squares along the long axis (their caliper width in that
    direction): at most the largest Feret diameter, which is the largest caliper width
    over all directions (min() only absorbs rounding)."""
    # hull vertices are (x, y) = (col, row)
    along = hull[:, 1] * axis[0] + hull[:, 0] * axis[1]
    return min(float(along.max() - along.min()), feret_max)


def _band_length(
    comp: np.ndarray, path: np.ndarray, half_width: float, feret_max: float, long_axis
) -> float:
    """Centre-line length of a band: the skeleton path (row, col) with its ends cut
    back (by twice the median half width `half_width`), smoothed, and prolonged straight
    to the outline at both ends (`long_axis()`: the piece's long axis, for a path that
    is all but a point)."""
    # the skeleton forks towards the corners of flat ends: trim each end back by about
    # the local width, the prolongation below restores the length along the midline
    path = _trim_ends(path, half_width)
    smooth = _smooth_path(path)
    steps = np.diff(smooth, axis=0)
    inner = float(np.hypot(steps[:, 0], steps[:, 1]).sum())
    if inner < 2.0:
        # (nearly) a point: the centre line is the chord along the long axis through the
        # path's middle pixel
        centre, axis = path[len(path) // 2], long_axis()
        return min(_ray_exit(comp, centre, axis) + _ray_exit(comp, centre, -axis), feret_max)
    head_dir, tail_dir = _end_directions(smooth)
    head_out = _ray_exit(comp, smooth[0], head_dir)
    tail_out = _ray_exit(comp, smooth[-1], tail_dir)
    length = inner + head_out + tail_out
    # the two ends of the centre line, on the outline
    head = smooth[0] + head_out * head_dir
    tail = smooth[-1] + tail_out * tail_dir
    chord = float(np.hypot(*(head - tail)))
    if length <= (1.0 + _STRAIGHT) * chord:
        # a straight centre line: its length is the distance between its ends, which,
        # two points of the piece, are at most the largest Feret diameter apart (min()
        # only absorbs rounding); what the path adds on top is pixel noise
        return min(chord, feret_max)
    return length


def _smooth_path(path: np.ndarray) -> np.ndarray:
    """Gaussian smoothing of the path coordinates, which removes the staircase of the
    8-connected pixel path (raw, a line at 22.5 degrees reads ~8 % too long).

    The path is first continued past each end by its point reflection through the end
    point (repeated for a short path), so that the ends stay in place and keep their
    direction (a straight path is left unchanged), instead of bunching up as with edge
    replication.
    """
    n = len(path)
    if n < 3:
        return path
    pad = int(math.ceil(4 * _SMOOTH_SIGMA))
    padded = np.pad(path, ((pad, pad), (0, 0)), mode="reflect", reflect_type="odd")
    smooth = ndi.gaussian_filter1d(padded, _SMOOTH_SIGMA, axis=0, mode="nearest")
    return smooth[pad : pad + n]


def _trim_ends(path: np.ndarray, half_width: float) -> np.ndarray:
    """Drop the path's end pieces, which wander into the corners of the outline.

    Near an end, the skeleton is no midline: at a flat end it forks towards the two
    corners, and it may hug the outline. Each end loses a piece of `_TRIM` times the
    typical (median) half width of the structure (`half_width`), never more than a third
    of the path;
    the prolongation to the outline restores the length along the midline.
    """
    if len(path) < 3:
        return path
    steps = np.hypot(*np.diff(path, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    total = arc[-1]
    cut = min(_TRIM * half_width, total / 3.0)
    keep = np.flatnonzero((arc >= cut) & (arc <= total - cut))
    if len(keep) < 2:
        return path
    return path[keep[0] : keep[-1] + 1]


def _end_directions(smooth: np.ndarray):
    """Outward unit directions at the two ends of the smoothed centre line (zero where
    the line has no direction)."""
    steps = np.hypot(*np.diff(smooth, axis=0).T)
    total = float(steps.sum())
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    reach = min(_REACH, total / 2.0)
    i_head = int(np.searchsorted(arc, reach))
    i_tail = int(np.searchsorted(arc, total - reach, side="right")) - 1
    out = []
    for vector in (smooth[0] - smooth[i_head], smooth[-1] - smooth[i_tail]):
        norm = float(np.hypot(*vector))
        out.append(vector / norm if norm > 0 else np.zeros(2))
    return out


# --------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------


def _positive_scale(value, where: str | None = None) -> float:
    """A pixels-per-millimetre value as a positive finite float, else InputError
    (`where` names the file and line it comes from, if any)."""
    prefix = f"{where}: " if where else ""
    try:
        if isinstance(value, bool):
            raise ValueError
        scale = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{prefix}px_per_mm {value!r} is not a number") from None
    if not math.isfinite(scale) or scale <= 0:
        raise InputError(
            f"{prefix}px_per_mm must be a positive number (pixels per millimetre), got {value!r}"
        )
    return scale


def read_calibration(path: str | os.PathLike) -> dict[str, float]:
    """Read a per-image scale table: a CSV with the columns ``file_name,px_per_mm``.

    Other columns are allowed and ignored; rows left entirely empty are skipped.
    Returns {file_name: px_per_mm}. Raises InputError naming the file (and the line)
    when the file is missing, lacks a column, has a px_per_mm that is not a positive
    number, or lists the same file_name twice.
    """
    path = Path(path)
    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 (Excel's BOM tolerated; closed below)
    except FileNotFoundError:
        raise InputError(f"{path}: calibration file not found") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the calibration file ({err.strerror})") from None
    scales: dict[str, float] = {}
    first_line: dict[str, int] = {}
    with handle:
        try:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            if not header:
                raise InputError(
                    f"{path}: empty calibration file, expected the columns file_name,px_per_mm"
                )
            reader.fieldnames = header
            missing = [col for col in ("file_name", "px_per_mm") if col not in header]
            if missing:
                raise InputError(
                    f"{path}: missing column(s) {', '.join(missing)} "
                    f"(expected file_name,px_per_mm; found {','.join(header)})"
                )
            for row in reader:
                line = reader.line_num
                if all(
                    (value or "").strip() == "" for value in row.values() if isinstance(value, str)
                ):
                    continue
                name = (row.get("file_name") or "").strip()
                raw = (row.get("px_per_mm") or "").strip()
                if not name:
                    raise InputError(f"{path}, line {line}: empty file_name")
                scale = _positive_scale(raw, f"{path}, line {line}")
                if name in scales:
                    raise InputError(
                        f"{path}, line {line}: file_name {name!r} is listed "
                        f"twice (first on line {first_line[name]})"
                    )
                scales[name] = scale
                first_line[name] = line
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a UTF-8 text (CSV) file") from None
        except csv.Error as err:
            raise InputError(f"{path}: not a readable CSV file ({err})") from None
    return scales


def _base_name(file_name: str) -> str:
    return file_name.replace("\\", "/").rsplit("/", 1)[-1]


class _ScaleLookup:
    """Scale of an image: its calibration row (same file_name, else the same base name
    when that base name is unique in the calibration file), else the global scale."""

    def __init__(self, calibration: dict[str, float] | None, default: float | None):
        self.calibration = calibration or {}
        self.default = default
        by_base: dict[str, list[float]] = {}
        for name, scale in self.calibration.items():
            by_base.setdefault(_base_name(name), []).append(scale)
        self.by_base = {base: s[0] for base, s in by_base.items() if len(s) == 1}

    def __call__(self, file_name: str) -> float | None:
        if file_name in self.calibration:
            return self.calibration[file_name]
        base = _base_name(file_name)
        if base in self.by_base:
            return self.by_base[base]
        return self.default


# --------------------------------------------------------------------------------------
# COCO predictions -> tables
# --------------------------------------------------------------------------------------


def _id_key(value):
    """Sort key for COCO ids (ints, or strings in some exports)."""
    return (1, value) if isinstance(value, str) else (0, value)


def _read_header(path: Path, wide: bool) -> tuple[dict, dict]:
    """The checked images ({id: image}) and categories ({id: name}, in id order) of a
    COCO file, from a first streamed pass; the wide table needs distinct category names."""
    images, raw_categories = scan_coco(path)
    categories = {cid: c["name"] for cid, c in raw_categories.items()}
    categories = dict(sorted(categories.items(), key=lambda kv: _id_key(kv[0])))
    names = list(categories.values())
    if wide and len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise InputError(
            f"{path}: several categories are named {dup!r}; the wide "
            "table needs distinct category names"
        )
    return images, categories


def _measure_annotation(path: Path, image: dict, ann: dict) -> list[float]:
    """The `MASK_MEASURES` of one annotation's mask."""
    values = measure_mask(annotation_mask(path, image, ann))
    return [float(values[key]) for key in MASK_MEASURES]


def _batches(iterable, size: int):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Measured:
    """Every annotation's ids and measures, compactly (no masks): the state between
    the streamed pass over the annotations and the writing of the tables."""

    def __init__(self):
        self.ids: list = []  # (annotation id, image id, category id, instance or None)
        self.values = array("d")

    def add(self, ann: dict, values: list[float]) -> None:
        self.ids.append((ann["id"], ann["image_id"], ann["category_id"], ann.get("instance")))
        self.values.extend(values)

    def row(self, index: int) -> list[float]:
        n = len(MASK_MEASURES)
        return list(self.values[index * n : (index + 1) * n])

    def by_image(self) -> dict:
        """{image id: [annotation index ...]} in table order: by category id, then
        instance (when every annotation of the category has one), else annotation id."""
        groups: dict = {}
        for index, (_, image_id, cat_id, _) in enumerate(self.ids):
            groups.setdefault(image_id, {}).setdefault(cat_id, []).append(index)
        ordered: dict = {}
        for image_id, cats in groups.items():
            out = []
            for cat_id in sorted(cats, key=_id_key):
                group = cats[cat_id]
                if all(self.ids[k][3] is not None for k in group):
                    group.sort(key=lambda k: (self.ids[k][3], _id_key(self.ids[k][0])))
                else:
                    group.sort(key=lambda k: _id_key(self.ids[k][0]))
                out.extend(group)
            ordered[image_id] = out
        return ordered


def _worker_init() -> None:
    """A measuring worker process uses one core: `threads` workers, `threads` cores
    (OpenCV would otherwise start a thread per core in each worker). 0 runs OpenCV's
    functions sequentially; 1 would set up its thread pool anew, which hangs in a
    forked process."""
    cv2.setNumThreads(0)


def _measure_task(task) -> list[float]:
    path, image, ann = task
    return _measure_annotation(path, image, ann)


def _measure_stream(path: Path, images: dict, categories: dict, threads: int) -> _Measured:
    """Second pass: stream the annotations, check each, measure its mask (in `threads`
    worker processes when more than one, each with one OpenCV thread) and keep only its
    ids and measures. The file is never loaded whole: the first pass
    (`sam2pal.io.coco.scan_coco`) keeps its images and categories, this one each
    annotation's ids and measures, so 100,000 images x 5 structures take a few hundred
    MB (benchmarks/merge_measure.py)."""
    measured = _Measured()

    def tasks():
        for ann in stream_annotations(path, images, categories):
            image = images[ann["image_id"]]
            yield (
                path,
                {k: image[k] for k in ("id", "file_name", "height", "width")},
                {
                    "id": ann["id"],
                    "image_id": ann["image_id"],
                    "category_id": ann["category_id"],
                    "instance": ann.get("instance"),
                    "segmentation": ann["segmentation"],
                },
            )

    with contextlib.ExitStack() as stack:
        pool = None
        if threads > 1:
            import multiprocessing

            # fork where there is one: "spawn" would rerun the main script of a Snakemake
            # job in each worker. Nothing here has started threads or used OpenCV yet.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(
                ProcessPoolExecutor(
                    max_workers=threads,
                    mp_context=multiprocessing.get_context(method),
                    initializer=_worker_init,
                )
            )
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        bar = progress(total=None, desc="measure", unit="mask")
        for batch in _batches(tasks(), 256 * threads):
            if pool is not None:
                results = pool.map(_measure_task, batch, chunksize=32)
            else:
                results = map(_measure_task, batch)
            for (_, _, ann), values in zip(batch, results):
                measured.add(ann, values)
            bar.update(len(batch))
        bar.close()
    return measured


def _fmt(value) -> str:
    """A table cell: integers and strings as they are, floats with 10 significant
    digits, NaN / missing as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, str):
        return value
    value = float(value)
    if not math.isfinite(value):
        return ""
    return repr(float(f"{value:.10g}"))


def _mm_values(measures: dict, scale: float | None) -> list[float]:
    if scale is None:
        return [math.nan] * len(MM_COLUMNS)
    return [measures[src] / scale**power for src, power in _MM_SOURCE.values()]


def _scale_lookup(px_per_mm, calibration_csv) -> _ScaleLookup | None:
    """The scale of each image (see `measure_coco`), None without any scale."""
    default_scale = None if px_per_mm is None else _positive_scale(px_per_mm)
    calibration = read_calibration(calibration_csv) if calibration_csv is not None else None
    if default_scale is None and calibration is None:
        return None
    return _ScaleLookup(calibration, default_scale)


def _image_rows(image: dict, measured: _Measured, order: dict, scale_of) -> tuple:
    """An image's scale (None without one) and its table rows, in table order:
    (annotation index, annotation id, category id, values)."""
    scale = scale_of(image["file_name"]) if scale_of is not None else None
    rows = []
    for index in order.get(image["id"], ()):
        ann_id, _, cat_id, _ = measured.ids[index]
        values = measured.row(index)
        if scale_of is not None:
            values = values + _mm_values(dict(zip(MASK_MEASURES, values)), scale)
        rows.append((index, ann_id, cat_id, values))
    return scale, rows


def _write_long(
    handle, images: list, rows_of, categories: dict, frame_columns: list, calibrated: bool
) -> tuple[int, int]:
    """The long table, image by image; returns (rows written, images without a scale).

    One row per annotation, sorted by file_name, then category id, then instance (the
    annotation's ``instance`` rank, else the order of the annotation ids), with the
    columns `MEASURE_COLUMNS` (for video frames, images with `frame_index`, followed by
    ``frame_index, time_s`` after ``image_id``). Cells: floats with 10 significant
    digits, empty for NaN.
    """
    columns = MEASURE_COLUMNS + (MM_COLUMNS if calibrated else [])
    writer = csv.writer(handle)
    writer.writerow(columns[:2] + frame_columns + columns[2:])
    n_annotations = without_scale = 0
    for image in images:
        scale, rows = rows_of(image)
        if calibrated and scale is None:
            without_scale += 1
        for _, ann_id, cat_id, values in rows:
            writer.writerow(
                [_fmt(image["file_name"]), _fmt(image["id"])]
                + [_fmt(image.get(c)) for c in frame_columns]
                + [_fmt(ann_id), categories[cat_id]]
                + [_fmt(v) for v in values]
            )
            n_annotations += 1
    return n_annotations, without_scale


def measure_coco(
    coco_path: str | os.PathLike,
    out_csv: str | os.PathLike,
    px_per_mm: float | None = None,
    calibration_csv: str | os.PathLike | None = None,
    wide_csv: str | os.PathLike | None = None,
    threads: int = 1,
) -> dict:
    """Measure every predicted mask of a COCO predictions file and write the tables.

    The long table has a row per annotation (`_write_long`), the wide table a row per
    image (`_write_wide`). With a scale, the columns `MM_COLUMNS` are appended (area /
    px_per_mm^2, lengths / px_per_mm); images without one get empty cells. The file is
    streamed (`_measure_stream`); both tables are written atomically.

    Args:
        coco_path: the COCO predictions file.
        out_csv: the long table.
        px_per_mm: pixels per millimetre of every image.
        calibration_csv: ``file_name,px_per_mm`` per image, winning over `px_per_mm`;
            a row matches an image by file_name, else by bare name (without folders)
            when that name is unique in the calibration file.
        wide_csv: the wide table, if wanted.
        threads: processes that decode and measure the masks.

    Returns:
        {"n_images", "n_annotations", "calibrated", "images_without_scale"}. Raises
        InputError (one line naming the file) on a bad COCO or calibration file or a
        bad px_per_mm or threads.
    """
    coco_path = Path(coco_path)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    scale_of = _scale_lookup(px_per_mm, calibration_csv)
    calibrated = scale_of is not None
    images_by_id, categories = _read_header(coco_path, wide_csv is not None)
    images = sorted(images_by_id.values(), key=lambda im: (im["file_name"], _id_key(im["id"])))
    # video frames (predictions of a video collection) also get their index and time
    frame_columns = FRAME_COLUMNS if any("frame_index" in image for image in images) else []
    measured = _measure_stream(coco_path, images_by_id, categories, threads)
    order = measured.by_image()
    # the wide table's column set (k) of each annotation, checked before writing anything
    slot, most = ({}, {})
    if wide_csv is not None:
        slot, most = _wide_slots(coco_path, measured, order, images_by_id, categories)
    rows_of = functools.partial(_image_rows, measured=measured, order=order, scale_of=scale_of)
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(atomic_write(out_csv, "w", newline=""))
        counts = _write_long(handle, images, rows_of, categories, frame_columns, calibrated)
        if wide_csv is not None:
            handle = stack.enter_context(atomic_write(wide_csv, "w", newline=""))
            cells = _wide_cells(images, rows_of, slot)
            measures = MASK_MEASURES + (MM_COLUMNS if calibrated else [])
            _write_wide(handle, cells, categories, measures, frame_columns, most=most)
    return {
        "n_images": len(images),
        "n_annotations": counts[0],
        "calibrated": calibrated,
        "images_without_scale": counts[1],
    }


def _wide_cells(images: list, rows_of, slot: dict):
    """(image, {(category id, k): values}) of each image, for the wide table."""
    for image in images:
        yield image, {(c, slot[i]): v for i, _, c, v in rows_of(image)[1] if i in slot}


def _wide_slots(path: Path, measured: _Measured, order: dict, images: dict, categories: dict):
    """The wide table's column set of each annotation: ({annotation index: k},
    {category id: the largest k}).

    k is the annotation's ``instance`` number, so instance 2 stays in the instance-2
    columns on an image where instance 1 was not found. Where none of the annotations
    of a category on an image carries ``instance`` (a file from elsewhere), they are
    numbered 1, 2, ... in annotation id order. InputError when, on one image, a category
    mixes annotations with and without ``instance``, or holds two annotations of the
    same instance (each would need the same cells).
    """
    slot: dict = {}
    most: dict = {}
    for image_id, indices in order.items():
        by_category: dict = {}
        for index in indices:  # by category, then instance or annotation id
            by_category.setdefault(measured.ids[index][2], []).append(index)
        for cat_id, group in by_category.items():
            name = images[image_id]["file_name"]
            with_instance = [measured.ids[i][0] for i in group if measured.ids[i][3] is not None]
            without = [measured.ids[i][0] for i in group if measured.ids[i][3] is None]
            if with_instance and without:
                raise InputError(
                    f"{path}: image {name}: annotation {with_instance[0]!r} of "
                    f"{categories[cat_id]!r} has an 'instance' and annotation {without[0]!r} "
                    "has none; give it to all annotations of the category on the image, or to none"
                )
            taken: dict = {}  # k: annotation id
            for rank, index in enumerate(group, start=1):
                ann_id, _, _, instance = measured.ids[index]
                k = rank if instance is None else instance
                if k in taken:
                    raise InputError(
                        f"{path}: image {name}: annotations {taken[k]!r} and {ann_id!r} are "
                        f"both instance {k} of {categories[cat_id]!r}; the wide table has one "
                        "set of columns per instance"
                    )
                taken[k] = ann_id
                slot[index] = k
                most[cat_id] = max(most.get(cat_id, 0), k)
    return slot, most


def _write_wide(
    handle, wide_rows, categories: dict, measures: list[str], frame_columns=(), most=None
) -> None:
    """The wide table from (image, {(category id, k): values}) rows, streamed;
    `most`: {category id: the largest k} (see `_wide_slots`).

    One row per image, sorted by file_name, with ``file_name, image_id`` (and
    ``frame_index, time_s`` for video frames) and then, for each category in id order
    and each measure, a column ``{category}_{measure}``; for a category with several
    instances, the columns ``{category}_{k}_{measure}`` for k = 1 .. its largest
    instance number in the file. Missing structures leave empty cells; categories
    without any prediction keep their (empty) columns, so tables from different runs
    line up.
    """
    most = {cat_id: (most or {}).get(cat_id, 0) for cat_id in categories}
    header = ["file_name", "image_id", *frame_columns]
    slots = []  # (category id, k) in column order
    for cat_id, name in categories.items():
        if most[cat_id] <= 1:
            header += [f"{name}_{m}" for m in measures]
            slots.append((cat_id, 1))
        else:
            for k in range(1, most[cat_id] + 1):
                header += [f"{name}_{k}_{m}" for m in measures]
                slots.append((cat_id, k))
    writer = csv.writer(handle)
    writer.writerow(header)
    empty = [""] * len(measures)
    for image, cells in wide_rows:
        row = [_fmt(image["file_name"]), _fmt(image["id"])] + [
            _fmt(image.get(c)) for c in frame_columns
        ]
        for slot in slots:
            values = cells.get(slot)
            row += empty if values is None else [_fmt(v) for v in values]
        writer.writerow(row)
