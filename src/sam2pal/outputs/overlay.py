"""Drawing one overlay: a photo with its structures, their labels and a legend.

Made to be read at the size people look at overlays (the longer side 800 to 1600 px):

* every structure of a collection keeps one colour on every image (`structure_colours`,
  from published colour-blind-safe palettes, in category id order);
* large structures are filled (translucent) and outlined; small and thin ones are only
  outlined, so the part itself stays visible (`is_outlined`);
* each structure gets a label next to it, joined to it by a leader line; labels are
  placed greedily so that they never overlap each other nor the legend (`place_labels`);
* a legend lists every structure with its colour and QC score on this image.

Line widths and text sizes follow the output's size; text uses the font Pillow ships
(`ImageFont.load_default(size=...)`), so nothing depends on the system's fonts.

`draw_overlay` returns the picture; `render_overlay` also returns where the labels and
the legend went (`Overlay`), for tests and for callers that place more on the picture.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)

# One colour per structure, in this order. Sources:
# * Okabe & Ito (2008), "Color Universal Design": orange, sky blue, bluish green,
#   yellow, blue, vermillion, reddish purple (its black comes last: it vanishes on dark
#   specimens);
# * Paul Tol's qualitative schemes (personal.sron.nl/~pault/, "muted" and "light"):
#   the colours that stay at least 18 CIELAB units (ΔE76) from every earlier one.
# The first seven are told apart with any colour vision; beyond them names and labels
# carry the identity as much as the colour.
PALETTE: tuple[Colour, ...] = (
    (230, 159, 0),  # Okabe-Ito orange
    (86, 180, 233),  # Okabe-Ito sky blue
    (0, 158, 115),  # Okabe-Ito bluish green
    (240, 228, 66),  # Okabe-Ito yellow
    (0, 114, 178),  # Okabe-Ito blue
    (213, 94, 0),  # Okabe-Ito vermillion
    (204, 121, 167),  # Okabe-Ito reddish purple
    (204, 102, 119),  # Tol muted rose
    (221, 204, 119),  # Tol muted sand
    (17, 119, 51),  # Tol muted green
    (136, 34, 85),  # Tol muted wine
    (68, 170, 153),  # Tol muted teal
    (153, 153, 51),  # Tol muted olive
    (170, 68, 153),  # Tol muted purple
    (51, 34, 136),  # Tol muted indigo
    (153, 221, 255),  # Tol light cyan
    (170, 170, 0),  # Tol light olive
    (238, 136, 102),  # Tol light orange
    (255, 170, 187),  # Tol light pink
    (0, 0, 0),  # Okabe-Ito black
)
#: outline styles of the structures past the palette's length: its colours again,
#: dashed, then dotted, then dash-dotted
STYLES = ("solid", "dashed", "dotted", "dashdot")

#: a structure is only outlined when its area is under this share of the image ...
SMALL_AREA = 0.002
#: ... or its mean width (2 x area / perimeter) under this share of the shorter side
THIN_WIDTH = 0.012

FILL_ALPHA = 0.4
HALO = (20, 20, 20)  # the dark rim under outlines, leader lines and label boxes


def structure_colours(categories: dict[int, str]) -> dict[int, Colour]:
    """One colour per structure of a collection, the same on every image and every run.

    Colours are handed out in increasing category id order from `PALETTE` (Okabe-Ito,
    then Paul Tol's muted and light schemes): distinct for up to 20 structures. From the
    21st on the colours repeat, told apart by their outline style (`structure_style`:
    dashed, then dotted, then dash-dotted) and by the name in the legend.

    Args:
        categories: {category id: name} of the collection (the names are not used: the
            order of the ids alone decides, so renaming keeps the colours).

    Returns:
        {category id: (r, g, b)}.
    """
    return {cid: PALETTE[i % len(PALETTE)] for i, cid in enumerate(sorted(categories))}


def structure_style(categories: dict[int, str]) -> dict[int, str]:
    """The outline style of each structure: "solid" for the first 20 (in id order),
    then "dashed", "dotted", "dashdot" for the ones whose colour repeats."""
    return {
        cid: STYLES[min(i // len(PALETTE), len(STYLES) - 1)]
        for i, cid in enumerate(sorted(categories))
    }


@dataclass(frozen=True)
class Structure:
    """One structure to draw.

    Attributes:
        mask: bool mask of the image's size (empty: listed in the legend only).
        name: its name on the label and in the legend (e.g. "antenna_2").
        colour: (r, g, b), from `structure_colours`.
        score: its QC score on this image, shown in the legend (None: none).
        note: shown after the score (e.g. "p" for a predicted IoU, "keyframe",
            "not found").
        style: outline style, one of `STYLES`.
    """

    mask: np.ndarray
    name: str
    colour: Colour
    score: float | None = None
    note: str = ""
    style: str = "solid"


@dataclass
class Overlay:
    """A drawn overlay and where its parts went.

    Attributes:
        image: the RGB picture (uint8).
        labels: {structure name: label rectangle}, for the structures that got a label.
        legend: the legend's rectangle (None when it does not fit in the picture, even
            in text down to 60 % of the labels' size and no less than 10 px).
        legend_rows: the legend's rows, (name, score text), in order.
        legend_corner: the corner the legend is in ("top-left", ... ; None without one).
        outlined: names of the structures drawn as outlines only.
    """

    image: np.ndarray
    labels: dict[str, Box] = field(default_factory=dict)
    legend: Box | None = None
    legend_rows: list[tuple[str, str]] = field(default_factory=list)
    legend_corner: str | None = None
    outlined: list[str] = field(default_factory=list)


# -- sizes and text ------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Line widths and text size for an output of a given size."""

    line: int
    font: int
    pad: int
    gap: int

    @classmethod
    def of(cls, height: int, width: int) -> Sizes:
        longer = max(height, width)
        font = max(12, round(longer * 0.0135))
        return cls(
            line=max(1, round(longer / 600)), font=font, pad=max(2, font // 4), gap=font // 2
        )


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's own font at `size` pixels (no system font needed)."""
    return ImageFont.load_default(size=size)


def text_size(text: str, size: int) -> tuple[int, int]:
    """(width, height) of a line of text at `size`, for boxes around it."""
    x0, _, x1, _ = font(size).getbbox(text)
    ascent, descent = font(size).getmetrics()
    return x1 - x0, ascent + descent


def boxes_overlap(a: Box, b: Box, margin: int = 0) -> bool:
    """Whether two rectangles (x0, y0, x1, y1) overlap, `margin` pixels apart counting."""
    return (
        a[0] < b[2] + margin
        and b[0] < a[2] + margin
        and a[1] < b[3] + margin
        and b[1] < a[3] + margin
    )


# -- which structures are outlined ---------------------------------------------------


def bounding_box(mask: np.ndarray) -> Box:
    """(x0, y0, x1, y1) of a non-empty mask's pixels (x1, y1 exclusive)."""
    x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
    return x, y, x + w, y + h


def mean_width(mask: np.ndarray) -> float:
    """The mean width of a mask, 2 x area / perimeter (a strip of width w and length L
    has area wL and perimeter about 2L; a disc of radius r gives r)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    area = float(np.count_nonzero(mask))
    return 2.0 * area / perimeter if perimeter > 0 else area


def is_outlined(mask: np.ndarray) -> bool:
    """Whether a structure is drawn as an outline only: when its area is under
    `SMALL_AREA` (0.2 %) of the image, or its mean width (`mean_width`) is under
    `THIN_WIDTH` (1.2 %) of the image's shorter side. A fill would hide such parts
    (eyes, antennae, legs, setae); their outline shows where they are and leaves the
    photo inside them as it is."""
    height, width = mask.shape
    area = np.count_nonzero(mask)
    if area < SMALL_AREA * height * width:
        return True
    return mean_width(mask) < THIN_WIDTH * min(height, width)


# -- drawing masks -------------------------------------------------------------------


def _dashes(style: str, line: int) -> tuple[int, ...]:
    unit = max(2, line)
    return {
        "dashed": (5 * unit, 3 * unit),
        "dotted": (unit, 2 * unit),
        "dashdot": (5 * unit, 2 * unit, unit, 2 * unit),
    }[style]


def _draw_contours(out: np.ndarray, contours, colour: Colour, width: int, style: str) -> None:
    if style == "solid":
        cv2.drawContours(out, contours, -1, colour, width, cv2.LINE_AA)
        return
    pattern = _dashes(style, width)
    period = sum(pattern)
    for contour in contours:
        points = contour[:, 0, :]
        points = np.concatenate([points, points[:1]])
        travelled = 0.0
        for p, q in zip(points[:-1], points[1:]):
            step = float(np.hypot(*(q - p)))
            phase, on, at = travelled % period, True, 0
            for i, length in enumerate(pattern):
                if phase < at + length:
                    on = i % 2 == 0
                    break
                at += length
            if on:
                cv2.line(out, tuple(map(int, p)), tuple(map(int, q)), colour, width, cv2.LINE_AA)
            travelled += step


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _outer_outline(out: np.ndarray, mask: np.ndarray, colour: Colour, width: int) -> None:
    """Outline a small or thin structure from outside: its edge pixels and `width` - 1
    pixels around it in its colour, a dark rim beyond; the photo inside stays as it is."""
    reach = width + 2
    x0, y0, x1, y1 = bounding_box(mask)
    x0, y0, x1, y1 = max(x0 - reach, 0), max(y0 - reach, 0), x1 + reach, y1 + reach
    piece = mask[y0:y1, x0:x1].astype(np.uint8)
    inner = cv2.erode(piece, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT)
    ring = cv2.dilate(piece, _disk(max(width - 1, 0))).astype(bool) & ~inner.astype(bool)
    rim = cv2.dilate(piece, _disk(width + 1)).astype(bool) & ~ring & ~piece.astype(bool)
    view = out[y0:y1, x0:x1]
    view[rim] = HALO
    view[ring] = colour


def draw_masks(out: np.ndarray, structures: Sequence[Structure], sizes: Sizes) -> list[str]:
    """Fill and outline the large structures, outline the small and thin ones from
    outside (`_outer_outline`), in place; returns the names of the outlined-only ones.
    Outlines of repeated colours (style other than solid) follow the edge, dashed."""
    outlined = []
    drawn = [s for s in structures if s.mask.any()]
    flags = [is_outlined(s.mask) for s in drawn]
    blend = out.astype(np.float32)
    for s, thin in zip(drawn, flags):
        if not thin:
            blend[s.mask] = (1 - FILL_ALPHA) * blend[s.mask] + FILL_ALPHA * np.float32(s.colour)
    out[:] = blend.clip(0, 255).astype(np.uint8)
    for s, thin in zip(drawn, flags):
        if thin:
            outlined.append(s.name)
        if thin and s.style == "solid":
            _outer_outline(out, s.mask, s.colour, sizes.line)
            continue
        contours, _ = cv2.findContours(
            s.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(out, contours, -1, HALO, sizes.line + 2, cv2.LINE_AA)
        _draw_contours(out, contours, s.colour, sizes.line, s.style)
    return outlined


# -- legend --------------------------------------------------------------------------


def score_text(structure: Structure) -> str:
    """The legend's score cell of a structure: "0.83", "0.91 p", "keyframe", ..."""
    text = "" if structure.score is None else f"{structure.score:.2f}"
    return " ".join(t for t in (text, structure.note) if t) or "–"


@dataclass(frozen=True)
class _Legend:
    rows: list[tuple[Structure, str]]
    title: tuple[str, str]
    notes: list[str]
    size: int
    width: int
    height: int


def _legend_layout(
    structures: Sequence[Structure], title: tuple[str, str], notes: list[str], size: int
) -> _Legend:
    rows = [(s, score_text(s)) for s in structures]
    pad = max(2, size // 3)
    names = [text_size(s.name, size)[0] for s, _ in rows] + [text_size(title[0], size)[0]]
    scores = [text_size(t, size)[0] for _, t in rows] + [text_size(title[1], size)[0]]
    name_width = size + pad + max(names)
    width = name_width + 2 * size + max(scores)
    width = max([width] + [text_size(n, round(size * 0.8))[0] for n in notes])
    line = text_size("Ag", size)[1] + pad
    note_line = text_size("Ag", round(size * 0.8))[1] + pad // 2
    height = line * (len(rows) + 1) + note_line * len(notes)
    return _Legend(rows, title, notes, size, width + 2 * pad, height + 2 * pad)


CORNERS = ("top-right", "top-left", "bottom-right", "bottom-left")


def _corner_box(corner: str, w: int, h: int, width: int, height: int, margin: int) -> Box:
    x0 = width - w - margin if corner.endswith("right") else margin
    y0 = height - h - margin if corner.startswith("bottom") else margin
    return (x0, y0, x0 + w, y0 + h)


def _covered(integral: np.ndarray, box: Box) -> int:
    x0, y0, x1, y1 = box
    return int(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])


def place_legend(
    layout_size: tuple[int, int], integral: np.ndarray, sizes: Sizes, corner: str | None
) -> tuple[str, Box] | None:
    """The corner of the image whose legend box covers the fewest structure pixels
    (`corner` to force one); None when the legend does not fit in the image."""
    w, h = layout_size
    height, width = integral.shape[0] - 1, integral.shape[1] - 1
    if w + 2 * sizes.gap > width or h + 2 * sizes.gap > height:
        return None
    corners = [corner] if corner else CORNERS
    boxes = [(c, _corner_box(c, w, h, width, height, sizes.gap)) for c in corners]
    return min(boxes, key=lambda cb: _covered(integral, cb[1]))


def _draw_legend(draw: ImageDraw.ImageDraw, legend: _Legend, box: Box, outlined: set[str]):
    size = legend.size
    pad = max(2, size // 3)
    draw.rectangle(box, fill=(255, 255, 255, 225), outline=(60, 60, 60, 255), width=1)
    line = text_size("Ag", size)[1] + pad
    x, y = box[0] + pad, box[1] + pad
    right = box[2] - pad
    draw.text((x, y), legend.title[0], font=font(size), fill=(60, 60, 60, 255))
    draw.text((right, y), legend.title[1], font=font(size), fill=(60, 60, 60, 255), anchor="ra")
    for s, score in legend.rows:
        y += line
        top = y + (line - pad - size) // 2
        swatch = (x, top, x + size, top + size)
        if s.name in outlined or not s.mask.any() or s.style != "solid":
            border = max(2, size // 5)
            draw.rectangle(
                swatch, fill=(255, 255, 255, 255), outline=(*s.colour, 255), width=border
            )
            if s.style != "solid":  # a gap in the middle of each side: a dashed square
                g, mx, my = max(1, size // 6), x + size // 2, top + size // 2
                for cx, cy in ((mx, top), (mx, top + size), (x, my), (x + size, my)):
                    draw.rectangle((cx - g, cy - g, cx + g, cy + g), fill=(255, 255, 255, 255))
        else:
            draw.rectangle(swatch, fill=(*s.colour, 255), outline=(*HALO, 255), width=1)
        grey = not s.mask.any()
        colour = (110, 110, 110, 255) if grey else (0, 0, 0, 255)
        draw.text((x + size + pad, y), s.name, font=font(size), fill=colour)
        draw.text((right, y), score, font=font(size), fill=colour, anchor="ra")
    small = round(size * 0.8)
    y += line
    for note in legend.notes:
        draw.text((x, y), note, font=font(small), fill=(60, 60, 60, 255))
        y += text_size("Ag", small)[1] + pad // 2


# -- labels --------------------------------------------------------------------------


def anchor_point(mask: np.ndarray) -> tuple[int, int]:
    """The point of a mask a leader line points at: the innermost point (farthest from
    the edge) of its largest 8-connected piece."""
    x0, y0, x1, y1 = bounding_box(mask)
    crop = mask[y0:y1, x0:x1].astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = stats[biggest, :4]
    piece = np.pad(labels[y : y + h, x : x + w] == biggest, 1).astype(np.uint8)
    distance = cv2.distanceTransform(piece, cv2.DIST_L2, 3)
    py, px = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x0 + x + px - 1), int(y0 + y + py - 1)


def _candidates(anchor, w: int, h: int, sizes: Sizes, far: int) -> Iterable[list[Box]]:
    """Rings of w x h label rectangles around an anchor point, nearest ring first: in
    each of 16 directions, the rectangle whose near side is the ring's radius away."""
    ax, ay = anchor
    step = h + sizes.gap
    radius = sizes.gap
    while radius < far:
        ring = []
        for k in range(16):
            angle = 2 * math.pi * k / 16 - math.pi / 2
            dx, dy = math.cos(angle), math.sin(angle)
            reach = radius + abs(dx) * w / 2 + abs(dy) * h / 2
            x, y = round(ax + dx * reach - w / 2), round(ay + dy * reach - h / 2)
            ring.append((x, y, x + w, y + h))
        yield ring
        radius += step


def _crosses(box: Box, segment) -> bool:
    """Whether a line segment ((x, y), (x, y)) passes through a rectangle."""
    inside, _, _ = cv2.clipLine((box[0], box[1], box[2] - box[0], box[3] - box[1]), *segment)
    return bool(inside)


def place_labels(
    structures: Sequence[Structure],
    shape: tuple[int, int],
    integral: np.ndarray,
    sizes: Sizes,
    blocked: Sequence[Box] = (),
) -> dict[str, tuple[Box, tuple[tuple[int, int], tuple[int, int]]]]:
    """Label rectangles that overlap neither each other nor `blocked` (the legend).

    Greedy, smallest structures first (they need a label close by the most). Each label
    is tried on rings of growing radius around its structure's anchor point
    (`anchor_point`, `_candidates`); a position is allowed when it lies in the image,
    keeps `sizes.pad` clear of every rectangle placed so far, and its leader line
    crosses no other label (nor theirs it; where no such position exists within a third
    of the image's longer side, crossings are allowed). On the nearest ring with an allowed position covering at most 2 %
    structure pixels, the least covering one is taken; without one, the least covering
    allowed position of all rings. A label with no room anywhere is left out (the
    legend still lists its structure).

    Args:
        structures: the structures (those with an empty mask get no label).
        shape: the image's (height, width).
        integral: integral image (`cv2.integral`) of the union of the masks.
        sizes: the output's `Sizes`.
        blocked: rectangles no label may overlap.

    Returns:
        {name: (rectangle, leader line)}: the leader runs from the rectangle to the
        first pixel of the structure on the way to its anchor point (`leader_line`), so
        that it does not cover the inside of a small part.
    """
    height, width = shape
    placed: dict[str, tuple[Box, tuple[tuple[int, int], tuple[int, int]]]] = {}
    taken = list(blocked)
    leaders = []
    drawn = [s for s in structures if s.mask.any()]
    for s in sorted(drawn, key=lambda s: (np.count_nonzero(s.mask), s.name)):
        w, h = text_size(s.name, sizes.font)
        w, h = w + 2 * sizes.pad, h + sizes.pad
        anchor = anchor_point(s.mask)
        best = None
        for strict in (True, False):
            best = _search(anchor, (w, h), (height, width), integral, taken, leaders, sizes, strict)
            if best is not None:
                break
        if best is not None:
            placed[s.name] = (best, leader_line(s.mask, best, anchor))
            taken.append(best)
            leaders.append((anchor, _nearest_on_box(best, anchor)))
    return placed


def _search(anchor, size, shape, integral, taken, leaders, sizes, strict: bool) -> Box | None:
    """The label rectangle for one structure (see `place_labels`); `strict`: its leader
    line may cross no label, nor theirs it (else crossings are allowed)."""
    height, width = shape
    best, best_cover = None, 2.0
    far = max(height, width) // 3 if strict else width + height
    for ring in _candidates(anchor, *size, sizes, far=far):
        choice, cover = _best_on_ring(ring, anchor, shape, integral, taken, leaders, sizes, strict)
        if choice is not None and cover < best_cover:
            best, best_cover = choice, cover
        if best_cover <= 0.02:
            break
    return best


def _best_on_ring(ring, anchor, shape, integral, taken, leaders, sizes, strict):
    """The allowed rectangle of a ring covering the fewest structure pixels, and that
    share (None, 2.0 when none is allowed)."""
    height, width = shape
    best, best_cover = None, 2.0
    for box in ring:
        x0, y0, x1, y1 = box
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            continue
        if any(boxes_overlap(box, t, sizes.pad) for t in taken):
            continue
        if strict and _tangled(box, anchor, taken, leaders):
            continue
        cover = _covered(integral, box) / ((x1 - x0) * (y1 - y0))
        if cover < best_cover:
            best, best_cover = box, cover
    return best, best_cover


def _tangled(box: Box, anchor, taken: Sequence[Box], leaders) -> bool:
    """Whether a label at `box` would have its leader line cross another rectangle
    (other than one over its own anchor point), or another leader cross it."""
    leader = (anchor, _nearest_on_box(box, anchor))
    for t in taken:
        if not (t[0] <= anchor[0] < t[2] and t[1] <= anchor[1] < t[3]) and _crosses(t, leader):
            return True
    return any(_crosses(box, segment) for segment in leaders)


def _readable_on(colour: Colour) -> tuple[int, int, int, int]:
    """Black or white text, whichever reads better on `colour` (WCAG luminance)."""
    channels = [c / 255 for c in colour]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return (0, 0, 0, 255) if luminance > 0.18 else (255, 255, 255, 255)


def leader_line(mask: np.ndarray, box: Box, anchor: tuple[int, int]):
    """((x, y) on the label's rectangle, (x, y) of the structure's first pixel met
    on the straight way from there to its anchor point)."""
    start = _nearest_on_box(box, anchor)
    steps = max(abs(anchor[0] - start[0]), abs(anchor[1] - start[1]), 1)
    xs = np.linspace(start[0], anchor[0], steps + 1).round().astype(int)
    ys = np.linspace(start[1], anchor[1], steps + 1).round().astype(int)
    hits = np.flatnonzero(mask[ys, xs])
    at = int(hits[0]) if len(hits) else steps
    return start, (int(xs[at]), int(ys[at]))


def _nearest_on_box(box: Box, point: tuple[int, int]) -> tuple[int, int]:
    x0, y0, x1, y1 = box
    return min(max(point[0], x0), x1 - 1), min(max(point[1], y0), y1 - 1)


# -- the overlay ---------------------------------------------------------------------


def _as_structure(item) -> Structure:
    if isinstance(item, Structure):
        return item
    mask, name, colour = item
    return Structure(np.asarray(mask, bool), str(name), tuple(colour))


def render_overlay(
    image: np.ndarray,
    structures: Sequence[Structure | tuple[np.ndarray, str, Colour]],
    score_title: str = "QC score",
    notes: Sequence[str] = (),
    legend: bool = True,
    legend_corner: str | None = None,
) -> Overlay:
    """Draw structures, labels and legend on a photo.

    Args:
        image: RGB uint8 photo (H, W, 3), already at the output size.
        structures: `Structure`s (or (mask, name, colour) tuples), masks of the
            image's size; names should be unique (labels are keyed by them).
        score_title: the legend's heading of the score column.
        notes: small lines under the legend (what the scores are).
        legend: draw the legend.
        legend_corner: force the legend into one of `CORNERS` (a video keeps it in one
            place); None: the corner covering the fewest structure pixels.

    Returns:
        The `Overlay`.
    """
    structures = [_as_structure(s) for s in structures]
    height, width = image.shape[:2]
    sizes = Sizes.of(height, width)
    out = np.ascontiguousarray(image[..., :3], dtype=np.uint8).copy()
    outlined = draw_masks(out, structures, sizes)
    union = np.zeros((height, width), np.uint8)
    for s in structures:
        union |= s.mask.astype(np.uint8)
    integral = cv2.integral(union)
    result = Overlay(out, outlined=outlined)
    canvas = Image.fromarray(out).convert("RGBA")
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    blocked = []
    if legend and structures:
        spot = None
        for size in range(sizes.font, max(10, round(sizes.font * 0.6)) - 1, -1):
            layout = _legend_layout(structures, ("structure", score_title), list(notes), size)
            spot = place_legend((layout.width, layout.height), integral, sizes, legend_corner)
            if spot is not None:
                break
        if spot is not None:
            result.legend_corner, result.legend = spot
            result.legend_rows = [(s.name, text) for s, text in layout.rows]
            blocked.append(result.legend)
    labels = place_labels(structures, (height, width), integral, sizes, blocked)
    colours = {s.name: s.colour for s in structures}
    for name, (_, (start, end)) in labels.items():
        draw.line([start, end], fill=(*HALO, 255), width=sizes.line + 2)
        draw.line([start, end], fill=(*colours[name], 255), width=sizes.line)
    for name, (box, _) in labels.items():
        colour = colours[name]
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(*colour, 235))
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(*HALO, 255), width=1)
        draw.text(
            (box[0] + sizes.pad, box[1] + sizes.pad // 2),
            name,
            font=font(sizes.font),
            fill=_readable_on(colour),
        )
    result.labels = {name: box for name, (box, _) in labels.items()}
    if result.legend is not None:
        _draw_legend(draw, layout, result.legend, set(outlined))
    result.image = np.asarray(Image.alpha_composite(canvas, layer).convert("RGB"))
    return result


def draw_overlay(
    image: np.ndarray,
    structures: Sequence[Structure | tuple[np.ndarray, str, Colour]],
    **options,
) -> np.ndarray:
    """The RGB overlay picture of `render_overlay` (same arguments)."""
    return render_overlay(image, structures, **options).image
