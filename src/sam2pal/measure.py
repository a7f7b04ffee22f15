"""Morphometric measurements of predicted masks, and the measurement tables.

`measure_mask` turns one binary mask into a handful of size and shape measures, all in
pixels (see its docstring for what each one is). `measure_coco` reads a COCO predictions
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
import math
import os
from array import array
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import ijson
import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial.distance import pdist
from skimage import measure as skmeasure
from skimage.morphology import skeletonize

from sam2pal.atomic import atomic_write
from sam2pal.errors import InputError
from sam2pal.masks import decode_segmentation
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


def measure_mask(mask: np.ndarray) -> dict:
    """Size and shape measures of one binary mask, in pixels.

    The whole mask is treated as one structure, even when it is made of several
    separate pieces (connected components): area, perimeter, Feret diameters, the
    ellipse axes, eccentricity and solidity use all its pixels. The curve length alone
    is measured on the largest piece (8-connected), because a centre line only makes
    sense for one piece.

    Returns a dict of floats with the keys of `MASK_MEASURES`:

    * ``area_px``: number of pixels.
    * ``perimeter_px``: scikit-image's ``measure.perimeter`` (4-neighbourhood, the
      estimator `regionprops` also uses): boundary pixels weighted by their local
      configuration, i.e. a contour through the centres of the boundary pixels. It is
      therefore a little shorter than the outline of the pixel squares (a 10 x 10 square
      gives 36, not 40) and 0 for a single pixel. Holes add their own boundary.
    * ``feret_max_px`` / ``feret_min_px``: largest and smallest caliper (Feret)
      diameter: the widest and narrowest extent of the structure over all directions.
      Measured on the convex hull of the pixel squares (pixel corners), so a w x h
      pixel rectangle gives exactly sqrt(w^2 + h^2) and min(w, h).
    * ``major_axis_px`` / ``minor_axis_px`` / ``eccentricity``: the axes of the ellipse
      with the same second moments as the pixels (``regionprops`` axis_major_length,
      axis_minor_length, eccentricity: 0 for a disc, towards 1 for elongated shapes).
    * ``solidity``: pixel count over the pixel count of the convex hull (``regionprops``);
      1 for convex shapes, lower for concave or fragmented ones.
    * ``curve_length_px``: the length of the structure along its midline, the length to
      use for curved thin parts (antennae, legs). Measured on the largest piece, in one
      of two ways:

      - A *band*, a piece at least about four times as long as it is wide at its widest
        (area >= 4 x the square of the diameter of the largest disc inside it), is
        measured along its centre line: the longest path through its skeleton, its two
        ends cut back (there the skeleton forks into the corners) and smoothed (to
        remove the pixel staircase), then prolonged straight at both ends to the
        outline, so a stroke with flat ends measures end to end. A centre line within
        1 % of the distance between its two ends is straight and measures that
        distance. Only a centre line that bends (an arched antenna, a leg with its
        knee, two antennae touching at their bases) measures longer than the maximum
        Feret diameter, as it must.
      - A *compact* piece (head, pronotum, elytra, a blob, a short stub), whose
        skeleton branches into every corner and bump and is no midline, is measured
        along its long axis: its extent (caliper width) along the major axis of its
        ellipse. That is never more than the maximum Feret diameter: a rectangle gives
        its long side, a disc its diameter, an ellipse its major axis.

      For a straight piece both give its length; they differ only for a short, thick,
      bent piece, which is measured along its long axis. A single pixel measures 1, a
      one-pixel line its number of pixels (times sqrt 2 on the diagonal).

    An empty mask gives area 0 and NaN for every other measure.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    mask = mask.astype(bool, copy=False)
    out = {key: math.nan for key in MASK_MEASURES}
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        out["area_px"] = 0.0
        return out
    cols = np.flatnonzero(mask.any(axis=0))
    # all measures are translation invariant: work on the bounding box, with a 1 px
    # background margin so that the image edge reads as the structure's outline
    crop = np.pad(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], 1)

    out["area_px"] = float(np.count_nonzero(crop))
    out["perimeter_px"] = float(skmeasure.perimeter(crop, neighborhood=4))
    out["feret_max_px"], out["feret_min_px"] = feret_diameters(crop)
    props = skmeasure.regionprops(crop.astype(np.uint8))[0]
    out["major_axis_px"] = float(props.axis_major_length)
    out["minor_axis_px"] = float(props.axis_minor_length)
    out["eccentricity"] = float(props.eccentricity)
    out["solidity"] = float(props.solidity)
    out["curve_length_px"] = curve_length(crop)
    return out


