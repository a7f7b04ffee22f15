"""Procedural insects: part label maps drawn from random body plans.

The vendored NEON masks are 181 real ground beetles, all of one body plan. To train a
model that copes with other shapes, `procedural_insect` draws label maps from a
parametric insect: head, pronotum and elytra (or abdomen) as rounded shapes of random
proportions, two antennae (thread-like, beaded or clubbed, straight or curved) and
three pairs of jointed legs (coxa-femur, tibia, tarsus) with random splay. The result
uses the same values as `synthetic.PARTS` (1 head, 2 pronotum, 3 elytra, 4 antenna,
5 legs) and can be rendered by `synthetic.render_specimen_layers` like a real mask.
Head points to the top of the canvas; the renderer adds the pose.

``plan="v2"`` widens the proportions (slender to squat bodies, small to large heads,
short to very long appendages), adds compound eyes (6, `synthetic.EXTRA_PARTS`) at
the sides of the head and labels the first antennal segment as the scape (7), and adds
elbowed antennae (a long scape, then the flagellum at a sharp angle) to the
thread-like, beaded and clubbed kinds. ``plan="v1"`` (the default) draws exactly the
shapes it always did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

HEAD, PRONOTUM, ELYTRA, ANTENNA, LEGS, EYE, SCAPE = 1, 2, 3, 4, 5, 6, 7
PLANS = ("v1", "v2")


def _blob(
    canvas: np.ndarray,
    value: int,
    centre,
    half_w: float,
    half_h: float,
    squareness: float,
    taper: float,
) -> None:
    """Fill a superellipse-like outline (rounded rectangle to ellipse), optionally
    narrower at its top (taper > 0) or bottom (taper < 0)."""
    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    p = 2.0 + 4.0 * squareness  # 2: ellipse, 6: nearly a rectangle
    c, s = np.cos(t), np.sin(t)
    x = np.sign(c) * np.abs(c) ** (2 / p)
    y = np.sign(s) * np.abs(s) ** (2 / p)
    x = x * (1.0 - taper * y * 0.5)  # y < 0 is the top
    pts = np.stack([centre[0] + half_w * x, centre[1] + half_h * y], axis=1)
    cv2.fillPoly(
        canvas, [np.round(pts * 4).astype(np.int32)], int(value), lineType=cv2.LINE_8, shift=2
    )


def _polyline(canvas: np.ndarray, value: int, points, widths) -> None:
    """Draw a chain of segments, each with its own thickness, with round joints."""
    for (a, b), w in zip(zip(points[:-1], points[1:]), widths):
        w = max(1, int(round(w)))
        pa = (int(round(a[0])), int(round(a[1])))
        pb = (int(round(b[0])), int(round(b[1])))
        cv2.line(canvas, pa, pb, int(value), thickness=w, lineType=cv2.LINE_8)
        cv2.circle(canvas, pb, max(1, w // 2), int(value), thickness=-1)


def _antenna(canvas, rng, base, side: int, length: float, width: float, v2: bool = False) -> None:
    n = int(rng.integers(8, 12))
    kind = rng.choice(
        ["thread", "beaded", "clubbed", "elbowed"] if v2 else ["thread", "beaded", "clubbed"]
    )
    heading = math.radians(-90 + side * rng.uniform(15, 55))  # up and outwards
    bend = side * rng.uniform(-0.12, 0.2)
    seg = length / n
    pts, widths = [np.array(base, float)], []
    if v2:  # the scape: the first segment, longer in elbowed antennae
        share = rng.uniform(0.25, 0.4) if kind == "elbowed" else rng.uniform(0.08, 0.18)
        pts.append(pts[-1] + length * share * np.array([math.cos(heading), math.sin(heading)]))
        widths.append(width * rng.uniform(1.1, 1.5))
        scape = (pts, widths)
        if kind == "elbowed":  # the flagellum turns outwards at the elbow
            heading += side * math.radians(rng.uniform(50, 110))
        seg = length * (1 - share) / n
        pts, widths = [pts[-1]], []
    for i in range(n):
        heading += bend + rng.normal(0, 0.05)
        pts.append(pts[-1] + seg * np.array([math.cos(heading), math.sin(heading)]))
        w = width
        if kind == "clubbed" and i >= n - 3:
            w = width * rng.uniform(1.8, 2.6)
        elif kind == "beaded":
            w = width * (1.25 if i % 2 else 0.9)
        widths.append(w)
    _polyline(canvas, ANTENNA, pts, widths)
    if v2:  # the scape on top of the flagellum's first joint
        _polyline(canvas, SCAPE, *scape)


def _leg(canvas, rng, base, side: int, direction: float, length: float, width: float) -> None:
    """A leg from `base`: femur outwards at `direction` (degrees from straight out,
    negative = forwards), tibia bending back, a thin tarsus."""
    out = 0.0 if side > 0 else 180.0
    a1 = math.radians(out + side * direction)
    femur = length * rng.uniform(0.32, 0.4)
    tibia = length * rng.uniform(0.32, 0.4)
    tarsus = length - femur - tibia
    knee_bend = side * math.radians(rng.uniform(20, 70)) * (1 if direction >= 0 else -1)
    p0 = np.array(base, float)
    p1 = p0 + femur * np.array([math.cos(a1), math.sin(a1)])
    a2 = a1 + knee_bend
    p2 = p1 + tibia * np.array([math.cos(a2), math.sin(a2)])
    a3 = a2 + side * math.radians(rng.uniform(-20, 20))
    mid = p2 + 0.5 * tarsus * np.array([math.cos(a3), math.sin(a3)])
    a4 = a3 + side * math.radians(rng.uniform(-15, 15))
    p3 = mid + 0.5 * tarsus * np.array([math.cos(a4), math.sin(a4)])
    _polyline(canvas, LEGS, [p0, p1, p2, mid, p3], [width * 1.3, width, width * 0.6, width * 0.55])


@dataclass(frozen=True)
class _Body:
    """The proportions and positions of one drawn insect's body parts, in pixels."""

    body_len: float
    head_len: float
    pron_len: float
    ely_len: float
    ely_w: float
    pron_w: float
    head_w: float
    cx: float
    top: float
    overlap: float

    @property
    def head_c(self) -> tuple[float, float]:
        return (self.cx, self.top + self.head_len / 2)

    @property
    def pron_c(self) -> tuple[float, float]:
        return (self.cx, self.top + self.head_len + self.pron_len / 2)

    @property
    def ely_c(self) -> tuple[float, float]:
        return (self.cx, self.top + self.head_len + self.pron_len + self.ely_len / 2)


