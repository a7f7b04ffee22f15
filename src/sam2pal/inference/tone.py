"""Tone: lift the dark tones of photos whose specimens are dark on a dark ground.

sam2pal-micro finds nothing of a metallic blue beetle on dark slate (`blue_slate` in
`benchmarks/quality.py`: the specimen about 13 L* units darker than its ground), where the
same photos with their dark tones lifted (a gamma below 1) give it the specimen. With
``tone: auto`` every photo the model sees (templates, targets, training photos, video
frames) gets such a lift, decided in two steps:

1. from the templates, once: the lift applies only when the annotated structures are
   darker than the ground around them (`specimen_darker`); a light specimen on a dark
   ground keeps its tones (lifting the ground would take away its contrast);
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

from sam2pal.settings import TONES

#: the median luminance (0-1) a lifted photo is brought up to
MID_GREY = 0.45
#: the strongest lift
MIN_GAMMA = 0.4
#: pixels sampled per side when measuring a photo's median (a 12 MP photo is not read whole)
_SAMPLES = 512


def luminance(image: np.ndarray) -> np.ndarray:
    """Luminance 0-1 (Rec. 601 luma) of an RGB uint8 image, (H, W) float32."""
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


def _sampled(image: np.ndarray) -> np.ndarray:
    """A strided view of the image, at most about `_SAMPLES` pixels a side."""
    step = max(1, max(image.shape[:2]) // _SAMPLES)
    return image[::step, ::step]


def photo_gamma(image: np.ndarray) -> float:
    """The gamma that lifts the photo's median luminance to `MID_GREY` (at least
    `MIN_GAMMA`); 1.0 when the median is already that light."""
    median = float(np.median(luminance(_sampled(image))))
    if median >= MID_GREY:
        return 1.0
    return min(1.0, max(MIN_GAMMA, math.log(MID_GREY) / math.log(max(median, 1e-3))))


def lift(image: np.ndarray, gamma: float) -> np.ndarray:
    """The image with every channel raised to `gamma` (0-1 scale); the same array when
    gamma is 1."""
    if gamma >= 1.0:
        return image
    table = np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return cv2.LUT(np.ascontiguousarray(image), table)


def specimen_darker(samples: Iterable[tuple[np.ndarray, list[np.ndarray]]]) -> bool:
    """Whether the annotated structures are darker than the ground around them, over
    all templates: the median luminance of the pixels inside the union of the masks
    against that of the pixels more than 2% of the shorter side away from them.

    Args:
        samples: (RGB uint8 image, its structures' boolean masks) per template.

    Returns:
        True when the structures' median is the lower one (False when no template has
        both structure and ground pixels).
    """
    inside, outside = [], []
    for image, masks in samples:
        union = np.zeros(image.shape[:2], bool)
        for mask in masks:
            union |= np.asarray(mask, bool)
        if not union.any():
            continue
        radius = max(1, round(0.02 * min(union.shape)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        near = cv2.dilate(union.astype(np.uint8), kernel).astype(bool)
        if near.all():
            continue
        lum = luminance(image)
        inside.append(lum[union])
        outside.append(lum[~near])
    if not inside:
        return False
    return float(np.median(np.concatenate(inside))) < float(np.median(np.concatenate(outside)))


@dataclass(frozen=True)
class Tone:
    """The tone setting, resolved for one template set: `apply` gives the pixels the
    model sees."""

    mode: str = "none"
    lifts: bool = False  # "auto" and the templates' structures darker than their ground

    @classmethod
    def resolve(
        cls, mode: str, samples: Callable[[], Iterable[tuple[np.ndarray, list[np.ndarray]]]]
    ) -> Tone:
        """The tone of `mode` for the templates `samples()` gives (called only for
        "auto"); raises ValueError for an unknown mode."""
        if mode not in TONES:
            raise ValueError(f"tone must be one of {', '.join(TONES)}, not {mode!r}")
        if mode == "none":
            return cls()
        return cls(mode, specimen_darker(samples()))

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