def _pixel_hull(mask: np.ndarray) -> np.ndarray:
    """Vertices (x, y) of the convex hull of the pixel squares of a non-empty bool mask
    (pixel (r, c) is the square [c, c+1] x [r, r+1])."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    # the hull of the pixel squares is the hull of the boundary pixel centres, grown by
    # the square: its corners are among the corners of the hull's pixels
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    centres = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float32)
    hull = cv2.convexHull(centres).reshape(-1, 2)
    corners = (hull[:, None, :] + np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32))
    return cv2.convexHull(corners.reshape(-1, 2)).reshape(-1, 2).astype(np.float64)


def feret_diameters(mask: np.ndarray) -> tuple[float, float]:
    """(max, min) caliper diameters of the pixel squares of a non-empty bool mask."""
    hull = _pixel_hull(mask)
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


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _skeleton_graph(skeleton: np.ndarray):
    """Sparse 8-connected graph of skeleton pixels (weights 1 and sqrt 2)."""
    coords = np.argwhere(skeleton)
    index = np.full(skeleton.shape, -1, dtype=np.int64)
    index[coords[:, 0], coords[:, 1]] = np.arange(len(coords))
    padded = np.pad(index, 1, constant_values=-1)
    src, dst, wts = [], [], []
    for dr, dc, w in ((0, 1, 1.0), (1, 0, 1.0), (1, 1, math.sqrt(2)), (1, -1, math.sqrt(2))):
        nbr = padded[coords[:, 0] + 1 + dr, coords[:, 1] + 1 + dc]
        ok = nbr >= 0
        src.append(np.flatnonzero(ok))
        dst.append(nbr[ok])
        wts.append(np.full(ok.sum(), w))
    src, dst, wts = np.concatenate(src), np.concatenate(dst), np.concatenate(wts)
    n = len(coords)
    graph = sparse.coo_matrix((wts, (src, dst)), shape=(n, n)).tocsr()
    return coords, graph


def _longest_path(graph) -> np.ndarray:
    """Node indices of a longest shortest path (repeated farthest-node sweeps)."""
    start, best = 0, -1.0
    for _ in range(4):
        dist, pred = csgraph.dijkstra(graph, directed=False, indices=start,
                                      return_predecessors=True)
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


def _principal_axis(comp: np.ndarray) -> np.ndarray:
    """Unit vector (row, col) of the long axis of the second-moment ellipse of a mask's
    pixels (along the columns when the pixels have no long axis, e.g. a square)."""
    coords = np.argwhere(comp).astype(np.float64)
    if len(coords) < 2:
        return np.array([0.0, 1.0])
    cov = np.cov(coords, rowvar=False)
    values, vectors = np.linalg.eigh(cov)
    if values[1] - values[0] <= 1e-9 * max(values[1], 1e-12):
        return np.array([0.0, 1.0])
    return vectors[:, 1]


def curve_length(mask: np.ndarray) -> float:
    """Midline length of the largest 8-connected piece of a bool mask (see
    `measure_mask`): the centre-line length of a band (`_band_length`), else the extent
    along the long axis of a compact piece (`_axis_extent`)."""
    comp = _largest_component(np.asarray(mask, bool))
    if not comp.any():
        return math.nan
    comp = np.pad(comp, 1)
    hull = _pixel_hull(comp)
    feret_max = float(pdist(hull).max())
    dt = ndi.distance_transform_edt(comp)
    # the largest width: the diameter of the largest disc of pixel squares inside
    width = 2.0 * float(dt.max()) - 1.0
    if np.count_nonzero(comp) < _BAND * width**2:
        return _axis_extent(comp, hull, feret_max)
    coords, graph = _skeleton_graph(skeletonize(comp))
    path = coords[_longest_path(graph)].astype(np.float64)
    # local half width: distance from the skeleton pixel's centre to the outline
    half_width = dt[path[:, 0].astype(int), path[:, 1].astype(int)] - 0.5
    return _band_length(comp, path, half_width, feret_max)


def _axis_extent(comp: np.ndarray, hull: np.ndarray, feret_max: float) -> float:
    """Extent of the pixel squares along the long axis (their caliper width in that
    direction): at most the largest Feret diameter, which is the largest caliper width
    over all directions (min() only absorbs rounding)."""
    axis = _principal_axis(comp)
    # hull vertices are (x, y) = (col, row)
    along = hull[:, 1] * axis[0] + hull[:, 0] * axis[1]
    return min(float(along.max() - along.min()), feret_max)


def _band_length(comp: np.ndarray, path: np.ndarray, half_width: np.ndarray,
                 feret_max: float) -> float:
    """Centre-line length of a band: the skeleton path with its ends cut back, smoothed,
    and prolonged straight to the outline at both ends."""
    # the skeleton forks towards the corners of flat ends: trim each end back by about
    # the local width, the prolongation below restores the length along the midline
    path = _trim_ends(path, half_width)
    smooth = _smooth_path(path)
    steps = np.diff(smooth, axis=0)
    inner = float(np.hypot(steps[:, 0], steps[:, 1]).sum())
    if inner < 2.0:
        # (nearly) a point: the centre line is the chord along the long axis through the
        # path's middle pixel
        centre, axis = path[len(path) // 2], _principal_axis(comp)
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


def _trim_ends(path: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """Drop the path's end pieces, which wander into the corners of the outline.

    Near an end, the skeleton is no midline: at a flat end it forks towards the two
    corners, and it may hug the outline. Each end loses a piece of `_TRIM` times the
    typical (median) half width of the structure, never more than a third of the path;
    the prolongation to the outline restores the length along the midline.
    """
    if len(path) < 3:
        return path
    steps = np.hypot(*np.diff(path, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    total = arc[-1]
    cut = min(_TRIM * float(np.median(half_width)), total / 3.0)
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
        raise InputError(f"{prefix}px_per_mm must be a positive number (pixels per "
                         f"millimetre), got {value!r}")
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
        handle = open(path, newline="", encoding="utf-8-sig")  # tolerate Excel's BOM
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
                raise InputError(f"{path}: empty calibration file, expected the columns "
                                 "file_name,px_per_mm")
            reader.fieldnames = header
            missing = [col for col in ("file_name", "px_per_mm") if col not in header]
            if missing:
                raise InputError(f"{path}: missing column(s) {', '.join(missing)} "
                                 f"(expected file_name,px_per_mm; found {','.join(header)})")
            for row in reader:
                line = reader.line_num
                if all((value or "").strip() == "" for value in row.values()
                       if isinstance(value, str)):
                    continue
                name = (row.get("file_name") or "").strip()
                raw = (row.get("px_per_mm") or "").strip()
                if not name:
                    raise InputError(f"{path}, line {line}: empty file_name")
                scale = _positive_scale(raw, f"{path}, line {line}")
                if name in scales:
                    raise InputError(f"{path}, line {line}: file_name {name!r} is listed "
                                     f"twice (first on line {first_line[name]})")
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


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _check_id(value, what: str, path: Path):
    if not _is_id(value):
        raise InputError(f"{path}: {what} id {value!r} is neither an integer nor a string")
    return value


def _json_error(path: Path, err) -> InputError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return InputError(f"{path}: not valid JSON ({first})")


@contextlib.contextmanager
def _coco_events(path: Path, prefix: str | None = None):
    """The JSON events of a COCO file (or the items under `prefix`), as a stream, with
    read and parse errors turned into one-line InputErrors naming the file."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: COCO file not found") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the COCO file ({err.strerror})") from None
    try:
        with handle:
            if prefix is None:
                yield ijson.parse(handle, use_float=True)
            else:
                yield ijson.items(handle, prefix, use_float=True)
    except ijson.JSONError as err:
        raise _json_error(path, err) from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text (JSON) file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the COCO file ({err.strerror})") from None


