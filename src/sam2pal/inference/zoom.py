"""The geometry of the zoom-in pass: square windows on a photo, and the way back from them.

SAM2 sees a photo at its square input of `size` pixels and predicts masks at a quarter of
that, so a structure a few tens of pixels wide in a 12-megapixel photo comes back as a
blob a few mask pixels across. The zoom-in pass segments such a structure again on a
window of the photo around it (a `Crop`), fed to the model at its full input resolution,
and pastes the mask back into the photo's pixel grid.

A window is a square of `side` pixels at (`top`, `left`) of the photo's grid. It may
extend past the photo: the part outside is padding (`crop_image`, `crop_masks`), and is
clipped on the way back (`paste_logits`, `paste_box`). A window is never shifted to fit
inside the photo, so that a structure keeps the same place in its window on the template
and on the target, whether it lies near an edge of one photo or not.

- `crop_around` frames a structure's box (the template's mask, or the first pass's
  prediction) with a margin, centred on the box.
- `same_framing` frames the target's box as the template's window frames the template's
  box (the same relative scale and offset), so that both crops show the structure alike.
- `placed_from_reference` says where a structure the first pass did not find should sit
  on the target, from where it sits on the template relative to the specimen (or to a
  larger structure that was found).
- `clusters` and `union_crop` group the windows of nearby structures into one, to share
  the encoder's passes.

Boxes are COCO boxes (x, y, w, h) in pixel units, as `io.masks.mask_bbox` gives them: a
mask's pixels are columns x..x+w-1 and rows y..y+h-1, and its centre is (x + w/2, y + h/2)
on the pixels' edges. Torch is imported inside the functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sam2pal.inference.framing import (
    DEFAULT_FILL,
    fill_colour,
    make_frame,
    parse_fill,
    unframe_to_box,
)
from sam2pal.io.masks import BoxMask


def _round(value: float) -> int:
    """The nearest integer, halves up (the same way whatever the sign, unlike `round`)."""
    return int(math.floor(value + 0.5))


@dataclass(frozen=True)
class Crop:
    """A square window of `side` pixels on a photo of (`height`, `width`): rows
    top..top+side, columns left..left+side of the photo's grid.

    `top` and `left` may be negative and the window may extend past the photo's bottom or
    right edge: that part of it is padding. A window that does not meet the photo at all
    is allowed (it is all padding).
    """

    top: int
    left: int
    side: int
    height: int
    width: int

    def __post_init__(self):
        for name in ("top", "left", "side", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"Crop.{name}: expected an int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.side < 1:
            raise ValueError(f"Crop.side: expected at least 1 pixel, got {self.side}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"Crop: the photo needs a size of at least 1x1, got {self.size}")

    @property
    def size(self) -> tuple[int, int]:
        """The photo's (height, width)."""
        return (self.height, self.width)

    @property
    def bottom(self) -> int:
        """The row just below the window (top + side)."""
        return self.top + self.side

    @property
    def right(self) -> int:
        """The column just right of the window (left + side)."""
        return self.left + self.side

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The whole window as a box (x, y, w, h) of the photo's grid (maybe past it)."""
        return (self.left, self.top, self.side, self.side)

    @property
    def inside(self) -> tuple[int, int, int, int]:
        """The part of the window inside the photo, as photo rows y0..y1 and columns
        x0..x1: (y0, y1, x0, x1), with y0 == y1 or x0 == x1 when the window misses it."""
        y0, y1 = max(self.top, 0), min(self.bottom, self.height)
        x0, x1 = max(self.left, 0), min(self.right, self.width)
        return (y0, max(y1, y0), x0, max(x1, x0))

    @property
    def inside_crop(self) -> tuple[int, int, int, int]:
        """The same part in the window's own grid: (r0, r1, c0, c1), the rows and columns
        of the crop that show the photo."""
        y0, y1, x0, x1 = self.inside
        return (y0 - self.top, y1 - self.top, x0 - self.left, x1 - self.left)

    @property
    def empty(self) -> bool:
        """True when the window does not meet the photo."""
        y0, y1, x0, x1 = self.inside
        return y0 == y1 or x0 == x1

    @property
    def padded(self) -> bool:
        """True when part of the window lies outside the photo."""
        return self.top < 0 or self.left < 0 or self.bottom > self.height or self.right > self.width

    @property
    def area(self) -> int:
        """The window's area in pixels, padding included."""
        return self.side * self.side