def _draw_body(rng: np.random.Generator, size: int, v2: bool) -> _Body:
    """Draw the proportions of the body (head, pronotum, elytra) on a `size` canvas."""
    body_len = size * (rng.uniform(0.36, 0.55) if v2 else rng.uniform(0.42, 0.55))
    head_len = body_len * (rng.uniform(0.1, 0.3) if v2 else rng.uniform(0.13, 0.22))
    pron_len = body_len * (rng.uniform(0.12, 0.32) if v2 else rng.uniform(0.16, 0.28))
    ely_len = body_len - head_len - pron_len
    ely_w = body_len * (rng.uniform(0.22, 0.6) if v2 else rng.uniform(0.3, 0.5))
    pron_w = ely_w * (rng.uniform(0.45, 1.1) if v2 else rng.uniform(0.6, 1.05))
    head_w = min(pron_w, ely_w) * (rng.uniform(0.45, 1.0) if v2 else rng.uniform(0.5, 0.9))
    cx = size / 2 + rng.normal(0, size * 0.01)
    top = (size - body_len) / 2 + size * 0.05
    overlap = rng.uniform(0.04, 0.1)
    return _Body(body_len, head_len, pron_len, ely_len, ely_w, pron_w, head_w, cx, top, overlap)


def _draw_appendages(canvas: np.ndarray, rng, body: _Body, size: int, v2: bool) -> None:
    """Draw the two antennae and the three pairs of legs of `body` onto `canvas`."""
    b = body
    appendage_w = max(2.0, size * rng.uniform(0.006, 0.012))
    # antennae from the front corners of the head
    ant_len = b.body_len * (rng.uniform(0.2, 1.0) if v2 else rng.uniform(0.25, 0.75))
    for side in (-1, 1):
        base = (b.cx + side * b.head_w * 0.35, b.top + b.head_len * 0.25)
        _antenna(canvas, rng, base, side, ant_len * rng.uniform(0.95, 1.05), appendage_w, v2)
    # legs: front pair on the pronotum, middle and hind pairs under the elytra
    leg_len = b.body_len * (rng.uniform(0.35, 0.95) if v2 else rng.uniform(0.45, 0.8))
    anchors = [
        (b.pron_c[1] + b.pron_len * 0.1, b.pron_w * 0.4, -rng.uniform(20, 50)),
        (b.ely_c[1] - b.ely_len * 0.35, b.ely_w * 0.35, rng.uniform(-10, 20)),
        (b.ely_c[1] - b.ely_len * 0.1, b.ely_w * 0.35, rng.uniform(25, 60)),
    ]
    for y, half, direction in anchors:
        for side in (-1, 1):
            jitter = rng.normal(0, 6)
            _leg(
                canvas,
                rng,
                (b.cx + side * half, y),
                side,
                direction + jitter,
                leg_len * rng.uniform(0.8, 1.15) * (0.85 if direction < 0 else 1.0),
                appendage_w * 1.3,
            )