def _scan_coco(path: Path) -> tuple[list, list]:
    """First pass over a COCO file: check its top level, and return its images and
    categories (the annotations are streamed by a second pass)."""
    kinds: dict = {}
    lists: dict = {"images": [], "categories": []}
    builder = item_of = key = None
    expect_value = False
    with _coco_events(path) as events:
        first = next(events, None)
        if first is None:
            raise InputError(f"{path}: not valid JSON (the file is empty)")
        if first[1] != "start_map":
            for _ in events:  # a broken file is "not valid JSON" before "not an object"
                pass
            raise InputError(f"{path}: a COCO file must hold a JSON object")
        for prefix, event, value in events:
            if builder is not None:
                builder.event(event, value)
                if prefix == item_of and event in ("end_map", "end_array"):
                    lists[item_of[:-5]].append(builder.value)
                    builder = None
                continue
            if expect_value:
                kinds[key] = event
                expect_value = False
            if prefix == "" and event == "map_key":
                key, expect_value = value, True
            elif prefix in ("images.item", "categories.item") and kinds.get(prefix[:-5]) == "start_array":
                if event in ("start_map", "start_array"):
                    builder, item_of = ijson.ObjectBuilder(), prefix
                    builder.event(event, value)
                else:
                    lists[prefix[:-5]].append(value)
    for key in ("images", "annotations", "categories"):
        if key not in kinds:
            raise InputError(f"{path}: missing the '{key}' list")
        if kinds[key] != "start_array":
            raise InputError(f"{path}: '{key}' must be a list")
    return lists["images"], lists["categories"]