def _box(box) -> tuple[float, float, float, float]:
    """A box (x, y, w, h) as four floats; negative sizes are an error."""
    values = [float(v) for v in box]
    if len(values) != 4:
        raise ValueError(f"a box is (x, y, w, h), got {box!r}")
    if values[2] < 0 or values[3] < 0 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"a box needs finite coordinates and sizes of at least 0, got {box!r}")
    return values[0], values[1], values[2], values[3]


def _photo_size(size) -> tuple[int, int]:
    height, width = (int(v) for v in size)
    return height, width


def crop_around(box, photo_size, margin: float, min_side: int) -> Crop:
    """The square window that frames a structure with a margin, centred on it.

    The side is max(min_side, ceil(max(w, h) * (1 + 2 * margin))): the box's longer
    side with `margin` of it on both sides, at least `min_side` (so that a tiny structure
    is not blown up past what the model can use, and comes with some context). The
    window is centred on the box's centre (to the nearest pixel, halves up) and is not
    shifted to fit inside the photo (see the module's docstring).

    Args:
        box: the structure's box (x, y, w, h), e.g. `mask_bbox` of its mask.
        photo_size: the photo's (height, width).
        margin: the share of the box's longer side added on each side (>= 0).
        min_side: the smallest side of the window in pixels.

    Returns:
        The `Crop`.

    Raises:
        ValueError: a negative margin, or a window under one pixel (an empty box with
            min_side < 1).
    """
    x, y, w, h = _box(box)
    if not margin >= 0:
        raise ValueError(f"margin: expected at least 0, got {margin!r}")
    height, width = _photo_size(photo_size)
    side = max(int(min_side), math.ceil(max(w, h) * (1 + 2 * float(margin))))
    if side < 1:
        raise ValueError(f"crop_around: a window of {side} pixels around {box!r}")
    cx, cy = x + w / 2, y + h / 2
    return Crop(_round(cy - side / 2), _round(cx - side / 2), side, height, width)


def same_framing(template_box, template_crop: Crop, target_box, target_size) -> Crop:
    """The target's window, framing the target's box as the template's window frames the
    template's box.

    The scale is the boxes' longer sides: the target's side is the template's times
    max(w, h) of the target's box over that of the template's (to the nearest pixel, at
    least 1), and the window's centre lies off the box's centre by the template's offset
    times the same ratio. The template's crop and the target's crop, each resized to the
    model's input, then show the structure at the same size and place. Framing a box
    like itself gives the template's window back (on the target's photo size).

    Args:
        template_box: the structure's box (x, y, w, h) on the template.
        template_crop: the template's window around it (e.g. `crop_around`).
        target_box: the structure's box on the target (the first pass's prediction, or
            `placed_from_reference`).
        target_size: the target photo's (height, width).

    Returns:
        The target's `Crop`.

    Raises:
        ValueError: a box with no extent (w and h both 0): it has no scale.
    """
    tx, ty, tw, th = _box(template_box)
    gx, gy, gw, gh = _box(target_box)
    t_long, g_long = max(tw, th), max(gw, gh)
    if t_long <= 0 or g_long <= 0:
        raise ValueError(
            f"same_framing needs boxes with an extent, got {template_box!r} and {target_box!r}"
        )
    height, width = _photo_size(target_size)
    ratio = g_long / t_long
    side = max(1, _round(template_crop.side * ratio))
    # the template window's centre, off the template box's centre
    dx = template_crop.left + template_crop.side / 2 - (tx + tw / 2)
    dy = template_crop.top + template_crop.side / 2 - (ty + th / 2)
    cx = gx + gw / 2 + dx * ratio
    cy = gy + gh / 2 + dy * ratio
    return Crop(_round(cy - side / 2), _round(cx - side / 2), side, height, width)