def _draw_body_parts(canvas: np.ndarray, rng, body: _Body) -> None:
    """Fill the elytra, the pronotum and the head of `body`, in that order."""
    b = body
    _blob(
        canvas,
        ELYTRA,
        b.ely_c,
        b.ely_w / 2,
        b.ely_len / 2 * (1 + b.overlap),
        rng.uniform(0, 0.6),
        taper=rng.uniform(-0.5, 0.1),
    )
    _blob(
        canvas,
        PRONOTUM,
        b.pron_c,
        b.pron_w / 2,
        b.pron_len / 2 * (1 + b.overlap),
        rng.uniform(0.2, 0.9),
        taper=rng.uniform(-0.1, 0.5),
    )
    _blob(
        canvas,
        HEAD,
        b.head_c,
        b.head_w / 2,
        b.head_len / 2,
        rng.uniform(0, 0.5),
        taper=rng.uniform(0, 0.6),
    )


def _draw_eyes(canvas: np.ndarray, rng, body: _Body) -> None:
    """Compound eyes on the sides of the head, bulging a little past its outline."""
    b = body
    ry = b.head_len * rng.uniform(0.15, 0.35)
    rx = min(ry * rng.uniform(0.5, 1.1), b.head_w * 0.3)
    ex = b.head_w / 2 * rng.uniform(0.7, 1.0) - rx * rng.uniform(0.2, 0.7)
    ey = b.head_c[1] - b.head_len * rng.uniform(-0.1, 0.2)
    for side in (-1, 1):
        _blob(
            canvas,
            EYE,
            (b.cx + side * ex, ey),
            max(rx, 2.0),
            max(ry, 2.0),
            rng.uniform(0, 0.2),
            taper=0.0,
        )


def procedural_insect(rng: np.random.Generator, size: int = 512, plan: str = "v1") -> np.ndarray:
    """A random insect part label map, head up.

    Args:
        rng: the generator every random choice comes from.
        size: width and height of the canvas, in pixels.
        plan: the body plan, one of `PLANS` (see the module docstring).

    Returns:
        A size x size uint8 label map, values 0..5 (0..7 with ``plan="v2"``).
    """
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    v2 = plan == "v2"
    canvas = np.zeros((size, size), np.uint8)
    body = _draw_body(rng, size, v2)
    _draw_appendages(canvas, rng, body, size, v2)
    _draw_body_parts(canvas, rng, body)  # the body on top of the appendage bases
    if v2:
        _draw_eyes(canvas, rng, body)
    return canvas


# appendage groups moved together: an antenna with its scape; a leg
_ANTENNA_LABELS = (ANTENNA, SCAPE)
_LEG_LABELS = (LEGS,)
_BODY_LABELS = (HEAD, PRONOTUM, ELYTRA, EYE)