def _check_images(path: Path, raw: list) -> dict:
    images: dict = {}
    for i, image in enumerate(raw):
        if not isinstance(image, dict):
            raise InputError(f"{path}: images[{i}] is not an object")
        for key in ("id", "file_name", "width", "height"):
            if key not in image:
                raise InputError(f"{path}: images[{i}] lacks '{key}'")
        image_id = _check_id(image["id"], f"images[{i}]:", path)
        if image_id in images:
            raise InputError(f"{path}: image id {image_id!r} appears twice")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise InputError(f"{path}: image {image_id!r} has no file_name")
        for key in ("width", "height"):
            value = image[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{path}: image {image_id!r} ({image['file_name']}) has "
                                 f"{key} {value!r}, expected a positive integer")
        images[image_id] = image
    return images


def _check_categories(path: Path, raw: list) -> dict:
    categories: dict = {}
    for i, cat in enumerate(raw):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise InputError(f"{path}: categories[{i}] needs an 'id' and a 'name'")
        cat_id = _check_id(cat["id"], f"categories[{i}]:", path)
        if cat_id in categories:
            raise InputError(f"{path}: category id {cat_id!r} appears twice")
        if not isinstance(cat["name"], str) or not cat["name"]:
            raise InputError(f"{path}: category {cat_id!r} has no name")
        categories[cat_id] = cat["name"]
    return dict(sorted(categories.items(), key=lambda kv: _id_key(kv[0])))


def _check_annotation(path: Path, i: int, ann, images: dict, categories: dict, seen: set) -> None:
    if not isinstance(ann, dict):
        raise InputError(f"{path}: annotations[{i}] is not an object")
    for key in ("id", "image_id", "category_id", "segmentation"):
        if key not in ann:
            label = f"annotation {ann['id']!r}" if "id" in ann else f"annotations[{i}]"
            raise InputError(f"{path}: {label} lacks '{key}'")
    ann_id = _check_id(ann["id"], f"annotations[{i}]:", path)
    if ann_id in seen:
        raise InputError(f"{path}: annotation id {ann_id!r} appears twice")
    seen.add(ann_id)
    if not _is_id(ann["image_id"]) or ann["image_id"] not in images:
        raise InputError(f"{path}: annotation {ann_id!r} refers to image_id "
                         f"{ann['image_id']!r}, which is not among the images")
    if not _is_id(ann["category_id"]) or ann["category_id"] not in categories:
        raise InputError(f"{path}: annotation {ann_id!r} refers to category_id "
                         f"{ann['category_id']!r}, which is not among the categories")
    instance = ann.get("instance")
    if instance is not None and (isinstance(instance, bool) or not isinstance(instance, int) or instance < 1):
        raise InputError(f"{path}: annotation {ann_id!r} has instance {instance!r}, "
                         "expected a positive integer")