def placed_from_reference(
    template_box, template_reference_box, target_reference_box
) -> tuple[float, float, float, float]:
    """Where a structure should sit on the target, from where it sits on the template
    relative to a reference (the specimen, or a larger structure that was found).

    The structure's centre keeps its relative place in the reference box, along each
    axis: a centre a third of the way across the template's reference box lies a third
    of the way across the target's. Its size is scaled by the geometric mean of the two
    axes' scales, so that a reference box of another aspect ratio (a leg spread wider on
    the target) does not squeeze the structure; where both boxes have the same aspect
    ratio this is the translation and scale that takes one reference box onto the other.

    Args:
        template_box: the structure's box (x, y, w, h) on the template.
        template_reference_box: the reference's box on the template.
        target_reference_box: the reference's box on the target.

    Returns:
        The structure's expected box (x, y, w, h) on the target, as floats.

    Raises:
        ValueError: a reference box with a side of 0.
    """
    sx, sy, sw, sh = _box(template_box)
    rx, ry, rw, rh = _box(template_reference_box)
    qx, qy, qw, qh = _box(target_reference_box)
    if min(rw, rh, qw, qh) <= 0:
        raise ValueError(
            "placed_from_reference needs reference boxes with both sides above 0, got "
            f"{template_reference_box!r} and {target_reference_box!r}"
        )
    scale_x, scale_y = qw / rw, qh / rh
    scale = math.sqrt(scale_x * scale_y)
    cx = qx + (sx + sw / 2 - rx) * scale_x
    cy = qy + (sy + sh / 2 - ry) * scale_y
    w, h = sw * scale, sh * scale
    return (cx - w / 2, cy - h / 2, w, h)


def crop_image(rgb: np.ndarray, crop: Crop, fill=DEFAULT_FILL) -> np.ndarray:
    """The window's pixels: what the model is given for it.

    Args:
        rgb: the photo, RGB uint8 (H, W, 3), of the crop's photo size.
        crop: the window.
        fill: the colour of the padding outside the photo, as `framing.parse_fill` takes
            it; "border" is `framing.fill_colour` of the whole photo (the median of its
            outermost ring), so that the padding looks like the photo's background.

    Returns:
        (side, side, 3) uint8, a new array.
    """
    fill = parse_fill(fill)
    rgb = np.asarray(rgb)
    if rgb.shape[:2] != crop.size:
        raise ValueError(f"crop_image: a photo of {rgb.shape[:2]}, the window is on {crop.size}")
    y0, y1, x0, x1 = crop.inside
    r0, r1, c0, c1 = crop.inside_crop
    if not crop.padded:
        return rgb[y0:y1, x0:x1].copy()
    out = np.empty((crop.side, crop.side) + rgb.shape[2:], dtype=rgb.dtype)
    out[:] = np.asarray(fill_colour(rgb, fill), dtype=rgb.dtype)
    out[r0:r1, c0:c1] = rgb[y0:y1, x0:x1]
    return out


