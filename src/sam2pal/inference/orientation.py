"""Orientation candidates and mirror pairs for the orientation search.

A target photo may show the specimen turned or mirrored relative to the templates. The
search (`propagate.orientation`) tracks each target from the template memories of every
candidate orientation and keeps the most confident one. A `Candidate` says how the photo
relates to the template: the photo shows the template's orientation turned `rotation`
degrees clockwise (0, 90, 180, 270), after a left-right mirror when `mirrored` is true.
`transform_image` and `transform_masks` apply a candidate to a template (mirror first,
then turn clockwise), so that the transformed template looks like such a photo.

A mirrored match of a lateral view shows the other side of the specimen, so paired
structures (left and right antenna) swap names (`propagate.mirror_swap`); `mirror_map`
says which structure is whose partner: by name (`mirror_partner`: ``left_x``/``right_x``,
``x_left``/``x_right``, ``l_x``/``r_x``, ``left antenna``/``right antenna``), by the
config's `mirror_pairs`, and, for several instances of one category, by side in the
template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sam2pal.settings import ORIENTATIONS  # the modes, one list for the settings and the engine

ROTATIONS = (0, 90, 180, 270)


@dataclass(frozen=True)
class Candidate:
    """The photo shows the template turned `rotation` degrees clockwise (0, 90, 180, 270),
    after a left-right mirror when `mirrored` is true."""

    rotation: int = 0
    mirrored: bool = False


def candidates(mode: str) -> list[Candidate]:
    """The candidate orientations of a search mode, the upright one first.

    Args:
        mode: "none" (upright only), "rot4" (the four rotations) or "rot4_mirror" (the
            four rotations, then the four rotations of the mirror image).

    Raises:
        ValueError: for another mode.
    """
    if mode not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {mode!r}")
    if mode == "none":
        return [Candidate(0, False)]
    mirrors = (False, True) if mode == "rot4_mirror" else (False,)
    return [Candidate(r, m) for m in mirrors for r in ROTATIONS]


def _check(candidate: Candidate) -> int:
    if candidate.rotation not in ROTATIONS:
        raise ValueError(
            f"a candidate's rotation must be one of 0, 90, 180, 270, got {candidate.rotation!r}"
        )
    return candidate.rotation // 90


def transform_image(array: np.ndarray, candidate: Candidate) -> np.ndarray:
    """An (H, W, ...) array as the candidate shows it: mirrored left-right if the candidate
    is mirrored, then turned clockwise by its rotation; a contiguous copy."""
    turns = _check(candidate)
    array = np.asarray(array)
    if array.ndim < 2:
        raise ValueError(f"transform_image needs an (H, W, ...) array, got shape {array.shape}")
    if candidate.mirrored:
        array = np.fliplr(array)
    return np.array(np.rot90(array, k=-turns, axes=(0, 1)), order="C", copy=True)


def transform_masks(masks: np.ndarray, candidate: Candidate) -> np.ndarray:
    """(B, H, W) masks as the candidate shows them (each as `transform_image` does)."""
    turns = _check(candidate)
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"transform_masks needs (B, H, W) masks, got shape {masks.shape}")
    if candidate.mirrored:
        masks = masks[:, :, ::-1]
    return np.array(np.rot90(masks, k=-turns, axes=(1, 2)), order="C", copy=True)


_SIDE_WORD = re.compile(r"(?i)(?<![a-z])(left|right)(?![a-z])")
_SIDE_PREFIX = re.compile(r"^([lLrR])([_\- .])(?=\S)")
_SIDE_SUFFIX = re.compile(r"(?<=\S)([_\- .])([lLrR])$")


def _same_case(word: str, like: str) -> str:
    if like.isupper():
        return word.upper()
    if like[0].isupper():
        return word.capitalize()
    return word


def mirror_partner(name: str) -> str | None:
    """The name of the other side's structure, or None when the name names no side.

    ``left_antenna`` <-> ``right_antenna``, ``antenna_left`` <-> ``antenna_right``,
    ``l_antenna`` <-> ``r_antenna`` (and ``antenna_l`` <-> ``antenna_r``),
    ``left antenna`` <-> ``Right antenna`` with the case of the side word kept
    (``Left Antenna`` -> ``Right Antenna``, ``LEFT_WING`` -> ``RIGHT_WING``).
    """

    def swap(match):
        word = match.group(0)
        return _same_case("right" if word.lower() == "left" else "left", word)

    swapped = _SIDE_WORD.sub(swap, name)
    if swapped != name:
        return swapped

    def letter(side: str) -> str:
        other = "r" if side.lower() == "l" else "l"
        return other.upper() if side.isupper() else other

    swapped = _SIDE_PREFIX.sub(lambda m: letter(m.group(1)) + m.group(2), name, count=1)
    if swapped == name:
        swapped = _SIDE_SUFFIX.sub(lambda m: m.group(1) + letter(m.group(2)), name, count=1)
    return swapped if swapped != name else None


def _centroid(mask) -> np.ndarray | None:
    ys, xs = np.nonzero(np.asarray(mask, bool))
    if xs.size == 0:
        return None
    return np.array([xs.mean(), ys.mean()])


def _by_side(keys, template_masks: dict, axis_x: float) -> dict:
    """Instances of one category paired by side: each instance's centroid mirrored about
    the vertical line x = axis_x, matched one to one to the nearest instance."""
    from scipy.optimize import linear_sum_assignment

    points = {k: _centroid(template_masks[k]) for k in keys if k in template_masks}
    shown = [k for k, c in points.items() if c is not None]
    if len(shown) < 2:
        return {}
    centres = np.array([points[k] for k in shown])
    mirrored = centres.copy()
    mirrored[:, 0] = 2 * axis_x - mirrored[:, 0]
    cost = np.linalg.norm(mirrored[:, None, :] - centres[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    out = {}
    for i, j in zip(rows, cols):
        if i != j:
            out[shown[i]] = shown[j]
    # an assignment need not be symmetric: keep only the pairs both sides agree on
    return {a: b for a, b in out.items() if out.get(b) == a}


def mirror_map(objects, categories: dict, template_masks: dict, pairs=()) -> dict:
    """Which structure becomes which after a mirrored match (when names are swapped).

    Args:
        objects: the tracked structures as [(category id, instance)].
        categories: {category id: name}.
        template_masks: {(category id, instance): bool mask} of one template image (the
            first that shows the structures); it decides the sides of several instances
            of one category.
        pairs: the config's `mirror_pairs`, [[name a, name b], ...]: category names that
            are each other's partners although their names do not say so.

    Returns:
        {key: partner key}, symmetric, holding only the keys of `objects` that have a
        partner among `objects`: keys whose category names are paired by
        `mirror_partner` or `pairs` (the partner has the same instance number), and
        instances of one category paired by side (their centroids mirrored about the
        vertical line through the centroid of all the template's structures, matched to
        the nearest instance one to one; an instance matched to itself has no partner).

    Raises:
        ValueError: a name in `pairs` that is no category, or a malformed pair.
    """
    objects = [(int(c), int(i)) for c, i in objects]
    present = set(objects)
    ids = {name: cid for cid, name in categories.items()}
    partner_category: dict[int, int] = {}
    for pair in pairs or ():
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"mirror_pairs: each pair must be two category names, got {pair!r}")
        a, b = pair
        for name in (a, b):
            if name not in ids:
                raise ValueError(f"mirror_pairs: {name!r} is not a category of the templates")
        if ids[a] != ids[b]:
            partner_category[ids[a]] = ids[b]
            partner_category[ids[b]] = ids[a]
    for cid, name in categories.items():
        if cid in partner_category:
            continue
        other = mirror_partner(str(name))
        if other is not None and other in ids and ids[other] != cid:
            partner_category[cid] = ids[other]

    result: dict = {}
    for key in objects:
        cid, instance = key
        if cid in partner_category:
            other = (partner_category[cid], instance)
            if other in present:
                result[key] = other
                result[other] = key

    # several instances of one category, not already paired by name: by side
    by_category: dict[int, list] = {}
    for key in objects:
        if key not in result:
            by_category.setdefault(key[0], []).append(key)
    groups = [keys for keys in by_category.values() if len(keys) > 1]
    if groups:
        shown = [np.asarray(m, bool) for m in template_masks.values()]
        shown = [m for m in shown if m.any()]
        if shown:
            centre = _centroid(np.logical_or.reduce(shown))
            for keys in groups:
                result.update(_by_side(keys, template_masks, float(centre[0])))
    return result


# -- the specimen's silhouette: where its structures lie ----------------------------------

#: bins per side of a silhouette, and its half-width in units of sqrt(area)
SILHOUETTE_BINS = 48
SILHOUETTE_EXTENT = 2.5
# template masks are reduced to at most this many pixels a side for their silhouette
_SILHOUETTE_SIDE = 256


def silhouette(xs: np.ndarray, ys: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Where a specimen's structures lie, whatever its place and size in the photo.

    The points (pixel centres of the union of its structures' masks, in the photo's
    pixel coordinates, x right and y down) are centred on their centroid and scaled by
    the square root of their area, and binned on a square grid: a density that keeps
    the specimen's shape and orientation (a beetle turned 90 degrees, or mirrored, gives
    another silhouette) and drops its position and size.

    Args:
        xs, ys: the points' coordinates.
        weights: each point's area (default 1).

    Returns:
        (SILHOUETTE_BINS, SILHOUETTE_BINS) float64 densities summing to at most 1
        (all zeros when there are no points).
    """
    bins = SILHOUETTE_BINS
    xs = np.asarray(xs, np.float64)
    ys = np.asarray(ys, np.float64)
    weights = np.ones_like(xs) if weights is None else np.asarray(weights, np.float64)
    area = float(weights.sum())
    if xs.size == 0 or area <= 0:
        return np.zeros((bins, bins))
    cx, cy = float((xs * weights).sum() / area), float((ys * weights).sum() / area)
    r = np.sqrt(area)
    extent = SILHOUETTE_EXTENT
    density, _, _ = np.histogram2d(
        (ys - cy) / r,
        (xs - cx) / r,
        bins=bins,
        range=[[-extent, extent], [-extent, extent]],
        weights=weights / area,
    )
    return density


def mask_silhouette(mask: np.ndarray) -> np.ndarray:
    """The `silhouette` of a bool mask (the union of a template's structures), from a
    copy of it reduced to at most 256 pixels a side (area-averaged: each reduced pixel
    weighs the share of it the mask covers)."""
    mask = np.asarray(mask, bool)
    height, width = mask.shape
    step = max(1.0, max(height, width) / _SILHOUETTE_SIDE)
    if step > 1.0:
        import cv2

        size = (max(1, round(width / step)), max(1, round(height / step)))
        cover = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    else:
        cover = mask.astype(np.float32)
    rows, cols = np.nonzero(cover)
    sy, sx = height / cover.shape[0], width / cover.shape[1]
    return silhouette((cols + 0.5) * sx, (rows + 0.5) * sy, cover[rows, cols] * (sx * sy))


def silhouette_iou(a: np.ndarray, b: np.ndarray) -> float:
    """How far two silhouettes agree: the sum of their smaller densities over the sum of
    their larger ones (1 for the same shape in the same orientation, 0 when one is
    empty)."""
    larger = float(np.maximum(a, b).sum())
    return float(np.minimum(a, b).sum()) / larger if larger > 0 else 0.0
