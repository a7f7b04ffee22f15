"""Synthetic specimen photographs rendered from real beetle part masks.

The demo collection, the tests and (later) model training need specimen photos with
exact part ground truth. This module paints them from the vendored NEON beetle part
masks (`sam2pal/data/neon_beetles_masks`, 181 hand-labelled label maps, MIT licence;
Feng et al. 2025, arXiv 2501.06749; NEON data set doi 10.57967/hf/5252): every picture
shows a real beetle outline, so thin curved antennae, legs and part boundaries are
real shapes, and the ground truth is the placed label map itself.

Rendering one specimen (`render_specimen`):

1. pose: a random similarity transform (any rotation, optional mirror, a scale that
   makes the beetle's longest extent fill a fraction of the canvas's shorter side, a
   translation that keeps it fully inside); the label map is warped with
   nearest-neighbour interpolation, so it only ever holds the values 0..5;
2. substrate: paper / foam / gradient backdrop / coloured card (and a dark "slate"
   kind kept out of the defaults), with fine grain, and a soft drop shadow of the
   silhouette;
3. clutter, never touching the specimen or its shadow: a specimen label with dark
   hand-writing strokes, a pin head, a scale bar;
4. the beetle: one colour per part from a carabid palette, a height field built from
   per-part distance transforms (domed parts, dark seams between parts), elytral
   striae that follow the elytra outline, punctures, micro-relief, then diffuse and
   glossy (Blinn-Phong) lighting from one light direction;
5. camera: a low-frequency illumination gradient with vignetting, a slight colour
   cast, a slight blur and sensor noise.

Every random choice comes from the `numpy.random.Generator` passed in, so the same
seed gives the same image, bit for bit.

Style options (`Style`, or a plain dict with the same keys) pin what would otherwise
be drawn at random, so that a test collection can come from generator settings that a
training collection never saw (for example train on `palettes=("black", "dark_brown")`
and `backgrounds=("paper", "foam")`, then evaluate on `palettes=("metallic_blue",)`,
`backgrounds=("card",)`). Choices are tuples of allowed values, drawn uniformly;
ranges are (low, high) tuples, drawn uniformly:

- ``palettes``: beetle colour families, names from `PALETTES`. The default leaves out
  the two kept for held-out renders (``metallic_blue``, ``bronze``).
- ``backgrounds``: substrate kinds, names from `BACKGROUNDS`. The default leaves out
  ``slate`` (a dark substrate, kept for held-out renders).
- ``background_color``: (R, G, B) 0-255 base colour of the substrate; ``None`` draws
  one that suits the kind. When pinned it still varies by about 2 % per image.
- ``light_angle``: direction the light comes from, in degrees (0 = from the right,
  90 = from the top of the picture); ``None`` draws any direction. When pinned it
  still varies by a few degrees per image.
- ``clutter``: False turns every clutter item off.
- ``clutter_items``: which items may appear, from ``("label", "pin", "scale_bar")``.
- ``clutter_prob``: probability of each listed item (it is skipped when no free spot
  is found).
- ``scale_range``: fraction of the canvas's shorter side filled by the beetle's longest
  extent (at most 0.95).
- ``rotation_range``: rotation in degrees.
- ``heading``: True makes ``rotation_range`` the direction the head points on the
  canvas, in degrees as ``light_angle`` (0 = right, 90 = up), whatever the direction
  in the source label map (the head's centroid seen from the body's): a collection in
  one pose, for measuring what a turned or mirrored specimen does.
- ``flip_prob``: probability of a mirror image.
- ``textures``: surface detail from ``("noise", "punctures", "striae")``.
- ``illumination``: strength of the low-frequency illumination gradient.
- ``shadow_opacity``: darkness of the specimen's drop shadow ((0, 0) for none).
- ``gloss``: multiplier on the palette's glossiness (0 gives matte beetles).
- ``blur_sigma``: Gaussian blur of the whole photo, in pixels.
- ``noise_sigma``: sensor noise, in 8-bit grey levels.

Options for training data, off by default (the defaults render exactly as before):

- ``part_colors``: five (R, G, B) colours, head, pronotum, elytra, antenna, legs, used
  instead of a palette's (the palette then sets the gloss only, no metallic sheen).
- ``vignette``: range of the darkening towards the corners (default: 0.02-0.08).
- ``colour_cast``: spread of the per-channel colour cast (default 0.015).
- ``motion_blur`` and ``motion_blur_prob``: length in pixels of a camera-shake blur in
  a random direction, and how often it happens (default: never).
- ``jpeg_quality``: range of a JPEG quality the photo is re-compressed at (default:
  none).
- backgrounds ``noise`` and ``stripes`` and clutter items ``debris`` and ``fibre``,
  none of them in the defaults.

`randomised_style` draws a domain-randomised style for one episode (colours from the
whole colour space, light specimens on dark grounds as often as the reverse, textured
grounds, clutter, lighting, blur, noise, JPEG); `zoom_crop` crops frames so that a part
fills a chosen share of the frame; `camera_effects` applies the camera stage after such
a crop.

`make_collection` writes one collection (JPEG images, COCO ground truth for all of
them, COCO templates for the first few). A collection looks like one lab's photo
series: it fixes the substrate kind and colour, the light direction and narrower
lighting, blur and noise ranges once from the seed; the beetle mask, pose, palette,
texture and clutter change from image to image.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_path, atomic_write, write_json
from sam2pal.io.masks import encode_rle, mask_bbox

PARTS = {1: "head", 2: "pronotum", 3: "elytra", 4: "antenna", 5: "legs"}
#: Parts that only `procedural.procedural_insect(plan="v2")` draws (for training): the
#: compound eyes and the antenna's first segment. Rendered when a label map has them.
EXTRA_PARTS = {6: "eye", 7: "scape"}
ALL_PARTS = {**PARTS, **EXTRA_PARTS}

_BODY = (1, 2, 3)
_APPENDAGES = (4, 5)

# ---------------------------------------------------------------------------------
# palettes and substrates
# ---------------------------------------------------------------------------------

#: Beetle colour families (sRGB 0-255). ``body`` is head, pronotum, elytra; legs and
#: antennae come in a dark and a light variant, the light one chosen with probability
#: ``light_appendages``; ``sheen`` is the colour seen at grazing angles on metallic
#: species (None: not metallic); ``gloss`` is the range of the specular strength.
PALETTES: dict[str, dict] = {
    "black": {
        "body": ((31, 29, 29), (34, 31, 31), (27, 26, 27)),
        "legs": ((38, 32, 30), (92, 55, 33)),
        "antenna": ((46, 37, 31), (112, 70, 40)),
        "light_appendages": 0.35,
        "sheen": None,
        "gloss": (0.35, 0.65),
    },
    "dark_brown": {
        "body": ((66, 40, 25), (78, 49, 30), (62, 39, 24)),
        "legs": ((78, 50, 32), (128, 78, 42)),
        "antenna": ((88, 57, 35), (148, 94, 52)),
        "light_appendages": 0.6,
        "sheen": None,
        "gloss": (0.2, 0.4),
    },
    "reddish": {
        "body": ((80, 32, 18), (104, 42, 20), (94, 38, 19)),
        "legs": ((100, 46, 24), (150, 80, 40)),
        "antenna": ((108, 52, 28), (162, 94, 50)),
        "light_appendages": 0.7,
        "sheen": None,
        "gloss": (0.25, 0.45),
    },
    "metallic_green": {
        "body": ((27, 70, 37), (32, 78, 42), (24, 64, 34)),
        "legs": ((40, 44, 32), (158, 104, 50)),
        "antenna": ((44, 46, 36), (160, 108, 56)),
        "light_appendages": 0.6,
        "sheen": (30, 60, 110),
        "gloss": (0.35, 0.6),
    },
    "metallic_blue": {
        "body": ((27, 37, 80), (30, 42, 90), (25, 34, 76)),
        "legs": ((28, 28, 34), (60, 50, 60)),
        "antenna": ((32, 32, 38), (66, 56, 64)),
        "light_appendages": 0.2,
        "sheen": (84, 36, 100),
        "gloss": (0.25, 0.45),
    },
    "bronze": {
        "body": ((70, 52, 30), (80, 60, 34), (66, 48, 28)),
        "legs": ((46, 36, 28), (110, 70, 38)),
        "antenna": ((52, 40, 30), (120, 78, 42)),
        "light_appendages": 0.3,
        "sheen": (44, 80, 44),
        "gloss": (0.2, 0.35),
    },
}

DEFAULT_PALETTES = ("black", "dark_brown", "reddish", "metallic_green")

#: Substrate kinds; ``slate`` (dark grey) is kept out of the defaults, and so are the
#: randomised-appearance textures ``noise`` (value noise of random scale, sometimes
#: mottled with a second colour) and ``stripes`` (soft or hard stripes of random period
#: and direction).
BACKGROUNDS = ("paper", "foam", "gradient", "card", "slate", "noise", "stripes")
DEFAULT_BACKGROUNDS = ("paper", "foam", "gradient", "card")

CLUTTER_ITEMS = ("label", "pin", "scale_bar")
#: Clutter kept out of the defaults: ``debris`` (a few blobs of any colour) and
#: ``fibre`` (a thin curved thread, a look-alike of a leg or an antenna).
EXTRA_CLUTTER_ITEMS = ("debris", "fibre")
TEXTURES = ("noise", "punctures", "striae")

_CARD_COLOURS = (
    (176, 200, 222),  # light blue
    (192, 212, 182),  # pale green
    (162, 162, 160),  # mid grey
    (214, 200, 172),  # beige
    (230, 222, 186),  # pale cream
)


@dataclass(frozen=True)
class Style:
    """Generator settings; see the module docstring for what each field does."""

    palettes: tuple[str, ...] = DEFAULT_PALETTES
    backgrounds: tuple[str, ...] = DEFAULT_BACKGROUNDS
    background_color: tuple[int, int, int] | None = None
    light_angle: float | None = None
    clutter: bool = True
    clutter_items: tuple[str, ...] = CLUTTER_ITEMS
    clutter_prob: float = 0.5
    scale_range: tuple[float, float] = (0.35, 0.75)
    rotation_range: tuple[float, float] = (0.0, 360.0)
    heading: bool = False
    flip_prob: float = 0.5
    textures: tuple[str, ...] = TEXTURES
    illumination: tuple[float, float] = (0.04, 0.14)
    shadow_opacity: tuple[float, float] = (0.2, 0.45)
    gloss: float = 1.0
    blur_sigma: tuple[float, float] = (0.35, 0.75)
    noise_sigma: tuple[float, float] = (1.0, 2.5)
    part_colors: tuple[tuple[int, int, int], ...] | None = None
    vignette: tuple[float, float] | None = None
    colour_cast: float = 0.015
    motion_blur: tuple[float, float] = (0.0, 0.0)
    motion_blur_prob: float = 0.0
    jpeg_quality: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self._choices("palettes", PALETTES)
        self._choices("backgrounds", BACKGROUNDS)
        self._choices("clutter_items", CLUTTER_ITEMS + EXTRA_CLUTTER_ITEMS, allow_empty=True)
        self._choices("textures", TEXTURES, allow_empty=True)
        self._span("scale_range", 0.01, 0.95)
        self._span("rotation_range", -3600.0, 3600.0)
        self._span("illumination", 0.0, 0.5)
        self._span("shadow_opacity", 0.0, 1.0)
        self._span("blur_sigma", 0.0, 5.0)
        self._span("noise_sigma", 0.0, 50.0)
        self._span("motion_blur", 0.0, 50.0)
        if self.vignette is not None:
            self._span("vignette", 0.0, 1.0)
        if self.jpeg_quality is not None:
            self._span("jpeg_quality", 1.0, 100.0)
        self._check_colours()
        if self.light_angle is not None:
            object.__setattr__(self, "light_angle", float(self.light_angle))
        for name in ("clutter_prob", "flip_prob", "motion_blur_prob"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise InputError(f"style: {name} must be between 0 and 1")
            object.__setattr__(self, name, value)
        if not float(self.gloss) >= 0.0:
            raise InputError("style: gloss must be >= 0")
        object.__setattr__(self, "gloss", float(self.gloss))
        if not 0.0 <= float(self.colour_cast) <= 0.5:
            raise InputError("style: colour_cast must be between 0 and 0.5")
        object.__setattr__(self, "colour_cast", float(self.colour_cast))
        object.__setattr__(self, "clutter", bool(self.clutter))

    def _choices(self, name: str, allowed, allow_empty: bool = False) -> None:
        """Check field `name`, a choice or tuple of choices from `allowed`; store a tuple."""
        value = getattr(self, name)
        if isinstance(value, str):
            value = (value,)
        value = tuple(value)
        if not value and not allow_empty:
            raise InputError(f"style: {name} must list at least one choice")
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise InputError(f"style: unknown {name} {unknown}; choose from {list(allowed)}")
        object.__setattr__(self, name, value)

    def _span(self, name: str, lo_min: float, hi_max: float) -> None:
        """Check field `name`, a (low, high) range inside [lo_min, hi_max]; store floats."""
        value = getattr(self, name)
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise InputError(f"style: {name} must be a (low, high) pair") from None
        if not (lo_min <= lo <= hi <= hi_max):
            raise InputError(
                f"style: {name} ({lo}, {hi}) must satisfy {lo_min} <= low <= high <= {hi_max}"
            )
        object.__setattr__(self, name, (lo, hi))

    def _check_colours(self) -> None:
        """Check the pinned part colours and substrate colour; store integer tuples."""
        if self.part_colors is not None:
            try:
                colours = tuple(tuple(int(v) for v in c) for c in self.part_colors)
            except (TypeError, ValueError):
                colours = ()
            if len(colours) != len(PARTS) or not all(
                len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colours
            ):
                raise InputError(
                    f"style: part_colors must be {len(PARTS)} (R, G, B) colours 0-255, one per part"
                )
            object.__setattr__(self, "part_colors", colours)
        if self.background_color is not None:
            try:
                rgb = tuple(int(v) for v in self.background_color)
            except (TypeError, ValueError):
                rgb = ()
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise InputError("style: background_color must be three integers 0-255")
            object.__setattr__(self, "background_color", rgb)

    @classmethod
    def coerce(cls, style: Style | Mapping | None) -> Style:
        """A `Style` from None (defaults), a `Style`, or a dict of field values."""
        if style is None:
            return cls()
        if isinstance(style, cls):
            return style
        if isinstance(style, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(style) - known)
            if unknown:
                raise InputError(f"style: unknown option(s) {unknown}; known: {sorted(known)}")
            return cls(**dict(style))
        raise InputError(f"style must be a dict or a Style, not {type(style).__name__}")


@dataclass
class Rendering:
    """One rendered specimen with the facts a test or a training loop may need."""

    image: np.ndarray  # H x W x 3 uint8 RGB
    labels: np.ndarray  # H x W uint8, values 0..5 (PARTS)
    clutter: np.ndarray  # H x W bool, pixels covered by clutter items
    matrix: np.ndarray  # 2 x 3 affine map from source label-map pixels to the canvas
    scale: float
    angle: float
    flipped: bool
    palette: str
    background: str


# ---------------------------------------------------------------------------------
# the vendored masks
# ---------------------------------------------------------------------------------


def _mask_root():
    return resources.files("sam2pal").joinpath("data").joinpath("neon_beetles_masks")


@functools.lru_cache(maxsize=1)
def _load_masks_cached() -> tuple[tuple[str, np.ndarray], ...]:
    root = _mask_root()
    entries = []
    for species in root.iterdir():
        if not species.is_dir():
            continue
        for item in species.iterdir():
            if item.name.endswith(".png"):
                entries.append((f"{species.name}/{item.name}", item))
    entries.sort(key=lambda e: e[0])
    out = []
    for rel, item in entries:
        with Image.open(io.BytesIO(item.read_bytes())) as im:
            arr = np.array(im)
        if arr.ndim != 2 or arr.dtype != np.uint8 or arr.max() > 5:
            raise InputError(f"vendored beetle mask {rel} is not an 8-bit label map 0..5")
        arr.setflags(write=False)
        out.append((rel[: -len(".png")], arr))
    if not out:
        raise InputError("no vendored beetle masks found under sam2pal/data/neon_beetles_masks")
    return tuple(out)


def load_beetle_masks() -> list[tuple[str, np.ndarray]]:
    """The vendored NEON beetle label maps as (name, label map), sorted by path.

    Names are ``species/file`` without the extension, e.g. ``advena/beetle_100_475``.
    Each label map is a fresh writable uint8 array (0 background, 1..5 as in PARTS).
    """
    return [(name, arr.copy()) for name, arr in _load_masks_cached()]


# ---------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------


def _check_size(size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"size must be (width, height), got {size!r}") from None
    if width < 64 or height < 64:
        raise InputError(f"size must be at least 64 x 64 pixels, got {width} x {height}")
    return width, height


def _check_label_map(label_map) -> np.ndarray:
    arr = np.asarray(label_map)
    if arr.ndim != 2:
        raise InputError(f"label map must be 2-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"label map must hold integers, got {arr.dtype}")
    if arr.size == 0 or arr.min() < 0 or arr.max() > max(ALL_PARTS):
        raise InputError(f"label map values must lie in 0..{max(ALL_PARTS)}")
    if not (arr > 0).any():
        raise InputError("label map has no foreground")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _uniform(rng: np.random.Generator, span: tuple[float, float]) -> float:
    lo, hi = span
    return float(lo) if hi <= lo else float(rng.uniform(lo, hi))


def _value_noise(rng, shape, cell: float, octaves: int = 1, persistence: float = 0.5):
    """Multi-octave value noise, float32 in about [-1, 1], smooth at scale `cell` px."""
    height, width = shape
    out = np.zeros((height, width), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        c = max(float(cell), 1.0)
        gh = int(math.ceil(height / c)) + 2
        gw = int(math.ceil(width / c)) + 2
        grid = rng.random((gh, gw), dtype=np.float32) * 2.0 - 1.0
        if c <= 1.0:
            layer = grid[:height, :width]
        else:
            up = cv2.resize(grid, (int(gw * c), int(gh * c)), interpolation=cv2.INTER_CUBIC)
            oy = int(rng.integers(0, max(1, int(c))))
            ox = int(rng.integers(0, max(1, int(c))))
            layer = up[oy : oy + height, ox : ox + width]
        out += amp * layer
        total += amp
        amp *= persistence
        cell = cell / 2.0
    return out / total


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT)


def _shift(mask: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    h, w = mask.shape[:2]
    return cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)


def _disk(radius: int) -> np.ndarray:
    radius = max(int(radius), 0)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


# ---------------------------------------------------------------------------------
# pose
# ---------------------------------------------------------------------------------


def _placement(
    src: np.ndarray,
    angle: float,
    flipped: bool,
    frac: float,
    width: int,
    height: int,
    rng,
    margin: float = 3.0,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Affine matrix (2x3), scale, and the unit body axis on the canvas."""
    ys, xs = np.nonzero(src)
    pts = np.stack([xs, ys], axis=1).astype(np.float32)
    hull = cv2.convexHull(pts).reshape(-1, 2).astype(np.float64)
    pixel = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    corners = (hull[:, None, :] + pixel).reshape(-1, 2)
    centre = (corners.min(axis=0) + corners.max(axis=0)) / 2.0
    theta = math.radians(angle)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    lin = rot @ np.diag([-1.0, 1.0]) if flipped else rot
    q = (corners - centre) @ lin.T
    extent = float((q.max(axis=0) - q.min(axis=0)).max())
    scale = frac * min(width, height) / extent
    q *= scale
    lo, hi = q.min(axis=0), q.max(axis=0)
    tx = rng.uniform(margin - 0.5 - lo[0], width - 0.5 - margin - hi[0])
    ty = rng.uniform(margin - 0.5 - lo[1], height - 0.5 - margin - hi[1])
    a = scale * lin
    t = np.array([tx, ty]) - a @ centre
    matrix = np.hstack([a, t[:, None]])

    # body axis (head/pronotum/elytra, or whatever of them is present) in source space
    body = np.isin(src, _BODY)
    if body.sum() < 10:
        body = src > 0
    by, bx = np.nonzero(body)
    coords = np.stack([bx, by], axis=1).astype(np.float64)
    coords -= coords.mean(axis=0)
    _, vecs = np.linalg.eigh(coords.T @ coords)
    axis = lin @ vecs[:, -1]
    axis /= np.linalg.norm(axis)
    return matrix, float(scale), axis