def _measure_annotation(path: Path, image: dict, ann: dict) -> list[float]:
    """The `MASK_MEASURES` of one annotation's mask."""
    try:
        mask = decode_segmentation(ann["segmentation"], image["height"], image["width"])
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"{path}: annotation {ann['id']!r} (image {image['file_name']}): "
                         f"unreadable segmentation ({err})") from None
    values = measure_mask(mask)
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
        return list(self.values[index * n:(index + 1) * n])

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


def _measure_task(task) -> list[float]:
    path, image, ann = task
    return _measure_annotation(path, image, ann)


def _measure_stream(path: Path, images: dict, categories: dict, threads: int) -> _Measured:
    """Second pass: stream the annotations, check each, measure its mask (in `threads`
    worker processes when more than one: the measures are Python-bound) and keep only
    its ids and measures."""
    measured = _Measured()
    seen: set = set()

    def tasks():
        with _coco_events(path, "annotations.item") as annotations:
            for i, ann in enumerate(annotations):
                _check_annotation(path, i, ann, images, categories, seen)
                image = images[ann["image_id"]]
                yield path, {k: image[k] for k in ("file_name", "height", "width")}, \
                    {"id": ann["id"], "image_id": ann["image_id"], "category_id": ann["category_id"],
                     "instance": ann.get("instance"), "segmentation": ann["segmentation"]}

    with contextlib.ExitStack() as stack:
        pool = None
        if threads > 1:
            import multiprocessing

            # fork where there is one: "spawn" would rerun the main script of a Snakemake
            # job in each worker. Nothing here has started threads or used OpenCV yet.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=threads,
                                                           mp_context=multiprocessing.get_context(method)))
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