def _appendage_groups(label_map: np.ndarray, min_pixels: int):
    """(labels, component mask, attachment point (x, y)) for every antenna (with its
    scape) and every leg of `label_map`: the 8-connected pieces of at least
    `min_pixels` pixels, each attached at its pixel nearest to the head (antennae)
    or to the body (legs)."""
    head = label_map == HEAD
    body = np.isin(label_map, (HEAD, PRONOTUM, ELYTRA))
    groups = []
    for labels, anchor in ((_ANTENNA_LABELS, head if head.any() else body), (_LEG_LABELS, body)):
        pieces = np.isin(label_map, labels).astype(np.uint8)
        if not pieces.any() or not anchor.any():
            continue
        # distance of every pixel to the anchor part
        dist = cv2.distanceTransform((~anchor).astype(np.uint8), cv2.DIST_L2, 3)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(pieces, connectivity=8)
        for k in range(1, n):
            if stats[k, cv2.CC_STAT_AREA] < min_pixels:
                continue
            mask = comp == k
            ys, xs = np.nonzero(mask)
            i = int(np.argmin(dist[ys, xs]))
            groups.append((labels, mask, (float(xs[i]), float(ys[i]))))
    return groups


def repose_appendages(
    label_map: np.ndarray,
    rng: np.random.Generator,
    antenna_degrees: float = 45.0,
    leg_degrees: float = 25.0,
    over_body: float = 0.5,
    min_pixels: int = 12,
) -> np.ndarray:
    """The same specimen with its antennae and legs moved: each antenna (with its
    scape) and each leg turned about its attachment point by its own random angle.

    A specimen is photographed with its appendages where they dried or where the
    preparator set them, so two photos of one species (or one specimen twice) differ
    in them more than in the body. The body (head, eyes, pronotum, elytra) stays as it
    is; where an appendage lay over it, the body's nearest part fills its place.
    Turned legs go under the body; turned antennae lie over it with probability
    `over_body` (a swept-back antenna on the pronotum or elytra) and under it
    otherwise. The canvas grows so that no turned appendage is cut off.

    Args:
        label_map: a part label map (`synthetic.ALL_PARTS` values: a NEON mask or
            `procedural_insect`'s).
        rng: the generator every random choice comes from.
        antenna_degrees, leg_degrees: each antenna's and each leg's angle is drawn
            uniformly from +-this many degrees.
        over_body: the share of specimens whose turned antennae lie over the body.
        min_pixels: pieces smaller than this (specks of a label) stay where they are.

    Returns:
        A new uint8 label map (larger than `label_map` by a margin on every side).
    """
    src = np.asarray(label_map, np.uint8)
    h, w = src.shape
    pad = max(h, w)  # a turned appendage reaches at most its length past the old canvas
    padded = np.pad(src, pad)
    groups = _appendage_groups(padded, min_pixels)
    moved = np.zeros_like(padded, dtype=bool)
    for _, mask, _ in groups:
        moved |= mask
    out = np.where(moved, 0, padded).astype(np.uint8)
    # where an appendage lay over the body, the body's nearest part takes its place
    body = np.isin(out, _BODY_LABELS)
    if body.any() and moved.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
        closed = cv2.morphologyEx(body.astype(np.uint8), cv2.MORPH_CLOSE, kernel) > 0
        holes = moved & closed & ~body
        if holes.any():
            _, (iy, ix) = ndimage.distance_transform_edt(~body, return_indices=True)
            out[holes] = out[iy[holes], ix[holes]]
    antennae_over = bool(rng.random() < over_body)
    for labels, mask, (x, y) in groups:
        limit = antenna_degrees if labels == _ANTENNA_LABELS else leg_degrees
        turn = cv2.getRotationMatrix2D((x, y), float(rng.uniform(-limit, limit)), 1.0)
        values = np.where(mask, padded, 0).astype(np.uint8)
        turned = cv2.warpAffine(
            values, turn, (values.shape[1], values.shape[0]), flags=cv2.INTER_NEAREST
        )
        free = out == 0
        if labels == _ANTENNA_LABELS and antennae_over:
            free |= np.isin(out, _BODY_LABELS)
        put = (turned > 0) & free
        out[put] = turned[put]
    ys, xs = np.nonzero(out)
    margin = 2
    y0, y1 = max(0, ys.min() - margin), min(out.shape[0], ys.max() + margin + 1)
    x0, x1 = max(0, xs.min() - margin), min(out.shape[1], xs.max() + margin + 1)
    return np.ascontiguousarray(out[y0:y1, x0:x1])
