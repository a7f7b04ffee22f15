"""Optional post-processing of predicted masks relative to the template structure.

Both options are off by default. Sizes and positions are compared in relative image
coordinates (fractions of the image width, height and area), so templates and targets
may have different pixel sizes.

* `area_growth_limit` G > 0: a predicted structure whose area is more than G times the
  template structure's area has "exploded" (leaked into the background or a
  neighbouring part); it is then cut to the template structure's bounding box, grown
  by `pad` pixels on every side.
* `always` (the `bbox_clamp` setting): every prediction is cut to that box. Useful for
  standardised photo set-ups where the specimen sits in the same place every time.

With several templates the reference area is the mean of the templates' areas and the
box is the union of their boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sam2pal.io.masks import BoxMask


@dataclass(frozen=True)
class StructureReference:
    """A template structure's size and place, in fractions of its image."""

    area_fraction: float  # structure area / image area
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of width/height

    @classmethod
    def from_masks(cls, masks: list) -> StructureReference:
        """The reference of a structure from its masks.

        Args:
            masks: the structure's masks on the templates: bool arrays or `BoxMask`s.

        Returns:
            The mean area fraction and the union of the boxes; area 0 and the whole
            image when every mask is empty.
        """
        areas, boxes = [], []
        for mask in masks:
            if isinstance(mask, np.ndarray):
                mask = BoxMask.from_full(mask)
            height, width = mask.size
            areas.append(mask.area / float(height * width))
            x, y, w, h = mask.bbox()
            if w:
                boxes.append((x / width, y / height, (x + w) / width, (y + h) / height))
        if not boxes:
            return cls(0.0, (0.0, 0.0, 1.0, 1.0))
        box = (
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        )
        return cls(float(np.mean(areas)), box)

    def pixel_box(self, height: int, width: int, pad: int) -> tuple[int, int, int, int]:
        """The box in pixels of a height x width image, grown by `pad` pixels on every
        side and kept inside the image: (x0, y0, x1, y1), x1 and y1 exclusive."""
        x0, y0, x1, y1 = self.box
        return (
            max(0, int(np.floor(x0 * width)) - pad),
            max(0, int(np.floor(y0 * height)) - pad),
            min(width, int(np.ceil(x1 * width)) + pad),
            min(height, int(np.ceil(y1 * height)) + pad),
        )


def clamp_mask(
    mask,
    reference: StructureReference,
    area_growth_limit: float = 0.0,
    pad: int = 10,
    always: bool = False,
):
    """Cut `mask` to the reference box when asked to.

    Args:
        mask: a bool array, or a `sam2pal.io.masks.BoxMask`.
        reference: the template structure's `StructureReference`.
        area_growth_limit: cut when the mask's area fraction is more than this many
            times the reference's (0: never for this reason).
        pad: pixels added to the reference box on every side.
        always: cut every mask.

    Returns:
        (mask of the same kind, was_cut): was_cut is true when the mask exploded or lost
        pixels to the cut.
    """
    boxed = isinstance(mask, BoxMask)
    height, width = mask.size if boxed else mask.shape
    area = mask.area if boxed else int(mask.sum())
    exploded = (
        area_growth_limit > 0
        and reference.area_fraction > 0
        and area / float(height * width) > area_growth_limit * reference.area_fraction
    )
    if not (always or exploded):
        return mask, False
    x0, y0, x1, y1 = reference.pixel_box(height, width, pad)
    if boxed:
        cut = mask.cut(x0, y0, x1, y1)
        return cut, bool(exploded or cut.area != area)
    cut = np.zeros_like(mask)
    cut[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return cut, bool(exploded or (cut != mask).any())