def measure_coco(
    coco_path: str | os.PathLike,
    out_csv: str | os.PathLike,
    px_per_mm: float | None = None,
    calibration_csv: str | os.PathLike | None = None,
    wide_csv: str | os.PathLike | None = None,
    threads: int = 1,
) -> dict:
    """Measure every predicted mask of a COCO predictions file and write the tables.

    Long table (`out_csv`): one row per annotation, sorted by file_name, then category
    id, then instance (the annotation's ``instance`` rank, else the order of the
    annotation ids), with the columns `MEASURE_COLUMNS`. For the frames of a video
    (images that carry `frame_index`), ``frame_index, time_s`` follow ``image_id`` in
    both tables.

    Scale: `px_per_mm` (pixels per millimetre) applies to every image;
    `calibration_csv` (columns ``file_name,px_per_mm``) gives one per image and wins
    over `px_per_mm`. A calibration row matches an image by its file_name, or else by
    the bare file name (without folders) when that name is unique in the calibration
    file. With either option, the columns `MM_COLUMNS` are appended (area / px_per_mm^2,
    lengths / px_per_mm); images without a scale get empty millimetre cells.

    Wide table (`wide_csv`, optional): one row per image, sorted by file_name, with
    ``file_name, image_id`` and then, for each category in id order and each measure,
    a column ``{category}_{measure}``; for a category with several instances, the
    columns ``{category}_{k}_{measure}`` for k = 1 .. its largest instance number in the
    file. k is the annotation's ``instance`` (the project writes the instance number of
    the templates), so on an image where only the second antenna was found, its values
    are in the ``antenna_2_`` columns and the ``antenna_1_`` ones are empty.
    Annotations without ``instance`` (a file from elsewhere) are numbered on each image
    1, 2, ... per category, in annotation id order. Missing structures leave empty
    cells. Categories without any prediction keep their (empty) columns, so tables from
    different runs line up. Two annotations of the same category and instance on one
    image, or annotations of a category with and without ``instance`` on one image,
    are an InputError (only when the wide table is asked for).

    The file is streamed, never loaded whole: a first pass reads its images and
    categories, a second its annotations one at a time, decoding and measuring each
    mask (in `threads` processes) and keeping only its ids and measures; the tables are
    then written image by image. So a collection of 100,000 images x 5 structures is
    measured in a few hundred MB of memory (benchmarks/merge_measure.py). Both tables
    are written atomically: on any error neither is left half-written. Cells: floats
    with 10 significant digits, empty for NaN.

    Returns {"n_images", "n_annotations", "calibrated", "images_without_scale"}.
    Raises InputError (one line naming the file) on a bad COCO or calibration file
    or a bad px_per_mm.
    """
    coco_path = Path(coco_path)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    default_scale = None if px_per_mm is None else _positive_scale(px_per_mm)
    calibration = read_calibration(calibration_csv) if calibration_csv is not None else None
    calibrated = default_scale is not None or calibration is not None
    scale_of = _ScaleLookup(calibration, default_scale)

    raw_images, raw_categories = _scan_coco(coco_path)
    images_by_id = _check_images(coco_path, raw_images)
    categories = _check_categories(coco_path, raw_categories)
    del raw_images, raw_categories
    images = sorted(images_by_id.values(), key=lambda im: (im["file_name"], _id_key(im["id"])))

    names = list(categories.values())
    if wide_csv is not None and len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise InputError(f"{coco_path}: several categories are named {dup!r}; the wide "
                         "table needs distinct category names")

    measures = MASK_MEASURES + (MM_COLUMNS if calibrated else [])
    columns = MEASURE_COLUMNS + (MM_COLUMNS if calibrated else [])
    # video frames (predictions of a video collection) also get their index and time
    frame_columns = FRAME_COLUMNS if any("frame_index" in image for image in images) else []
    columns = columns[:2] + frame_columns + columns[2:]

    measured = _measure_stream(coco_path, images_by_id, categories, threads)
    order = measured.by_image()
    # the wide table's column set (k) of each annotation, checked before writing anything
    slot, most = _wide_slots(coco_path, measured, order, images_by_id, categories) \
        if wide_csv is not None else ({}, {})
    n_annotations = 0
    without_scale = 0

    def image_cells(image):
        """{(category id, k): row values} of an image, and its long-table rows."""
        scale = scale_of(image["file_name"]) if calibrated else None
        cells, rows = {}, []
        for index in order.get(image["id"], ()):
            ann_id, _, cat_id, _ = measured.ids[index]
            values = measured.row(index)
            row_values = values + (_mm_values(dict(zip(MASK_MEASURES, values)), scale) if calibrated else [])
            rows.append((ann_id, cat_id, row_values))
            if index in slot:
                cells[(cat_id, slot[index])] = row_values
        return scale, cells, rows

    with contextlib.ExitStack() as stack:
        long_handle = stack.enter_context(atomic_write(out_csv, "w", newline=""))
        writer = csv.writer(long_handle)
        writer.writerow(columns)
        for image in images:
            scale, _, rows = image_cells(image)
            if calibrated and scale is None:
                without_scale += 1
            for ann_id, cat_id, row_values in rows:
                writer.writerow(
                    [_fmt(image["file_name"]), _fmt(image["id"])]
                    + [_fmt(image.get(c)) for c in frame_columns]
                    + [_fmt(ann_id), categories[cat_id]] + [_fmt(v) for v in row_values]
                )
                n_annotations += 1
        if wide_csv is not None:
            wide_handle = stack.enter_context(atomic_write(wide_csv, "w", newline=""))
            _write_wide(wide_handle, ((image, image_cells(image)[1]) for image in images),
                        categories, measures, frame_columns, most=most)

    return {
        "n_images": len(images),
        "n_annotations": n_annotations,
        "calibrated": calibrated,
        "images_without_scale": without_scale,
    }


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
                    "has none; give it to all annotations of the category on the image, or to none")
            taken: dict = {}  # k: annotation id
            for rank, index in enumerate(group, start=1):
                ann_id, _, _, instance = measured.ids[index]
                k = rank if instance is None else instance
                if k in taken:
                    raise InputError(
                        f"{path}: image {name}: annotations {taken[k]!r} and {ann_id!r} are "
                        f"both instance {k} of {categories[cat_id]!r}; the wide table has one "
                        "set of columns per instance")
                taken[k] = ann_id
                slot[index] = k
                most[cat_id] = max(most.get(cat_id, 0), k)
    return slot, most


def _write_wide(handle, wide_rows, categories: dict, measures: list[str], frame_columns=(), most=None) -> None:
    """The wide table from (image, {(category id, k): values}) rows, streamed;
    `most`: {category id: the largest k}."""
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
        row = [_fmt(image["file_name"]), _fmt(image["id"])] + [_fmt(image.get(c)) for c in frame_columns]
        for slot in slots:
            values = cells.get(slot)
            row += empty if values is None else [_fmt(v) for v in values]
        writer.writerow(row)