def crop_masks(masks: np.ndarray, crop: Crop) -> np.ndarray:
    """The window's part of a photo's masks, background outside the photo.

    Args:
        masks: (B, H, W) bool masks of the crop's photo size.
        crop: the window.

    Returns:
        (B, side, side) bool, a new array.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != crop.size:
        raise ValueError(f"crop_masks: masks of {masks.shape}, the window is on {crop.size}")
    out = np.zeros((masks.shape[0], crop.side, crop.side), dtype=bool)
    y0, y1, x0, x1 = crop.inside
    r0, r1, c0, c1 = crop.inside_crop
    out[:, r0:r1, c0:c1] = masks[:, y0:y1, x0:x1]
    return out


def crop_box(box, crop: Crop) -> tuple[float, float, float, float]:
    """A photo's box (x, y, w, h) in the window's own pixel grid (a prompt for the crop)."""
    x, y, w, h = _box(box)
    return (x - crop.left, y - crop.top, w, h)


def paste_box(mask: BoxMask, crop: Crop) -> BoxMask:
    """A mask of the window's grid placed in the photo's grid.

    Args:
        mask: a `BoxMask` of (side, side).
        crop: the window.

    Returns:
        The mask as a tight `BoxMask` of the photo's (height, width); what falls outside
        the photo is dropped.
    """
    if mask.size != (crop.side, crop.side):
        raise ValueError(f"paste_box: a mask of {mask.size}, the window is {crop.side} square")
    h, w = mask.crop.shape
    y0, x0 = mask.y0 + crop.top, mask.x0 + crop.left
    r0, r1 = max(0, -y0), min(h, crop.height - y0)
    c0, c1 = max(0, -x0), min(w, crop.width - x0)
    if r0 >= r1 or c0 >= c1:
        return BoxMask.empty(crop.size)
    return BoxMask(crop.size, y0 + r0, x0 + c0, mask.crop[r0:r1, c0:c1]).tight()


def paste_logits(
    low_res_logits, crop: Crop, size: int, threshold: float = 0.0, framing: str = "stretch"
) -> BoxMask:
    """The photo's mask from the model's low-resolution logits of a window.

    The window was given to the model as a (side x side) image framed in its square input
    of `size` (a square image fills the square in either framing). The logits come back
    to the window's own pixels by `framing.unframe_to_box` (one bilinear resize, as the
    whole-photo pass does) and are placed at (top, left) of the photo, clipped to it.

    Args:
        low_res_logits: the (h, w) logit map (torch tensor or numpy array).
        crop: the window.
        size: the model's input size.
        threshold: pixels above it are the mask.
        framing: as `framing.make_frame` takes it.

    Returns:
        The mask as a tight `BoxMask` of the photo's (height, width).
    """
    frame = make_frame(crop.side, crop.side, size, framing)
    return paste_box(unframe_to_box(low_res_logits, frame, threshold), crop)


def _overlap(a: Crop, b: Crop) -> int:
    rows = min(a.bottom, b.bottom) - max(a.top, b.top)
    cols = min(a.right, b.right) - max(a.left, b.left)
    return max(rows, 0) * max(cols, 0)


def clusters(crops: Sequence[Crop], overlap: float = 0.5) -> list[list[int]]:
    """Groups of windows that overlap, so that nearby structures share one crop.

    Two windows are joined when the area they share is more than `overlap` of the smaller
    one's area (whole windows, padding included), and groups are the connected sets of
    that relation (union-find): a chain of overlapping windows is one group.

    Args:
        crops: the windows, on one photo.
        overlap: the share of the smaller window's area above which two are joined (0
            joins any that touch by a pixel; 1 or more joins none).

    Returns:
        The groups as lists of indices into `crops`, each sorted, ordered by their first
        index; every index is in exactly one group.
    """
    parent = list(range(len(crops)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(crops)):
        for j in range(i + 1, len(crops)):
            smaller = min(crops[i].area, crops[j].area)
            if _overlap(crops[i], crops[j]) > overlap * smaller:
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(crops)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda group: group[0])


def union_crop(crops: Sequence[Crop]) -> Crop:
    """The smallest square window covering a group of windows: the side is the longer
    side of their bounding rectangle, centred on it along the shorter one (the extra
    pixel of an odd difference after it).

    Args:
        crops: one or more windows on the same photo.

    Returns:
        The `Crop`.

    Raises:
        ValueError: no windows, or windows on photos of different sizes.
    """
    if len(crops) == 0:
        raise ValueError("union_crop needs at least one window")
    sizes = {crop.size for crop in crops}
    if len(sizes) != 1:
        raise ValueError(f"union_crop: windows on photos of different sizes {sorted(sizes)}")
    y0, y1 = min(c.top for c in crops), max(c.bottom for c in crops)
    x0, x1 = min(c.left for c in crops), max(c.right for c in crops)
    side = max(y1 - y0, x1 - x0)
    height, width = crops[0].size
    return Crop(y0 - (side - (y1 - y0)) // 2, x0 - (side - (x1 - x0)) // 2, side, height, width)
