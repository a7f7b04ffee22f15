"""Tone: lift the dark tones of dark photos before the model sees them (dark specimens on
dark grounds).

sam2pal-micro finds nothing of a metallic blue beetle on dark slate (`blue_slate` in
`benchmarks/quality.py`: the specimen about 13 L* units darker than its ground), where the
same photos with their dark tones lifted (a gamma below 1) give it the specimen. With
``tone: auto`` every photo the model sees (templates, targets, training photos, video
frames) gets such a lift, decided in two steps:

1. from the templates, once: the lift applies unless the annotated structures are
   clearly lighter than the ground around them (`needs_lift`: their median L* at least
   `LIGHT_MARGIN` above the ground's); a pale specimen on a dark ground keeps its tones
   (lifting the ground takes away the contrast the model reads it by), while a dark one,
   or one about as light as its dark ground, is lifted;
2. per photo: the gamma that brings the photo's median luminance up to `MID_GREY`
   (`photo_gamma`), never below `MIN_GAMMA`; a photo whose median is already that light
   keeps its pixels (gamma 1), so light grounds are left as they are.

The masks, the tables and the overlays are those of the photo itself: only the pixels
the model sees change. ``tone: none`` leaves every photo as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from sam2pal.errors import InputError
from sam2pal.settings import TONES

#: the median luminance (0-1) a lifted photo is brought up to
MID_GREY = 0.45
#: the strongest lift
MIN_GAMMA = 0.4
#: how much lighter (CIE L*) than their ground the structures must be to be left unlifted:
#: the lightness gap of the light-on-dark training episodes
LIGHT_MARGIN = 25.0
#: the longer side of the thumbnail a photo's median is measured on: the same whether the
#: photo was decoded at full size or reduced (`engine.read_target`), and quick on 12 MP
_THUMBNAIL = 128
#: the longer side the templates are measured at (`needs_lift`): a 12 MP template in a
#: fraction of a second
_TEMPLATE_SIDE = 512


def luminance(image: np.ndarray) -> np.ndarray:
    """Luminance 0-1 (Rec. 601 luma) of an RGB uint8 image, (H, W) float32."""
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """The image averaged down to `_THUMBNAIL` pixels on its longer side (as it is when
    smaller)."""
    height, width = image.shape[:2]
    scale = _THUMBNAIL / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)


def photo_gamma(image: np.ndarray) -> float:
    """The gamma that lifts the photo's median luminance to `MID_GREY` (at least
    `MIN_GAMMA`), to two decimals (a photo decoded at full size or reduced gets the same
    one); 1.0 when the median is already that light."""
    median = float(np.median(luminance(_thumbnail(image))))
    if median >= MID_GREY:
        return 1.0
    gamma = math.log(MID_GREY) / math.log(max(median, 1e-3))
    return round(min(1.0, max(MIN_GAMMA, gamma)), 2)


def lift(image: np.ndarray, gamma: float) -> np.ndarray:
    """The image with every channel raised to `gamma` (0-1 scale); the same array when
    gamma is 1."""
    if gamma >= 1.0:
        return image
    table = np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return cv2.LUT(np.ascontiguousarray(image), table)


def needs_lift(samples: Iterable[tuple[np.ndarray, list[np.ndarray]]]) -> bool:
    """Whether the templates call for a lift: unless the annotated structures are
    clearly lighter than the ground around them, over all templates: the median L* of
    the pixels inside the union of the masks against that of the pixels more than 2% of
    the shorter side away from them, `LIGHT_MARGIN` apart.

    Args:
        samples: (RGB uint8 image, its structures' boolean masks) per template.

    Returns:
        True unless the structures' median is `LIGHT_MARGIN` or more above the ground's
        (False when no template has both structure and ground pixels).
    """
    inside, outside = [], []
    for image, masks in samples:
        union = np.zeros(image.shape[:2], bool)
        for mask in masks:
            union |= np.asarray(mask, bool)
        if not union.any():
            continue
        scale = _TEMPLATE_SIDE / max(union.shape)
        if scale < 1.0:  # measured on a reduced copy: medians hardly change
            size = (max(1, round(union.shape[1] * scale)), max(1, round(union.shape[0] * scale)))
            image = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)
            union = cv2.resize(union.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
            if not union.any():
                continue
        radius = max(1, round(0.02 * min(union.shape)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        near = cv2.dilate(union.astype(np.uint8), kernel).astype(bool)
        if near.all():
            continue
        lightness = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2Lab)[..., 0]
        lightness = lightness.astype(np.float32) * (100.0 / 255.0)
        inside.append(lightness[union])
        outside.append(lightness[~near])
    if not inside:
        return False
    gap = float(np.median(np.concatenate(inside))) - float(np.median(np.concatenate(outside)))
    return gap < LIGHT_MARGIN


@dataclass(frozen=True)
class Tone:
    """The tone setting, resolved for one template set: `apply` gives the pixels the
    model sees."""

    mode: str = "none"
    lifts: bool = (
        False  # "auto" and the templates' structures not clearly lighter than their ground
    )

    @classmethod
    def resolve(
        cls, mode: str, samples: Callable[[], Iterable[tuple[np.ndarray, list[np.ndarray]]]]
    ) -> Tone:
        """The tone of `mode` for the templates `samples()` gives (called only for
        "auto"); an unknown mode is an InputError (a setting of the user's)."""
        if mode not in TONES:
            raise InputError(f"tone must be one of {', '.join(TONES)}, not {mode!r}")
        if mode == "none":
            return cls()
        return cls(mode, needs_lift(samples()))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The photo as the model sees it (the same array when nothing changes)."""
        if not self.lifts:
            return image
        return lift(image, photo_gamma(image))

    def reader(self, read_image: Callable) -> Callable:
        """`read_image` followed by `apply`."""
        if not self.lifts:
            return read_image
        return lambda path: self.apply(read_image(path))

    def record(self) -> dict:
        """What the provenance records of it."""
        return {"tone": self.mode, "lifts_dark_tones": self.lifts}