# ---------------------------------------------------------------------------------
# substrate
# ---------------------------------------------------------------------------------


def _draw_background_colour(kind: str, rng) -> tuple[int, int, int]:
    if kind == "paper":
        v = rng.uniform(222, 242)
        return (int(v + rng.uniform(0, 6)), int(v), int(v - rng.uniform(6, 18)))
    if kind == "foam":
        v = rng.uniform(222, 240)
        return (int(v - 2), int(v), int(v + rng.uniform(0, 4)))
    if kind == "gradient":
        v = rng.uniform(150, 200)
        tint = rng.uniform(0, 10)
        return (int(v - tint), int(v - tint / 3), int(v + tint / 2))
    if kind == "card":
        base = np.array(_CARD_COLOURS[int(rng.integers(len(_CARD_COLOURS)))], float)
        base *= rng.uniform(0.95, 1.03)
        return tuple(int(np.clip(v, 0, 255)) for v in base)
    if kind in ("noise", "stripes"):  # any light-to-mid colour
        return _lch_to_rgb(rng.uniform(45, 90), rng.uniform(0, 40), rng.uniform(0, 360))
    # slate
    v = rng.uniform(52, 80)
    return (int(v), int(v + 2), int(v + rng.uniform(2, 8)))


def _background(kind: str, colour, rng, height: int, width: int) -> np.ndarray:
    base = np.asarray(colour, np.float32) / 255.0
    shape = (height, width)
    if kind == "paper":
        fibres = cv2.resize(
            rng.random((height // 2 + 2, width // 14 + 2), dtype=np.float32) * 2 - 1,
            (width, height),
            interpolation=cv2.INTER_LINEAR,
        )
        lum = 1 + 0.012 * _value_noise(rng, shape, 2, 2) + 0.01 * _value_noise(rng, shape, 30, 2)
        lum += 0.008 * fibres
    elif kind == "foam":
        pores = (rng.random(shape, dtype=np.float32) < 0.02).astype(np.float32)
        pores *= rng.uniform(0.03, 0.1, size=shape).astype(np.float32)
        pores = _blur(pores, 0.8) * 2.5
        lum = 1 + 0.02 * _value_noise(rng, shape, 7, 2) - pores
    elif kind == "gradient":
        phi = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xx - width / 2) * math.cos(phi) + (yy - height / 2) * math.sin(phi)
        t /= 0.5 * max(width, height)
        lum = 1 + rng.uniform(0.08, 0.18) * t + 0.006 * _value_noise(rng, shape, 2, 1)
    elif kind == "card":
        lum = 1 + 0.006 * _value_noise(rng, shape, 2, 2) + 0.012 * _value_noise(rng, shape, 40, 2)
    elif kind in ("noise", "stripes"):
        return _textured_background(kind, base, rng, height, width)
    else:  # slate
        lum = 1 + 0.05 * _value_noise(rng, shape, 12, 3) + 0.02 * _value_noise(rng, shape, 1.5, 1)
    return np.clip(base[None, None, :] * lum[..., None], 0, 1).astype(np.float32)


def _textured_background(kind: str, base: np.ndarray, rng, height: int, width: int) -> np.ndarray:
    """Value noise of a random scale, or stripes of a random period and direction, in
    the base colour, sometimes mixed with a second colour of about the same lightness."""
    shape = (height, width)
    if kind == "noise":
        cell = math.exp(rng.uniform(math.log(2.0), math.log(0.3 * max(width, height))))
        pattern = _value_noise(rng, shape, cell, int(rng.integers(1, 5)))
        pattern = np.clip(pattern * rng.uniform(1.0, 2.5), -1, 1)
    else:
        period = rng.uniform(4.0, 0.2 * min(width, height))
        phi = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        wave = np.sin(
            (xx * math.cos(phi) + yy * math.sin(phi)) * (2 * math.pi / period)
            + rng.uniform(0, 2 * math.pi)
        )
        sharp = rng.uniform(1.0, 8.0)  # 1: a sine, large: hard-edged stripes
        pattern = np.tanh(sharp * wave) / math.tanh(sharp)
        pattern = pattern.astype(np.float32)
    t = 0.5 + 0.5 * pattern  # 0..1
    if rng.random() < 0.5:  # two colours
        other = np.clip(base + rng.normal(0.0, 0.15, 3), 0, 1).astype(np.float32)
        mix = rng.uniform(0.3, 1.0)
        out = base[None, None, :] * (1 - mix * t[..., None]) + other[None, None, :] * (
            mix * t[..., None]
        )
    else:  # one colour, lighter and darker
        out = base[None, None, :] * (1 + rng.uniform(0.05, 0.35) * pattern)[..., None]
    out *= (1 + 0.01 * _value_noise(rng, shape, rng.uniform(1.0, 3.0), 1))[..., None]  # grain
    return np.clip(out, 0, 1).astype(np.float32)


def _illumination(
    rng,
    height: int,
    width: int,
    light_xy,
    strength: float,
    vignette: tuple[float, float] | None = None,
) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    half = 0.5 * max(width, height)
    t = ((xx - width / 2) * light_xy[0] + (yy - height / 2) * light_xy[1]) / half
    r2 = ((xx - width / 2) ** 2 + (yy - height / 2) ** 2) / half**2
    fall = rng.uniform(0.02, 0.08) if vignette is None else _uniform(rng, vignette)
    field = 1 + strength * t - fall * r2
    field += 0.015 * _value_noise(rng, (height, width), max(width, height) / 3, 2)
    return field.astype(np.float32)


# ---------------------------------------------------------------------------------
# clutter
# ---------------------------------------------------------------------------------


def _scribble(ink: np.ndarray, rng, x0: int, x1: int, y: int, char_h: int, thick: int) -> None:
    """Dark hand-writing strokes along a base line: words of short up/down strokes."""
    x = x0
    while x < x1 - 4:
        word = int(rng.integers(3, 9))
        for _ in range(word):
            if x >= x1 - 2:
                break
            top = y - int(rng.integers(max(1, char_h // 2), char_h + 1))
            step = int(rng.integers(2, 4))
            cv2.line(ink, (x, y), (x + step // 2, top), 1.0, thick, cv2.LINE_AA)
            cv2.line(ink, (x + step // 2, top), (x + step, y), 1.0, thick, cv2.LINE_AA)
            x += step
        x += int(rng.integers(3, 6))


def _rotate_patch(rgb: np.ndarray, alpha: np.ndarray, angle: float):
    h, w = alpha.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(math.ceil(h * sin + w * cos)) + 2, int(math.ceil(h * cos + w * sin)) + 2
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    rgb = cv2.warpAffine(rgb, m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(alpha, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0)
    return rgb, alpha


def _label_patch(rng, width: int, height: int):
    w = int(rng.uniform(0.2, 0.3) * width)
    h = int(w * rng.uniform(0.38, 0.52))
    cream = np.array([0.965, 0.955, 0.91], np.float32) * rng.uniform(0.95, 1.02)
    rgb = np.ones((h, w, 3), np.float32) * cream
    rgb *= (1 + 0.01 * _value_noise(rng, (h, w), 2, 1))[..., None]
    ink = np.zeros((h, w), np.float32)
    n_lines = int(rng.integers(3, 6))
    pad = max(3, w // 14)
    gap = (h - 2 * pad) / n_lines
    char_h = max(3, int(gap * 0.55))
    for j in range(n_lines):
        y = int(pad + (j + 0.8) * gap)
        x_end = w - pad - int(rng.integers(0, max(1, w // 3)))
        _scribble(ink, rng, pad, x_end, y, char_h, 1)
    if rng.random() < 0.4:
        cv2.rectangle(ink, (1, 1), (w - 2, h - 2), 0.8, 1)
    ink = np.clip(ink, 0, 1)
    ink_colour = np.array([0.08, 0.08, 0.12], np.float32)
    rgb = rgb * (1 - 0.85 * ink[..., None]) + 0.85 * ink[..., None] * ink_colour
    alpha = np.ones((h, w), np.float32)
    return _rotate_patch(rgb, alpha, rng.uniform(-6, 6))


def _pin_patch(rng, width: int, height: int):
    r = rng.uniform(4.0, 7.5) * min(width, height) / 360.0
    size = int(2 * math.ceil(r) + 5)
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = (xx - c) / r, (yy - c) / r
    d2 = dx**2 + dy**2
    alpha = np.clip((r - np.sqrt(d2) * r) + 0.5, 0, 1).astype(np.float32)
    colours = ((20, 20, 22), (235, 235, 230), (190, 30, 30), (225, 190, 40), (40, 70, 170))
    base = np.array(colours[int(rng.integers(len(colours)))], np.float32) / 255
    nz = np.sqrt(np.clip(1 - d2, 0, 1))
    hx, hy = -0.35, -0.4
    spec = np.exp(-((dx - hx) ** 2 + (dy - hy) ** 2) / 0.05)
    rgb = base[None, None] * (0.45 + 0.55 * nz)[..., None] + 0.7 * spec[..., None]
    return np.clip(rgb, 0, 1).astype(np.float32), alpha


def _scale_bar_patch(rng, width: int, height: int, dark_substrate: bool = False):
    length = int(rng.uniform(0.12, 0.22) * width)
    bar_h = max(3, int(round(0.012 * height)))
    char_h = max(4, int(round(0.018 * height)))
    h = bar_h + char_h + 6
    rgb = np.zeros((h, length, 3), np.float32) + 0.05
    alpha = np.zeros((h, length), np.float32)
    alpha[:bar_h] = 1.0
    if rng.random() < 0.5:  # alternating black and white segments inside a black frame
        n = int(rng.integers(2, 6))
        edges = np.linspace(1, length - 1, n + 1).astype(int)
        for k in range(n):
            if k % 2:
                rgb[1 : bar_h - 1, edges[k] : edges[k + 1]] = 0.95
    ink = np.zeros((h, length), np.float32)
    text_w = max(8, length // 4)
    x0 = (length - text_w) // 2
    _scribble(ink, rng, x0, x0 + text_w, h - 2, char_h, 1)
    ink = np.clip(ink, 0, 1)
    alpha = np.maximum(alpha, ink)
    if dark_substrate:  # a white bar reads on a dark substrate
        rgb = 1.0 - rgb
    return rgb, alpha


def _debris_patch(rng, width: int, height: int):
    """A few overlapping blobs of one random colour: crumbs, fragments, dirt."""
    size = max(6, int(rng.uniform(0.03, 0.12) * min(width, height)))
    alpha = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(1, 5))):
        c = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (
            max(1, int(rng.uniform(0.1, 0.45) * size)),
            max(1, int(rng.uniform(0.1, 0.45) * size)),
        )
        cv2.ellipse(alpha, c, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
    colour = _lch_to_rgb(rng.uniform(5, 95), rng.uniform(0, 80), rng.uniform(0, 360))
    shade = 1 + rng.uniform(0.05, 0.3) * _value_noise(rng, (size, size), rng.uniform(1.5, 4.0), 2)
    rgb = np.asarray(colour, np.float32)[None, None] / 255.0 * shade[..., None]
    return np.clip(rgb, 0, 1).astype(np.float32), np.clip(alpha, 0, 1)


def _fibre_patch(rng, width: int, height: int):
    """A thin curved thread of a random colour, 1-3 px wide."""
    length = rng.uniform(0.1, 0.4) * min(width, height)
    n = 24
    turn = np.cumsum(rng.normal(0.0, rng.uniform(0.02, 0.2), n))
    heading = rng.uniform(0, 2 * math.pi) + turn
    step = length / n
    pts = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], axis=1) * step, axis=0)
    pts -= pts.min(axis=0) - 3
    w, h = (int(math.ceil(v)) + 4 for v in pts.max(axis=0))
    alpha = np.zeros((h, w), np.float32)
    cv2.polylines(
        alpha, [np.round(pts).astype(np.int32)], False, 1.0, int(rng.integers(1, 4)), cv2.LINE_AA
    )
    colour = _lch_to_rgb(rng.uniform(5, 95), rng.uniform(0, 60), rng.uniform(0, 360))
    rgb = np.ones((h, w, 3), np.float32) * np.asarray(colour, np.float32) / 255.0
    return rgb, np.clip(alpha, 0, 1)


def _place_patch(canvas, clutter, keepout, rgb, alpha, rng, light_xy, tries: int = 40) -> bool:
    height, width = keepout.shape
    ph, pw = alpha.shape
    if ph + 4 > height or pw + 4 > width:
        return False
    support = cv2.dilate((alpha > 0.01).astype(np.uint8), _disk(4)) > 0
    for _ in range(tries):
        x = int(rng.integers(2, width - pw - 1))
        y = int(rng.integers(2, height - ph - 1))
        if (keepout[y : y + ph, x : x + pw] & support).any():
            continue
        # a faint contact shadow away from the light, then the item itself
        full = np.zeros((height, width), np.float32)
        full[y : y + ph, x : x + pw] = alpha
        shadow = _blur(_shift(full, -1.5 * light_xy[0], -1.5 * light_xy[1]), 1.2)
        canvas *= (1 - 0.3 * shadow * (1 - full))[..., None]
        region = canvas[y : y + ph, x : x + pw]
        region[:] = region * (1 - alpha[..., None]) + rgb * alpha[..., None]
        clutter[y : y + ph, x : x + pw] |= alpha > 0.01
        keepout[y : y + ph, x : x + pw] |= support
        return True
    return False


# ---------------------------------------------------------------------------------
# the beetle
# ---------------------------------------------------------------------------------


def _specimen_colours(palette: Mapping, rng) -> dict[int, np.ndarray]:
    """Per-part albedo (float 0..1): one jitter for the whole specimen, a little per part."""
    hue, sat, val = rng.uniform(-8, 8), rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.2)
    light = rng.random() < palette["light_appendages"]

    def shade(rgb, extra):
        px = np.array([[rgb]], np.float32) / 255.0
        hsv = cv2.cvtColor(px, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0] + hue) % 360.0
        hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 1)
        hsv[..., 2] = np.clip(hsv[..., 2] * val * (1 + rng.uniform(-extra, extra)), 0, 1)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)

    out = {k: shade(palette["body"][k - 1], 0.06) for k in _BODY}
    out[4] = shade(palette["antenna"][1 if light else 0], 0.08)
    out[5] = shade(palette["legs"][1 if light else 0], 0.08)
    return out


def _pinned_colours(part_colors, rng) -> dict[int, np.ndarray]:
    """Per-part albedo from pinned colours, with a slight brightness change per image
    and per part (the same specimen photographed again)."""
    gain = rng.uniform(0.94, 1.06)
    return {
        k: np.clip(np.asarray(rgb, np.float32) / 255.0 * gain * rng.uniform(0.97, 1.03), 0, 1)
        for k, rgb in zip(PARTS, part_colors)
    }


def _extra_colours(colours: Mapping, labels: np.ndarray, rng) -> dict[int, np.ndarray]:
    """Albedo of the extra parts a label map has (none: no random draws): eyes darker
    than the head (most often), of their own colour, or near the head's; the scape
    near the antenna's."""
    out = {}
    if (labels == 6).any():
        head = np.asarray(colours[1], np.float32)
        kind = rng.random()
        if kind < 0.6:
            out[6] = head * rng.uniform(0.2, 0.5)
        elif kind < 0.8:
            out[6] = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        else:
            out[6] = np.clip(head * rng.uniform(0.7, 1.3), 0, 1)
    if (labels == 7).any():
        out[7] = np.clip(np.asarray(colours[4], np.float32) * rng.uniform(0.85, 1.15), 0, 1)
    return out


def _elytra_coords(elytra: np.ndarray, axis: np.ndarray):
    """Across-elytra coordinate normalised to [-1, 1] (suture at 0) and half-width in px."""
    ys, xs = np.nonzero(elytra)
    cx, cy = xs.mean(), ys.mean()
    perp = np.array([-axis[1], axis[0]])
    u = (xs - cx) * axis[0] + (ys - cy) * axis[1]
    v = (xs - cx) * perp[0] + (ys - cy) * perp[1]
    ub = np.round(u).astype(int)
    ub -= ub.min()
    nb = ub.max() + 1
    vmax = np.full(nb, -np.inf)
    vmin = np.full(nb, np.inf)
    np.maximum.at(vmax, ub, v)
    np.minimum.at(vmin, ub, v)
    filled = np.isfinite(vmax)
    idx = np.arange(nb)
    vmax = np.interp(idx, idx[filled], vmax[filled])
    vmin = np.interp(idx, idx[filled], vmin[filled])
    k = np.ones(7) / 7
    mid = np.convolve(np.pad((vmax + vmin) / 2, 3, mode="edge"), k, "valid")
    half = np.convolve(np.pad((vmax - vmin) / 2, 3, mode="edge"), k, "valid")
    half = np.maximum(half, 2.0)
    vn = (v - mid[ub]) / half[ub]
    return ys, xs, vn, half[ub]


def _elytral_grooves(labels: np.ndarray, axis: np.ndarray, textures, rng) -> np.ndarray:
    """Depth (0..1) of the elytral suture and, sometimes, of the striae along it."""
    elytra = labels == 3
    grooves = np.zeros(labels.shape, np.float32)
    if elytra.sum() > 30:
        ys, xs, vn, half = _elytra_coords(elytra, axis)
        dist_suture = np.abs(vn) * half
        grooves[ys, xs] = 0.8 * np.exp(-(dist_suture**2) / 0.8)
        if "striae" in textures and rng.random() < 0.85:
            n = int(rng.integers(7, 10))
            depth = rng.uniform(0.35, 1.0)
            pos = np.abs(vn) * (n + 0.5)
            near = np.abs(pos - np.round(pos)) / (n + 0.5) * half  # px to nearest stria
            striae = np.exp(-(near**2) / (2 * 0.55**2)) * (np.round(pos) >= 1)
            grooves[ys, xs] = np.maximum(grooves[ys, xs], depth * striae)
    return grooves


def _relief(labels: np.ndarray, grooves: np.ndarray, textures, rng):
    """The height field of the beetle (domed parts, grooves, pits, micro-relief) and
    its pigment darkening (0..1: grooves, pits)."""
    shape = labels.shape
    fg = labels > 0
    height_map = np.zeros(shape, np.float32)
    darken = np.zeros(shape, np.float32)
    for k in ALL_PARTS:
        part = labels == k
        if not part.any():
            continue
        d = cv2.distanceTransform(part.astype(np.uint8), cv2.DIST_L2, 5)
        r = max(float(d.max()), 1.0)
        t = np.clip(d / (0.85 * r), 0, 1)
        flat = 0.45 if k in _BODY else 0.8
        h = flat * r * np.sqrt(1 - (1 - t) ** 2)
        height_map[part] = h[part]

    if "noise" in textures:
        relief = _value_noise(rng, shape, rng.uniform(1.5, 3.0), 2)
        height_map += rng.uniform(0.05, 0.15) * relief * fg
        darken += 0.08 * (_value_noise(rng, shape, rng.uniform(6, 14), 3) * 0.5 + 0.5)
    if "punctures" in textures:
        density = rng.uniform(0.01, 0.05)
        pits = (rng.random(shape, dtype=np.float32) < density).astype(np.float32)
        where = np.isin(labels, (1, 2)) | ((labels == 3) & (grooves > 0.3))
        pits = _blur(pits * where, 0.7) * 3.0
        height_map -= 0.4 * pits
        darken += 0.4 * np.clip(pits, 0, 1)
    height_map -= 0.6 * grooves
    darken += 0.35 * grooves
    return _blur(height_map * fg, 0.8), darken


def _shading(height_map: np.ndarray, light3: np.ndarray, shininess: float):
    """Surface normals' z, diffuse and Blinn-Phong specular terms of a height field."""
    gx = cv2.Sobel(height_map, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(height_map, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    norm = np.sqrt(gx**2 + gy**2 + 1.0)
    nx, ny, nz = -gx / norm, -gy / norm, 1.0 / norm
    diffuse = np.clip(nx * light3[0] + ny * light3[1] + nz * light3[2], 0, 1)
    half_vec = light3 + np.array([0.0, 0.0, 1.0])
    half_vec /= np.linalg.norm(half_vec)
    ndoth = np.clip(nx * half_vec[0] + ny * half_vec[1] + nz * half_vec[2], 0, 1)
    return nz, diffuse, ndoth**shininess


def _paint_beetle(
    labels: np.ndarray, axis: np.ndarray, palette_name: str, st: Style, rng, light3: np.ndarray
) -> np.ndarray:
    height, width = labels.shape
    palette = PALETTES[palette_name]
    if st.part_colors is None:
        colours = _specimen_colours(palette, rng)
        sheen = palette["sheen"]
    else:
        colours = _pinned_colours(st.part_colors, rng)
        sheen = None
    colours.update(_extra_colours(colours, labels, rng))
    gloss = _uniform(rng, palette["gloss"]) * st.gloss
    shininess = rng.uniform(12, 30)
    grooves = _elytral_grooves(labels, axis, st.textures, rng)
    height_map, darken = _relief(labels, grooves, st.textures, rng)
    nz, diffuse, spec = _shading(height_map, light3, shininess)

    albedo = np.zeros((height, width, 3), np.float32)
    for k, rgb in colours.items():
        albedo[labels == k] = rgb
    if sheen is not None:  # structural colour shifts at grazing angles
        sheen = np.array(sheen, np.float32) / 255.0
        mix = 0.7 * np.clip((1 - nz) * 2.5, 0, 1)[..., None] * np.isin(labels, _BODY)[..., None]
        albedo = albedo * (1 - mix) + sheen * mix
        spec_colour = 0.3 + 0.6 * albedo / np.maximum(albedo.max(axis=2, keepdims=True), 1e-3)
    else:
        spec_colour = np.full((1, 1, 3), 0.88, np.float32)
    albedo *= np.clip(1 - darken, 0.2, 1)[..., None]
    gloss_map = np.where(np.isin(labels, _APPENDAGES + (7,)), 0.5 * gloss, gloss).astype(np.float32)
    gloss_map[labels == 6] = max(gloss, 0.3) * 1.5  # compound eyes shine
    colour = albedo * (0.3 + 0.85 * diffuse)[..., None]
    colour += (gloss_map * spec)[..., None] * spec_colour
    return np.clip(colour, 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------
# public rendering API
# ---------------------------------------------------------------------------------


def _heading_rotation(src: np.ndarray, heading: float, flipped: bool) -> float:
    """The rotation (degrees, as `_placement` takes it) that makes the head of label map
    `src` (mirrored first when `flipped`) point to `heading` (0 = right, 90 = up)."""
    head = np.argwhere(src == 1)
    body = np.argwhere(np.isin(src, _BODY))
    if len(head) == 0 or len(body) == 0:
        return heading
    dy, dx = head.mean(axis=0) - body.mean(axis=0)
    if flipped:
        dx = -dx
    # `_placement` turns (x, y) vectors (y down) by +angle; the heading's vector is
    # (cos h, -sin h)
    return float(-heading - math.degrees(math.atan2(dy, dx)))


def _pose(src: np.ndarray, st: Style, rng, width: int, height: int):
    """Draw the pose and place the label map: (labels, matrix, scale, axis, angle,
    flipped)."""
    angle = _uniform(rng, st.rotation_range)
    flipped = bool(rng.random() < st.flip_prob)
    if st.heading:
        angle = _heading_rotation(src, angle, flipped)
    frac = _uniform(rng, st.scale_range)
    matrix, scale, axis = _placement(src, angle, flipped, frac, width, height, rng)
    labels = cv2.warpAffine(
        src,
        matrix,
        (width, height),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return labels, matrix, scale, axis, angle, flipped


def _light(st: Style, rng) -> tuple[np.ndarray, np.ndarray]:
    """Draw the light: its direction in the picture (x, y) and in 3-D (x, y, z)."""
    if st.light_angle is None:
        light_deg = rng.uniform(0.0, 360.0)
    else:
        light_deg = st.light_angle + rng.normal(0.0, 6.0)
    light_xy = np.array([math.cos(math.radians(light_deg)), -math.sin(math.radians(light_deg))])
    elevation = math.radians(rng.uniform(40, 60))
    light3 = np.array(
        [light_xy[0] * math.cos(elevation), light_xy[1] * math.cos(elevation), math.sin(elevation)]
    )
    return light_xy, light3


def _substrate(st: Style, rng, fg: np.ndarray, light_xy: np.ndarray):
    """Draw the substrate with the specimen's drop shadow on it: (canvas, substrate
    kind, its base colour, the shadow 0..1)."""
    height, width = fg.shape
    kind = st.backgrounds[int(rng.integers(len(st.backgrounds)))]
    if st.background_color is None:
        bg_colour = _draw_background_colour(kind, rng)
    else:
        bg_colour = np.asarray(st.background_color, float) * rng.uniform(0.98, 1.02, 3)
        bg_colour = np.clip(bg_colour, 0, 255)
    canvas = _background(kind, bg_colour, rng, height, width)
    opacity = _uniform(rng, st.shadow_opacity)
    offset = rng.uniform(0.012, 0.03) * min(width, height)
    shadow_sigma = rng.uniform(0.008, 0.02) * min(width, height)
    fg_f = fg.astype(np.float32)
    shadow = _blur(_shift(fg_f, -offset * light_xy[0], -offset * light_xy[1]), shadow_sigma)
    canvas *= (1 - opacity * shadow)[..., None]
    return canvas, kind, bg_colour, shadow


_CLUTTER_MAKERS = {
    "label": _label_patch,
    "pin": _pin_patch,
    "scale_bar": _scale_bar_patch,
    "debris": _debris_patch,
    "fibre": _fibre_patch,
}


def _add_clutter(canvas, st: Style, rng, fg, shadow, bg_colour, light_xy) -> np.ndarray:
    """Place the clutter items on `canvas`, clear of the specimen and its shadow;
    returns the mask of the clutter pixels."""
    height, width = fg.shape
    clutter = np.zeros((height, width), bool)
    if st.clutter and st.clutter_items:
        keepout = cv2.dilate(fg.astype(np.uint8), _disk(6)) > 0
        keepout |= shadow > 0.05
        dark = float(np.mean(bg_colour)) < 110
        for item in st.clutter_items:
            if rng.random() < st.clutter_prob:
                # the extra items come in small numbers; the original ones alone
                copies = int(rng.integers(1, 4)) if item in EXTRA_CLUTTER_ITEMS else 1
                for _ in range(copies):
                    if item == "scale_bar":
                        rgb, alpha = _scale_bar_patch(rng, width, height, dark)
                    else:
                        rgb, alpha = _CLUTTER_MAKERS[item](rng, width, height)
                    _place_patch(canvas, clutter, keepout, rgb, alpha, rng, light_xy)
    return clutter


def render_specimen_layers(
    label_map: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int] = (480, 360),
    style: Style | Mapping | None = None,
) -> Rendering:
    """Render one specimen photo; like `render_specimen` but returns a `Rendering`.

    Uses exactly the same random draws as `render_specimen`, so for the same generator
    state both give the same image and label map.

    Args:
        label_map: H x W part label map (0 background, values of `ALL_PARTS`).
        rng: the generator every random choice comes from.
        size: (width, height) of the photo in pixels.
        style: a `Style`, a dict of its fields, or None for the defaults.

    Returns:
        The `Rendering`: photo, placed label map, clutter mask and the pose drawn.
    """
    st = Style.coerce(style)
    width, height = _check_size(size)
    src = _check_label_map(label_map)
    labels, matrix, scale, axis, angle, flipped = _pose(src, st, rng, width, height)
    fg = labels > 0
    light_xy, light3 = _light(st, rng)
    canvas, kind, bg_colour, shadow = _substrate(st, rng, fg, light_xy)
    clutter = _add_clutter(canvas, st, rng, fg, shadow, bg_colour, light_xy)

    # the beetle on top
    palette = st.palettes[int(rng.integers(len(st.palettes)))]
    beetle = _paint_beetle(labels, axis, palette, st, rng, light3)
    image = np.where(fg[..., None], beetle, canvas)

    # camera
    image *= _illumination(
        rng, height, width, light_xy, _uniform(rng, st.illumination), st.vignette
    )[..., None]
    image *= (1 + rng.normal(0, st.colour_cast, 3)).astype(np.float32)[None, None, :]
    image = _camera(image, rng, st)
    return Rendering(
        image=image,
        labels=labels,
        clutter=clutter,
        matrix=matrix,
        scale=scale,
        angle=float(angle),
        flipped=flipped,
        palette=palette if st.part_colors is None else "custom",
        background=kind,
    )


def _motion_blur(img: np.ndarray, length: float, angle: float) -> np.ndarray:
    """Blur along a line of `length` pixels at `angle` degrees (camera shake)."""
    if length < 1.0:
        return img
    k = int(math.ceil(length)) | 1
    kernel = np.zeros((k, k), np.float32)
    c = (k - 1) / 2
    dx, dy = (
        0.5 * length * math.cos(math.radians(angle)),
        0.5 * length * math.sin(math.radians(angle)),
    )
    shift = 4  # sub-pixel end points
    cv2.line(
        kernel,
        (round((c - dx) * 16), round((c - dy) * 16)),
        (round((c + dx) * 16), round((c + dy) * 16)),
        1.0,
        1,
        cv2.LINE_AA,
        shift,
    )
    kernel /= max(float(kernel.sum()), 1e-6)
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as JPEG at `quality` (what a camera or a re-save leaves)."""
    ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 RGB array
        raise RuntimeError("JPEG encoding failed")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def _camera(image: np.ndarray, rng, st: Style) -> np.ndarray:
    """Blur, sensor noise, 8-bit quantisation and JPEG of a float RGB image in 0..1."""
    image = _blur(image, _uniform(rng, st.blur_sigma))
    if st.motion_blur_prob > 0 and rng.random() < st.motion_blur_prob:
        image = _motion_blur(image, _uniform(rng, st.motion_blur), rng.uniform(0.0, 180.0))
    noise = _uniform(rng, st.noise_sigma) / 255.0
    if noise > 0:
        image = image + noise * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if st.jpeg_quality is not None:
        image = _jpeg(image, int(round(_uniform(rng, st.jpeg_quality))))
    return image


def camera_effects(
    image: np.ndarray, rng: np.random.Generator, style: Style | Mapping | None = None
) -> np.ndarray:
    """Apply a style's camera stage (Gaussian and motion blur, sensor noise, JPEG) to
    an RGB uint8 image, as `render_specimen_layers` does at its end.

    For images rendered without those effects and then transformed (`zoom_crop`), so
    that blur, noise and JPEG blocks keep their size in the final picture.

    Args:
        image: an H x W x 3 uint8 RGB image.
        rng: the generator of the effects.
        style: a `Style`, a dict of its fields, or None for the defaults.

    Returns:
        The H x W x 3 uint8 image with the effects.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(
            f"camera_effects needs an H x W x 3 uint8 image, got {img.shape} {img.dtype}"
        )
    return _camera(img.astype(np.float32) / 255.0, rng, Style.coerce(style))


def without_camera(style: Style | Mapping | None) -> Style:
    """The style with its camera stage (blur, motion blur, noise, JPEG) switched off;
    render with it, transform, then apply `camera_effects` with the original style."""
    return dataclasses.replace(
        Style.coerce(style),
        blur_sigma=(0.0, 0.0),
        noise_sigma=(0.0, 0.0),
        motion_blur_prob=0.0,
        jpeg_quality=None,
    )


def render_specimen(
    label_map: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int] = (480, 360),
    style: Style | Mapping | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one specimen photo from a part label map.

    Args:
        label_map: the specimen's part label map (0 background, values of `ALL_PARTS`).
        rng: the generator all randomness comes from.
        size: (width, height) of the photo.
        style: a `Style` or a dict of its fields, pinning generator settings.

    Returns:
        ``(image, labels)``: an H x W x 3 uint8 RGB photo of the beetle placed on the
        canvas, and the H x W uint8 label map of the parts as placed (0 background,
        1..5 as in PARTS): the exact ground truth of the photo.
    """
    r = render_specimen_layers(label_map, rng, size=size, style=style)
    return r.image, r.labels


# ---------------------------------------------------------------------------------
# collections
# ---------------------------------------------------------------------------------


def collection_style(style: Style | Mapping | None, rng: np.random.Generator) -> Style:
    """Pin the settings that stay fixed across one collection (one lab's photo series).

    Substrate kind and colour and the light direction are chosen once (unless the
    caller pinned them); illumination, blur and noise ranges shrink to a narrow band
    inside the caller's range.

    Args:
        style: a `Style`, a dict of its fields, or None for the defaults.
        rng: the collection's generator.

    Returns:
        The collection's `Style`.
    """
    st = Style.coerce(style)
    kind = st.backgrounds[int(rng.integers(len(st.backgrounds)))]
    colour = st.background_color or _draw_background_colour(kind, rng)
    light = st.light_angle if st.light_angle is not None else float(rng.uniform(0, 360))

    def narrow(span, keep=0.3):
        lo, hi = span
        width = (hi - lo) * keep
        start = lo + rng.uniform(0, 1) * (hi - lo - width)
        return (start, start + width)

    return dataclasses.replace(
        st,
        backgrounds=(kind,),
        background_color=colour,
        light_angle=light,
        illumination=narrow(st.illumination),
        blur_sigma=narrow(st.blur_sigma),
        noise_sigma=narrow(st.noise_sigma),
    )


# ---------------------------------------------------------------------------------
# domain-randomised appearance and zoomed crops (training data)
# ---------------------------------------------------------------------------------

_XYZ_TO_LINEAR_RGB = np.array(
    [
        [3.2404542, -1.5371385, -0.4985314],
        [-0.9692660, 1.8760108, 0.0415560],
        [0.0556434, -0.2040259, 1.0572252],
    ]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def _lab_to_srgb(lab) -> np.ndarray:
    """CIE L*a*b* (D65) to sRGB in 0..1, not clipped (values outside are out of gamut)."""
    lab = np.asarray(lab, np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    d = 6.0 / 29.0
    xyz = np.where(f > d, f**3, 3 * d * d * (f - 4.0 / 29.0)) * _WHITE_D65
    lin = xyz @ _XYZ_TO_LINEAR_RGB.T
    return np.where(
        lin <= 0.0031308, 12.92 * lin, 1.055 * np.abs(lin) ** (1 / 2.4) * np.sign(lin) - 0.055
    )


def _lch_to_rgb(lightness: float, chroma: float, hue: float) -> tuple[int, int, int]:
    """An sRGB colour (0-255) of CIE lightness L* and hue angle `hue` (degrees), with the
    chroma lowered as far as needed to lie inside the sRGB gamut (L* and hue kept)."""
    h = math.radians(hue)
    for _ in range(60):
        rgb = _lab_to_srgb([lightness, chroma * math.cos(h), chroma * math.sin(h)])
        if rgb.min() >= -0.002 and rgb.max() <= 1.002:
            break
        chroma *= 0.9
    else:
        rgb = _lab_to_srgb([lightness, 0.0, 0.0])
    return tuple(int(v) for v in np.clip(np.round(rgb * 255.0), 0, 255))


def lightness(rgb) -> np.ndarray:
    """CIE L* (0-100) of sRGB colours given as 0-255 values, shape (..., 3)."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = lin @ np.array([0.2126729, 0.7151522, 0.0721750])
    return np.where(y > (6 / 29) ** 3, 116.0 * np.cbrt(y) - 16.0, y * (29 / 3) ** 3)


#: The substrate kinds drawn by `randomised_style`: all but ``slate``, whose texture
#: stays unseen in training (dark grounds come from the random colours instead).
RANDOMISED_BACKGROUNDS = ("paper", "foam", "gradient", "card", "noise", "stripes")


#: Low-contrast draws of `randomised_style`: every part's L* within this many units of
#: the ground's (on one side of it), and at least `LOW_CONTRAST_MIN_DELTA_E` from the
#: ground in CIE L*a*b* (told apart by hue, chroma or a little lightness).
LOW_CONTRAST_MAX_DELTA_L = 22.0
LOW_CONTRAST_MIN_DELTA_E = 15.0


def _lab(rgb) -> np.ndarray:
    """CIE L*a*b* (D65) of an sRGB colour given as 0-255 values."""
    pixel = np.asarray(rgb, np.float32).reshape(1, 1, 3) / 255.0
    return cv2.cvtColor(pixel, cv2.COLOR_RGB2Lab)[0, 0].astype(np.float64)


def _randomised_colours(rng: np.random.Generator, low_contrast: bool = False):
    """Draw the ground colour and the five part colours of `randomised_style`:
    ``(ground, part_colors)``, (R, G, B) tuples. With `low_contrast`, the parts' L*
    lies within `LOW_CONTRAST_MAX_DELTA_L` of the ground's instead of 25 or more away."""
    if low_contrast:  # a dark beetle on dark foam: lightness nearly the ground's
        ground_l = rng.uniform(8.0, 85.0)
        darker = bool(rng.random() < 0.5)
        if darker and ground_l < 12.0 or not darker and ground_l > 80.0:
            darker = not darker
        lo, hi = (
            (max(3.0, ground_l - LOW_CONTRAST_MAX_DELTA_L), ground_l - 2.0)
            if darker
            else (ground_l + 2.0, min(97.0, ground_l + LOW_CONTRAST_MAX_DELTA_L))
        )
    elif rng.random() < 0.5:  # a light specimen on a dark ground
        ground_l = rng.uniform(4.0, 45.0)
        lo, hi = ground_l + 25.0, 97.0
    else:
        ground_l = rng.uniform(55.0, 97.0)
        lo, hi = 3.0, ground_l - 25.0

    def chroma():
        return rng.uniform(0.0, 10.0) if rng.random() < 0.3 else rng.uniform(10.0, 110.0)

    ground = _lch_to_rgb(ground_l, chroma(), rng.uniform(0.0, 360.0))
    ground_lab = _lab(ground)

    def visible(draw):  # low contrast: redraw until the colour stands apart from the ground
        lch = draw()
        for _ in range(30 if low_contrast else 0):
            if np.linalg.norm(_lab(_lch_to_rgb(*lch)) - ground_lab) >= LOW_CONTRAST_MIN_DELTA_E:
                break
            lch = draw()
        else:
            if low_contrast:  # the far end of the band, grey: lightness alone sets it apart
                lch = (lo if darker else hi, 0.0, 0.0)
        return lch

    def colour():  # (L, C, h) inside the specimen's lightness band
        return visible(lambda: (rng.uniform(lo, hi), chroma(), rng.uniform(0.0, 360.0)))

    def near(lch):  # the same colour, a little changed
        lum, c, h = lch
        return visible(
            lambda: (
                float(np.clip(lum + rng.uniform(-6, 6), lo, hi)),
                c * rng.uniform(0.8, 1.2),
                h + rng.uniform(-12, 12),
            )
        )

    body = colour()
    mode = rng.random()
    if mode < 0.5:  # one body colour
        head, pronotum, elytra = near(body), near(body), near(body)
    elif mode < 0.75:  # fore body and elytra differ
        fore = colour()
        head, pronotum, elytra = near(fore), near(fore), body
    else:  # every part its own colour
        head, pronotum, elytra = colour(), colour(), body
    if rng.random() < 0.5:
        antenna = near(body)
        legs = near(antenna)
    else:
        antenna = colour()
        legs = near(antenna) if rng.random() < 0.5 else colour()
    part_colors = tuple(_lch_to_rgb(*c) for c in (head, pronotum, elytra, antenna, legs))

    return ground, part_colors


def randomised_style(
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.25, 0.95),
    low_contrast: bool = False,
) -> Style:
    """A domain-randomised `Style` for one episode (one collection's look).

    Over many draws: the contrast sign is a coin flip, a light specimen (L* of every
    part at least 25 above the ground's, ground L* 4-45) as often as a dark one (every
    part at least 25 below, ground L* 55-97); ground and part colours are drawn in CIE
    LCh with uniform hue and chroma from neutral to as saturated as sRGB allows; the
    head, pronotum and elytra share one colour (about half the draws), or the fore body
    differs from the elytra, or every part has its own; legs and antennae take the
    body's colour or one of their own. The substrate is any kind of
    `RANDOMISED_BACKGROUNDS` (value-noise and stripe textures included), clutter
    includes debris and fibres, and lighting gradient, vignetting, colour cast,
    shadow, gloss, Gaussian or motion blur, sensor noise and JPEG quality (40-95) get
    wide ranges, drawn again for each image. ``scale_range`` is the fraction of the
    canvas's shorter side filled by the specimen's longest extent. With
    ``low_contrast``, the specimen's lightness is instead close to the ground's (every
    part's L* 2-22 units to one side of it; ground L* 8-85) and every part at least 15
    from the ground in L*a*b*: told apart by hue and chroma, as a metallic blue beetle on
    dark slate or a brown one on cork.

    The colours, the substrate kind and the light direction are pinned, so the images
    rendered with the returned style show one specimen look, as one collection does.

    Args:
        rng: the generator every random choice comes from.
        scale_range: the style's ``scale_range``.
        low_contrast: draw the colours of a specimen about as light as its ground.

    Returns:
        The `Style`.
    """
    ground, part_colors = _randomised_colours(rng, low_contrast)
    return Style(
        palettes=DEFAULT_PALETTES,  # with pinned part colours a palette sets the gloss only
        backgrounds=(RANDOMISED_BACKGROUNDS[int(rng.integers(len(RANDOMISED_BACKGROUNDS)))],),
        background_color=ground,
        light_angle=float(rng.uniform(0.0, 360.0)),
        clutter=True,
        clutter_items=CLUTTER_ITEMS + EXTRA_CLUTTER_ITEMS,
        clutter_prob=float(rng.uniform(0.15, 0.7)),
        scale_range=scale_range,
        textures=tuple(t for t in TEXTURES if rng.random() < 0.75),
        illumination=(0.0, float(rng.uniform(0.05, 0.3))),
        vignette=(0.0, float(rng.uniform(0.02, 0.25))),
        shadow_opacity=(0.0, float(rng.uniform(0.1, 0.6))),
        gloss=float(rng.uniform(0.0, 2.0)),
        blur_sigma=(0.0, float(rng.uniform(0.3, 1.8))),
        noise_sigma=(0.0, float(rng.uniform(1.0, 12.0))),
        motion_blur=(2.0, float(rng.uniform(3.0, 10.0))),
        motion_blur_prob=0.25,
        jpeg_quality=(40.0, 95.0),
        colour_cast=float(rng.uniform(0.0, 0.06)),
        part_colors=part_colors,
    )


def zoom_crop(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    part: int,
    fill: float,
    size: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[float, float, float, float]]]:
    """Crop frames (templates and targets alike) around one part and resize them.

    For every frame, a window of the output's aspect ratio is placed at a random
    position that contains the whole of ``part`` (1..5 as in PARTS, or 0 for the whole
    specimen), sized so that the part's bounding box spans ``fill`` (0 < fill <= 1) of
    the frame along its tighter side: ``max(part width / frame width, part height /
    frame height) == fill``. Each frame gets its own window (the part moves between
    frames), all with the same rule. The window is mapped to ``size`` = (width, height):
    the image with bilinear interpolation (smoothed first: against aliasing where it
    shrinks, by half a pixel where it grows, so pixel steps do not show), the label
    map with nearest-neighbour through the same map, so it stays the exact ground truth.
    Windows reaching past the image repeat its edge pixels in both. Windows stay inside
    the image whenever they fit.

    Args:
        images, labels: the frames and their label maps, the same sizes pairwise.
        part, fill, size: see above.
        rng: the generator of the windows' positions.

    Returns:
        ``(images, labels, windows)``, a window being (x, y, width, height) in source
        pixels, (0, 0) the top-left corner of the top-left pixel.
    """
    out_w, out_h = _check_size(size)
    part, fill = _check_zoom(images, labels, part, fill)
    out_images, out_labels, windows = [], [], []
    for i, (img, lab) in enumerate(zip(images, labels)):
        img, lab = np.asarray(img), np.asarray(lab)
        if img.shape[:2] != lab.shape:
            raise InputError(
                f"zoom_crop: frame {i}: image {img.shape[:2]} and labels {lab.shape} differ in size"
            )
        mask = lab > 0 if part == 0 else lab == part
        if not mask.any():
            raise InputError(f"zoom_crop: frame {i} does not show part {part}")
        window = _zoom_window(mask, fill, out_w / out_h, rng)
        crop, crop_labels = _warp_window(img, lab, window, out_w, out_h)
        out_images.append(crop)
        out_labels.append(crop_labels)
        windows.append(window)
    return out_images, out_labels, windows


def _check_zoom(images, labels, part, fill) -> tuple[int, float]:
    """Check `zoom_crop`'s part, fill and frame count; returns (part, fill)."""
    if isinstance(part, bool) or int(part) != part or not 0 <= int(part) <= max(ALL_PARTS):
        raise InputError(
            f"zoom_crop: part must be 0 (whole specimen) or one of {sorted(ALL_PARTS)}, got {part!r}"
        )
    part = int(part)
    fill = float(fill)
    if not 0.0 < fill <= 1.0:
        raise InputError(f"zoom_crop: fill must be in (0, 1], got {fill}")
    if len(images) != len(labels) or not len(images):
        raise InputError("zoom_crop: needs as many label maps as images, at least one")
    return part, fill


def _zoom_window(mask: np.ndarray, fill: float, aspect: float, rng):
    """A random window (x, y, width, height) of the aspect ratio `aspect` that holds
    all of `mask`, its bounding box spanning `fill` of it (see `zoom_crop`)."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    x_lo, x_hi, y_lo, y_hi = xs.min(), xs.max() + 1.0, ys.min(), ys.max() + 1.0
    cw = max((x_hi - x_lo) / fill, (y_hi - y_lo) * aspect / fill)
    ch = cw / aspect

    def place(lo, hi, window, extent):
        a, b = hi - window, lo  # every start that keeps the part inside
        if window <= extent:
            a, b = max(a, 0.0), min(b, extent - window)
        else:
            a, b = max(a, extent - window), min(b, 0.0)
        return float(rng.uniform(a, b)) if b > a else float(a)

    x0, y0 = place(x_lo, x_hi, cw, width), place(y_lo, y_hi, ch, height)
    return (x0, y0, cw, ch)


def _warp_window(img: np.ndarray, lab: np.ndarray, window, out_w: int, out_h: int):
    """The image (smoothed, bilinear) and label map (nearest) of a window, resized to
    out_w x out_h; edge pixels repeat past the image."""
    x0, y0, cw, ch = window
    sx, sy = out_w / cw, out_h / ch
    m = np.array([[sx, 0.0, (0.5 - x0) * sx - 0.5], [0.0, sy, (0.5 - y0) * sy - 0.5]])
    shrink = min(sx, sy)
    if shrink < 1.0:  # anti-aliasing
        src = _blur(img.astype(np.float32), 0.5 * math.sqrt(1.0 / shrink**2 - 1.0))
    else:  # enlarged: soften the pixel steps of hard edges a little
        src = _blur(img.astype(np.float32), 0.5)
    crop = cv2.warpAffine(
        src, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    if crop.dtype != img.dtype:
        crop = np.clip(np.round(crop), 0, 255).astype(img.dtype)
    crop_labels = cv2.warpAffine(
        lab, m, (out_w, out_h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE
    )
    return crop, crop_labels


def _select_masks(mask_names: Sequence[str] | None) -> list[tuple[str, np.ndarray]]:
    masks = list(_load_masks_cached())
    if mask_names is None:
        return masks
    if isinstance(mask_names, str):
        mask_names = [mask_names]
    by_name = dict(masks)
    unknown = [n for n in mask_names if n not in by_name]
    if unknown:
        raise InputError(
            f"unknown beetle mask name(s) {unknown[:5]}; names look like 'advena/beetle_100_475'"
        )
    names = sorted(set(mask_names))
    if not names:
        raise InputError("mask_names is empty")
    return [(n, by_name[n]) for n in names]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def iter_collection(
    n_images: int = 16,
    seed: int = 0,
    size: tuple[int, int] = (480, 360),
    style: Style | Mapping | None = None,
    mask_names: Sequence[str] | None = None,
    shapes: Sequence[tuple[str, np.ndarray]] | None = None,
) -> Iterator[tuple[str, Rendering]]:
    """Yield ``(mask_name, Rendering)`` for each image of a collection, in order.

    This is what `make_collection` writes, without touching the disk. The collection
    settings and the mask order come from ``seed``; image ``i`` has its own random
    stream, so the first k images of a collection do not depend on ``n_images``.
    Masks are used in a seeded permutation, cycling when ``n_images`` exceeds them.

    Args:
        n_images: the number of images.
        seed: the collection's seed (a non-negative integer).
        size: (width, height) of the photos.
        style: a `Style`, a dict of its fields, or None for the defaults (the
            collection's own settings are drawn inside it, `collection_style`).
        mask_names: restricts the beetle masks used (names as in `load_beetle_masks`).
        shapes: (name, label map) pairs to draw instead of the beetle masks (e.g.
            procedural insects, whose eyes and scapes become categories 6 and 7).

    Returns:
        An iterator of ``(mask_name, Rendering)``.
    """
    seed = _check_seed(seed)
    if int(n_images) < 1:
        raise InputError(f"n_images must be at least 1, got {n_images}")
    _check_size(size)
    if shapes is not None and mask_names is not None:
        raise InputError("give mask_names or shapes, not both")
    masks = (
        _select_masks(mask_names)
        if shapes is None
        else [(str(n), _check_label_map(m)) for n, m in shapes]
    )
    if not masks:
        raise InputError("shapes: no label maps given")
    coll_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    order = coll_rng.permutation(len(masks))
    st = collection_style(style, coll_rng)
    for i in range(int(n_images)):
        name, label_map = masks[int(order[i % len(masks)])]
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i + 1,)))
        yield name, render_specimen_layers(label_map, rng, size=size, style=st)


def _coco(
    images: list[dict], annotations: list[dict], description: str, parts: Mapping = PARTS
) -> dict:
    return {
        "info": {"description": description, "generator": "sam2pal.synth.specimens"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k, "name": name, "supercategory": "beetle"} for k, name in parts.items()
        ],
    }


def _parts_of(shapes) -> dict[int, str]:
    """The categories of a collection: PARTS, and the extra parts its shapes have."""
    if shapes is None:
        return dict(PARTS)
    return {
        k: v
        for k, v in ALL_PARTS.items()
        if k in PARTS or any((np.asarray(m) == k).any() for _, m in shapes)
    }


_README = """\
# Synthetic specimen collection

{n_images} synthetic beetle specimen photos ({width} x {height} px, JPEG quality {quality}),
rendered by `sam2pal.synth.specimens.make_collection` (seed {seed}) from real part masks of
ground beetles: each photo is one real label map placed with a random pose on a
painted substrate, coloured, textured and lit procedurally. The masks used are
listed per image (`source_mask`) in `ground_truth.json`.

- `images/`: the photos, `specimen_000.jpg` ...
- `templates.json`: COCO annotations (compressed RLE) of the first {n_templates} images,
  the annotated templates to propagate from;
- `ground_truth.json`: the same COCO structure for all {n_images} images (templates
  included), the exact part masks of every photo.

Categories: {categories}.

Regenerate with (OUT_DIR being this folder):

    sam2pal make-demo OUT_DIR --n-images {n_images} --n-templates {n_templates} --seed {seed}

(the same as `sam2pal.synth.specimens.make_collection(OUT_DIR, n_images={n_images},
n_templates={n_templates}, seed={seed}, size=({width}, {height}))`{style_note}).

The beetle masks are the NEON Beetle Part Masks, MIT licence (copyright 2025
Imageomics Institute), published with "Static Segmentation by Tracking" (Feng et al.,
2025, arXiv 2501.06749); the masks were drawn on the 2018 NEON Ethanol-preserved
Ground Beetles data set (doi 10.57967/hf/5252). Please cite both if you use these
images in a publication.
"""


def _check_collection(n_images, n_templates, jpeg_quality, size, style):
    """Check a collection's settings: (n_images, n_templates, (width, height), Style)."""
    n_images = int(n_images)
    n_templates = int(n_templates)
    if n_images < 1:
        raise InputError(f"n_images must be at least 1, got {n_images}")
    if not 0 <= n_templates <= n_images:
        raise InputError(
            f"n_templates must be between 0 and n_images ({n_images}), got {n_templates}"
        )
    if not 1 <= int(jpeg_quality) <= 100:
        raise InputError(f"jpeg_quality must be 1..100, got {jpeg_quality}")
    return n_images, n_templates, _check_size(size), Style.coerce(style)


def _write_images(renders, images_dir: Path, size, jpeg_quality: int, parts: Mapping):
    """Write the photos of ``(mask name, Rendering)`` pairs as ``specimen_000.jpg`` ...;
    returns their COCO images, the annotations of their `parts`, and their paths."""
    width, height = size
    coco_images, annotations, paths = [], [], []
    for i, (name, r) in enumerate(renders):
        file_name = f"specimen_{i:03d}.jpg"
        path = images_dir / file_name
        with atomic_path(path) as tmp:
            Image.fromarray(r.image).save(
                tmp, format="JPEG", quality=int(jpeg_quality), optimize=True
            )
        paths.append(path)
        image_id = i + 1
        coco_images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": width,
                "height": height,
                "source_mask": name,
            }
        )
        annotations += _part_annotations(r.labels, image_id, len(annotations) + 1, parts)
    return coco_images, annotations, paths


def _remove_stale(images_dir: Path, written: set[str]) -> None:
    """Remove the ``specimen_*.jpg`` files of an earlier collection not in `written`."""
    for stale in images_dir.glob("specimen_*.jpg"):
        if re.fullmatch(r"specimen_\d{3,}\.jpg", stale.name) and stale.name not in written:
            stale.unlink()


def _write_readme(path: Path, fields: Mapping, parts: Mapping, how) -> Path:
    """Write a collection's README: `fields` fill in `_README`; `how` (style,
    mask_names, shapes) says how it was made when not from the defaults."""
    style, mask_names, shapes = how
    style_note = "" if style is None else ", with a custom style"
    if mask_names is not None:
        style_note += ", from a chosen subset of the masks"
    if shapes is not None:
        style_note += ", from given label maps instead of the beetle masks"
    categories = ", ".join(f"{k} {v}" for k, v in parts.items())
    with atomic_write(path) as fh:
        fh.write(_README.format(**fields, style_note=style_note, categories=categories))
    return path


def _write_truth(out: Path, coco_images, annotations, n_templates, seed, parts):
    """Write a collection's ground truth and its templates' (the first `n_templates`
    images) as COCO files; returns their paths and the number of template annotations."""
    gt_path, tpl_path = out / "ground_truth.json", out / "templates.json"
    template_ids = {img["id"] for img in coco_images[:n_templates]}
    template_anns = [a for a in annotations if a["image_id"] in template_ids]
    description = f"synthetic specimens, seed {seed}"
    ground_truth = _coco(coco_images, annotations, f"{description}: ground truth", parts)
    templates = _coco(coco_images[:n_templates], template_anns, f"{description}: templates", parts)
    write_json(gt_path, ground_truth, indent=1)
    write_json(tpl_path, templates, indent=1)
    return gt_path, tpl_path, len(template_anns)


def make_collection(
    out_dir,
    n_images: int = 16,
    n_templates: int = 2,
    seed: int = 0,
    size: tuple[int, int] = (480, 360),
    jpeg_quality: int = 92,
    style: Style | Mapping | None = None,
    mask_names: Sequence[str] | None = None,
    shapes: Sequence[tuple[str, np.ndarray]] | None = None,
) -> dict:
    """Write a synthetic specimen collection to ``out_dir`` and return what was written.

    Writes, each atomically, ``images/specimen_000.jpg`` ..., ``ground_truth.json``
    (COCO: a compressed-RLE annotation per visible part of every image), ``templates.json``
    (the same for the first ``n_templates`` images) and ``README.md``; ``specimen_*.jpg``
    files of an earlier, larger collection are removed (the folder matches the truth).

    Args:
        out_dir: the collection's folder (created if needed).
        n_images, n_templates, seed, size, style, mask_names, shapes: as in
            `iter_collection`; the first ``n_templates`` images are the templates.
        jpeg_quality: JPEG quality of the photos, 1..100.

    Returns:
        A dict of the paths ``out_dir``, ``images_dir``, ``images`` (a list), ``templates``,
        ``ground_truth``, ``readme`` and the counts ``n_images``, ``n_templates``,
        ``n_annotations``, ``n_template_annotations``.
    """
    n_images, n_templates, (width, height), st = _check_collection(
        n_images, n_templates, jpeg_quality, size, style
    )
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    parts = _parts_of(shapes)  # PARTS and any extra part the shapes have
    renders = iter_collection(
        n_images, seed=seed, size=(width, height), style=st, mask_names=mask_names, shapes=shapes
    )
    coco_images, annotations, paths = _write_images(
        renders, images_dir, (width, height), jpeg_quality, parts
    )
    _remove_stale(images_dir, {p.name for p in paths})
    gt_path, tpl_path, n_template_anns = _write_truth(
        out, coco_images, annotations, n_templates, seed, parts
    )
    fields = dict(n_images=n_images, n_templates=n_templates, seed=seed, width=width, height=height)
    fields["quality"] = int(jpeg_quality)
    readme_path = _write_readme(out / "README.md", fields, parts, (style, mask_names, shapes))
    return {
        "out_dir": out,
        "images_dir": images_dir,
        "images": paths,
        "templates": tpl_path,
        "ground_truth": gt_path,
        "readme": readme_path,
        "n_images": n_images,
        "n_templates": n_templates,
        "n_annotations": len(annotations),
        "n_template_annotations": n_template_anns,
    }


# ---------------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------------

#: SeedSequence spawn key of the video streams; collections use (0,) and (i + 1,)
_VIDEO_KEY = 0x5649


def _video_rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_VIDEO_KEY, stream)))


def _hull_corners(labels: np.ndarray) -> np.ndarray:
    """Pixel corners of the convex hull of the foreground, (N, 2) x/y: for bounds checks."""
    ys, xs = np.nonzero(labels)
    hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.float32)).reshape(-1, 2)
    pixel = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    return (hull.astype(np.float64)[:, None, :] + pixel).reshape(-1, 2)


def _body_angle(labels: np.ndarray) -> float:
    """Direction (radians) of the long axis of the specimen's foreground."""
    ys, xs = np.nonzero(labels)
    coords = np.stack([xs, ys], axis=1).astype(np.float64)
    coords -= coords.mean(axis=0)
    _, vecs = np.linalg.eigh(coords.T @ coords)
    return math.atan2(vecs[1, -1], vecs[0, -1])


@dataclass(frozen=True)
class _Motion:
    """Smooth motion of the specimen over a clip: turn, drift, breathing stretch."""

    centre: np.ndarray  # x, y of the specimen at frame 0
    target: np.ndarray  # where the drift takes the centre by the last frame
    degrees_per_frame: float
    stretch: float  # amplitude of the anisotropic scale
    period: float  # frames per stretch cycle
    axis: float  # body axis (radians) along which the stretch acts
    n_frames: int

    def matrix(self, t: int, damp: float = 1.0) -> np.ndarray:
        """2 x 3 map from frame-0 canvas pixels to frame `t` (the identity at t = 0)."""
        progress = t / max(self.n_frames - 1, 1)
        theta = math.radians(self.degrees_per_frame * t * damp)
        wave = math.sin(2 * math.pi * t / self.period) * self.stretch * damp
        c, s = math.cos(self.axis), math.sin(self.axis)
        body = np.array([[c, -s], [s, c]])
        stretch = body @ np.diag([1 + wave, 1 - 0.5 * wave]) @ body.T
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        lin = rot @ stretch
        moved = self.centre + (self.target - self.centre) * progress * damp
        shift = moved - lin @ self.centre
        return np.hstack([lin, shift[:, None]])


def _video_motion(
    labels: np.ndarray, n_frames: int, rng, width: int, height: int, margin: float = 3.0
) -> tuple[_Motion, float]:
    """Draw a motion, and the largest damping (<= 1) that keeps the specimen in frame."""
    corners = _hull_corners(labels)
    centre = (corners.min(axis=0) + corners.max(axis=0)) / 2.0
    middle = np.array([width / 2.0, height / 2.0])
    jitter = rng.uniform(-0.08, 0.08, 2) * np.array([width, height])
    # head for (about) the middle of the frame; never stand still, so that every
    # frame's ground truth differs from its neighbours' (a shifted frame id shows)
    target = middle + jitter
    if np.linalg.norm(target - centre) < 1.5 * (n_frames - 1):
        angle = rng.uniform(0, 2 * math.pi)
        target = centre + 1.5 * (n_frames - 1) * np.array([math.cos(angle), math.sin(angle)])
        target = np.clip(
            target,
            middle - 0.2 * np.array([width, height]),
            middle + 0.2 * np.array([width, height]),
        )
    motion = _Motion(
        centre=centre,
        target=target,
        degrees_per_frame=float(rng.choice([-1.0, 1.0]) * rng.uniform(2.0, 4.0)),
        stretch=float(rng.uniform(0.04, 0.08)),
        period=float(rng.uniform(12.0, 20.0)),
        axis=_body_angle(labels),
        n_frames=n_frames,
    )
    lo = np.array([margin - 0.5, margin - 0.5])
    hi = np.array([width - 0.5 - margin, height - 0.5 - margin])
    for damp in (1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05, 0.0):
        inside = True
        for t in range(n_frames):
            m = motion.matrix(t, damp)
            q = corners @ m[:, :2].T + m[:, 2]
            if (q < lo).any() or (q > hi).any():
                inside = False
                break
        if inside:
            return motion, damp
    return motion, 0.0  # unreachable: damp 0 is the frame-0 pose, placed inside


def _fill_outside(image: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Give every background pixel the colour of the nearest foreground pixel.

    Bilinear warping of the specimen then never mixes substrate colour into its edge.
    """
    _, index = cv2.distanceTransformWithLabels(
        (~fg).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    ys, xs = np.nonzero(fg)
    lut_y = np.zeros(index.max() + 1, np.int64)
    lut_x = np.zeros(index.max() + 1, np.int64)
    lut_y[index[ys, xs]] = ys
    lut_x[index[ys, xs]] = xs
    return image[lut_y[index], lut_x[index]]


def _video_coco_image(
    t: int, image_id: int, fps: float, width: int, height: int, name: str
) -> dict:
    return {
        "id": image_id,
        "file_name": f"{t:05d}.jpg",
        "width": width,
        "height": height,
        "frame_index": t,
        "time_s": round(t / fps, 6),
        "source_mask": name,
    }


def _part_annotations(
    labels: np.ndarray, image_id: int, first_id: int, parts: Mapping = PARTS
) -> list[dict]:
    """COCO annotations (ids from `first_id`) of the `parts` visible in a label map."""
    anns = []
    for k in parts:
        mask = labels == k
        if mask.any():
            anns.append(
                {
                    "id": first_id + len(anns),
                    "image_id": image_id,
                    "category_id": k,
                    "segmentation": encode_rle(mask),
                    "area": int(mask.sum()),
                    "bbox": mask_bbox(mask),
                    "iscrowd": 0,
                }
            )
    return anns


def render_video_frames(
    n_frames: int = 24,
    seed: int = 0,
    size: tuple[int, int] = (320, 240),
    mask_name: str | None = None,
) -> tuple[str, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """Render a clip of one moving specimen: ``(mask_name, iterator of (image, labels))``.

    The specimen is rendered once (`render_specimen_layers`, its pose is frame 0) on a
    substrate drawn separately, then frame ``t`` warps it with a smooth affine map: a
    turn of 2-4 degrees per frame, a drift towards the middle of the frame, and a
    stretch along the body axis that swells and shrinks (the deformation). The label
    map is warped with nearest-neighbour interpolation and is the exact ground truth;
    the motion is damped when needed so that the specimen stays fully inside every
    frame. A drop shadow follows the specimen; illumination, blur and fresh sensor
    noise are applied per frame, as a camera would.

    Args:
        n_frames: the clip's length.
        seed: its seed (a non-negative integer).
        size: (width, height) of the frames.
        mask_name: the beetle mask to use; None draws one showing all five parts.

    Returns:
        ``(mask_name, iterator of (RGB uint8 image, uint8 label map))``.
    """
    seed = _check_seed(seed)
    n_frames = int(n_frames)
    if n_frames < 1:
        raise InputError(f"n_frames must be at least 1, got {n_frames}")
    width, height = _check_size(size)
    name, label_map = _video_specimen(seed, mask_name)
    st = collection_style(None, _video_rng(seed, 1))
    pose = dataclasses.replace(
        st,
        clutter=False,
        shadow_opacity=(0.0, 0.0),
        illumination=(0.0, 0.0),
        blur_sigma=(0.0, 0.0),
        noise_sigma=(0.0, 0.0),
        scale_range=(0.4, 0.45),
    )
    r = render_specimen_layers(label_map, _video_rng(seed, 2), size=(width, height), style=pose)
    beetle = _fill_outside(r.image.astype(np.float32) / 255.0, r.labels > 0)
    rng = _video_rng(seed, 3)
    motion, damp = _video_motion(r.labels, n_frames, rng, width, height)
    scene = _video_scene(st, rng, width, height)

    def frames() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        noise_rng = _video_rng(seed, 4)
        for t in range(n_frames):
            m = motion.matrix(t, damp).astype(np.float64)
            yield scene.frame(r.labels, beetle, m, noise_rng)

    return name, frames()


def _video_specimen(seed: int, mask_name: str | None) -> tuple[str, np.ndarray]:
    """The (name, label map) of a clip's specimen: `mask_name`'s, or for None one drawn
    from the masks that show all five parts."""
    if mask_name is None:
        masks = [(n, m) for n, m in _load_masks_cached() if set(np.unique(m)) == {0, *PARTS}]
        return masks[int(_video_rng(seed, 0).integers(len(masks)))]
    return _select_masks([mask_name])[0]


@dataclass(frozen=True)
class _VideoScene:
    """What stays fixed over a clip around the moving specimen: substrate, shadow,
    illumination, blur and noise level."""

    substrate: np.ndarray
    light_xy: np.ndarray
    opacity: float
    offset: float
    shadow_sigma: float
    illumination: np.ndarray
    blur: float
    noise: float

    def frame(self, labels0, beetle, m, noise_rng) -> tuple[np.ndarray, np.ndarray]:
        """The (RGB uint8 image, label map) of the specimen `labels0` coloured `beetle`
        (frame 0) moved by the 2 x 3 map `m`, with fresh sensor noise from `noise_rng`."""
        height, width = labels0.shape
        labels = cv2.warpAffine(
            labels0,
            m,
            (width, height),
            flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        colour = cv2.warpAffine(
            beetle, m, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        fg = labels > 0
        light_xy, offset = self.light_xy, self.offset
        shadow = _blur(
            _shift(fg.astype(np.float32), -offset * light_xy[0], -offset * light_xy[1]),
            self.shadow_sigma,
        )
        image = self.substrate * (1 - self.opacity * shadow)[..., None]
        image = np.where(fg[..., None], colour, image) * self.illumination[..., None]
        image = _blur(image, self.blur)
        if self.noise > 0:
            image = image + self.noise * noise_rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), labels


def _video_scene(st: Style, rng, width: int, height: int) -> _VideoScene:
    """Draw a clip's `_VideoScene` in the collection style `st`."""
    substrate = _background(st.backgrounds[0], st.background_color, rng, height, width)
    light = math.radians(st.light_angle)
    light_xy = np.array([math.cos(light), -math.sin(light)])
    opacity = _uniform(rng, st.shadow_opacity)
    offset = rng.uniform(0.012, 0.03) * min(width, height)
    shadow_sigma = rng.uniform(0.008, 0.02) * min(width, height)
    illumination = _illumination(rng, height, width, light_xy, _uniform(rng, st.illumination))
    blur = _uniform(rng, st.blur_sigma)
    noise = _uniform(rng, st.noise_sigma) / 255.0
    return _VideoScene(
        substrate, light_xy, opacity, offset, shadow_sigma, illumination, blur, noise
    )


def _check_video(size, n_frames, fps, keyframes) -> tuple[int, int, int, list[int]]:
    """Check a clip's settings: (width, height, n_frames, sorted keyframe indices)."""
    width, height = _check_size(size)
    if width % 2 or height % 2:
        raise InputError(f"video size must be even (yuv420p), got {width} x {height}")
    n_frames = int(n_frames)
    if n_frames < 1:
        raise InputError(f"n_frames must be at least 1, got {n_frames}")
    if (
        isinstance(fps, bool)
        or not isinstance(fps, (int, float))
        or not math.isfinite(fps)
        or fps <= 0
    ):
        raise InputError(f"fps must be a positive number, got {fps!r}")
    try:
        keys = sorted({int(k) for k in keyframes})
    except (TypeError, ValueError):
        raise InputError(f"keyframes must be frame indices, got {keyframes!r}") from None
    if not keys or keys[0] < 0 or keys[-1] >= n_frames:
        raise InputError(
            f"keyframes must be frame indices in 0..{n_frames - 1}, got {list(keyframes)!r}"
        )
    return width, height, n_frames, keys


def _write_video_truth(out: Path, labels, keys, fps, size, name: str, seed: int):
    """Write a clip's ``ground_truth.json`` (every frame) and ``keyframes.json`` (the
    `keys` frames, image ids 1000 + frame index); returns their paths."""
    width, height = size
    gt_images, gt_anns, kf_images, kf_anns = [], [], [], []
    for t, lab in enumerate(labels):
        gt_images.append(_video_coco_image(t, t, fps, width, height, name))
        gt_anns += _part_annotations(lab, t, len(gt_anns) + 1)
        if t in keys:
            kf_images.append(_video_coco_image(t, 1000 + t, fps, width, height, name))
            kf_anns += _part_annotations(lab, 1000 + t, len(kf_anns) + 1)
    gt_path, kf_path = out / "ground_truth.json", out / "keyframes.json"
    write_json(
        gt_path, _coco(gt_images, gt_anns, f"synthetic video, seed {seed}: ground truth"), indent=1
    )
    write_json(
        kf_path, _coco(kf_images, kf_anns, f"synthetic video, seed {seed}: keyframes"), indent=1
    )
    return gt_path, kf_path


def make_video(
    out_dir,
    n_frames: int = 24,
    fps: float = 8,
    seed: int = 0,
    size: tuple[int, int] = (320, 240),
    keyframes: Sequence[int] = (0,),
    mask_name: str | None = None,
    codec: str = "libx264",
) -> dict:
    """Write a synthetic clip of one moving specimen with its exact per-frame ground truth.

    Writes ``out_dir/video.mp4`` (``codec``, yuv420p, crf 18; frames from
    `render_video_frames`), ``ground_truth.json`` (COCO: image ``id`` = frame index,
    ``file_name`` ``00000.jpg`` ... as `sam2pal.io.video.extract_frames` names them, one
    compressed-RLE annotation per visible part per frame, annotation ids from 1) and
    ``keyframes.json`` (the same for the ``keyframes`` frames only). Image ids in
    keyframes.json are 1000 + frame index, deliberately not the frame index: code must
    match annotations to frames by file name. Deterministic for a seed.

    Args:
        out_dir: the clip's folder (created if needed).
        n_frames, seed, size, mask_name: as in `render_video_frames` (an even size).
        fps, keyframes, codec: frames per second, the frame indices of keyframes.json,
            and ffmpeg's video encoder.

    Returns:
        A dict with ``out_dir``, ``video``, ``ground_truth``, ``keyframes`` (paths),
        ``keyframe_indices``, ``n_frames``, ``fps``, ``size``, ``mask_name`` and ``labels``
        (the per-frame uint8 label maps, 0 background, 1..5 as in PARTS).
    """
    from sam2pal.io.video import write_video

    width, height, n_frames, keys = _check_video(size, n_frames, fps, keyframes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, frames = render_video_frames(
        n_frames, seed=seed, size=(width, height), mask_name=mask_name
    )
    labels: list[np.ndarray] = []

    def images() -> Iterator[np.ndarray]:
        for image, lab in frames:
            labels.append(lab)
            yield image

    video_path = out / "video.mp4"
    write_video(images(), video_path, fps=fps, crf=18, codec=codec)
    gt_path, kf_path = _write_video_truth(out, labels, keys, fps, (width, height), name, seed)
    return {
        "out_dir": out,
        "video": video_path,
        "ground_truth": gt_path,
        "keyframes": kf_path,
        "keyframe_indices": keys,
        "n_frames": n_frames,
        "fps": fps,
        "size": (width, height),
        "mask_name": name,
        "labels": labels,
    }
