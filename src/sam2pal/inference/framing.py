"""How a photo is framed in the model's square input, and how masks come back from it.

SAM2 sees a square of `size` x `size` pixels. Two framings put a photo there:

- "stretch" resizes the photo to the whole square, whatever its aspect ratio: what
  SAM2's own frame loader does, and the default. A 3:1 photo of a beetle is squeezed
  three times more along its length than across it.
- "letterbox" resizes the photo with its aspect ratio kept until its longer side fills
  the square, and centres it on a canvas of a fill colour (by default the median colour
  of the photo's border, so that the padding looks like the photo's background).

A `Frame` records where the photo sits (`make_frame`). Everything that goes into the
model goes through it (`framed_image` for the photo, `framed_masks` for a template's
masks), and the model's low-resolution logits come back through it (`unframe_to_box`,
one bilinear resize from the logit grid of the square straight to the photo's pixels,
over the photo's rectangle only). For a stretched frame each of these gives exactly
what the engine did before framings existed: Pillow's bicubic resize of the photo, the
official predictor's antialiased resize of the masks, and torch's bilinear resize of
the logits.

Torch is imported inside the functions that need it. The framings' names
(`FRAMINGS`) are the settings' list (`sam2pal.settings`), one list for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sam2pal.io.masks import BoxMask, source_index
from sam2pal.settings import FRAMINGS  # the framings, one list for the settings and the engine

#: the fill colour a letterbox canvas gets unless told otherwise
DEFAULT_FILL = "border"

# unframe_to_box resizes the whole photo with torch when the box covers more than this
# share of it (as the engine's `upsample_to_box` does)
_WHOLE = 0.5


@dataclass(frozen=True)
class Frame:
    """Where a photo of (height, width) sits in the model's square input of side `size`:
    its content is the rectangle rows top..top+inner_height, cols left..left+inner_width
    (the rest of the square is fill)."""

    height: int
    width: int
    size: int
    top: int
    left: int
    inner_height: int
    inner_width: int

    @property
    def stretched(self) -> bool:
        """True when the photo fills the whole square (a stretched frame, or the
        letterbox of a square photo)."""
        return (
            self.top == 0
            and self.left == 0
            and self.inner_height == self.size
            and self.inner_width == self.size
        )


def make_frame(height: int, width: int, size: int, framing: str = "stretch") -> Frame:
    """The frame of a photo of (height, width) in a square of side `size`.

    "stretch": the photo fills the square. "letterbox": it is scaled by
    size / max(height, width), each side rounded to the nearest pixel (halves up, at
    least 1), and centred (the extra pixel of an odd margin goes after it).

    Args:
        height, width: the photo's size in pixels.
        size: the model's input size.
        framing: one of `FRAMINGS`.

    Returns:
        The `Frame`.

    Raises:
        ValueError: an unknown framing, or a size below one pixel.
    """
    if framing not in FRAMINGS:
        raise ValueError(f"framing: expected one of {', '.join(FRAMINGS)}, got {framing!r}")
    height, width, size = int(height), int(width), int(size)
    if min(height, width, size) < 1:
        raise ValueError(f"a frame needs sizes of at least 1 pixel, got {height}x{width} in {size}")
    if framing == "stretch":
        return Frame(height, width, size, 0, 0, size, size)
    longest = max(height, width)
    # round(side * size / longest), halves up, in integers: exact whatever the sizes
    inner_h = max(1, (2 * height * size + longest) // (2 * longest))
    inner_w = max(1, (2 * width * size + longest) // (2 * longest))
    return Frame(
        height, width, size, (size - inner_h) // 2, (size - inner_w) // 2, inner_h, inner_w
    )


def _fill_error(value) -> ValueError:
    return ValueError(
        f'framing_fill: expected "border", a grey level 0..255 or a colour "R,G,B", got {value!r}'
    )


def _level(value, original) -> int:
    """One colour level 0..255 from an int, a whole float or a numeric string."""
    if isinstance(value, (bool, np.bool_)):
        raise _fill_error(original)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _fill_error(original) from None
    whole = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer()
    )
    if not whole or not 0 <= int(value) <= 255:
        raise _fill_error(original)
    return int(value)


def parse_fill(value) -> str | tuple[int, int, int]:
    """The letterbox fill of a setting value.

    Args:
        value: "border" (the median colour of the photo's outermost pixels), a grey level
            0..255 (an int or a numeric string such as "128"), or a colour as a string
            "R,G,B" or a list [R, G, B] of levels 0..255.

    Returns:
        "border", or the colour (R, G, B); a grey level g is (g, g, g).

    Raises:
        ValueError: anything else, with a one-line message.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "border":
            return "border"
        if "," in text:
            parts = text.split(",")
            if len(parts) != 3:
                raise _fill_error(value)
            return tuple(_level(part, value) for part in parts)
        grey = _level(text, value)
        return (grey, grey, grey)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise _fill_error(value)
        return tuple(_level(part, value) for part in value)
    grey = _level(value, value)
    return (grey, grey, grey)


def fill_colour(rgb: np.ndarray, fill=DEFAULT_FILL) -> tuple[int, int, int]:
    """The colour a letterbox canvas gets for a photo.

    Args:
        rgb: the photo, RGB uint8 (H, W, 3) (a reduced copy gives nearly the same border).
        fill: as `parse_fill` takes it.

    Returns:
        (R, G, B): for "border", the per-channel median of the photo's outermost
        one-pixel ring (rounded to the nearest level, halves to even); else the colour.
    """
    fill = parse_fill(fill)
    if fill != "border":
        return fill
    rgb = np.asarray(rgb)
    height, width = rgb.shape[:2]
    ring = [rgb[0]]
    if height > 1:
        ring.append(rgb[-1])
    if height > 2:
        ring.append(rgb[1:-1, 0])
        if width > 1:
            ring.append(rgb[1:-1, -1])
    median = np.rint(np.median(np.concatenate(ring).reshape(-1, 3), axis=0)).astype(int)
    return (int(median[0]), int(median[1]), int(median[2]))


def framed_image(rgb: np.ndarray, frame: Frame, fill=DEFAULT_FILL) -> np.ndarray:
    """A photo as the model sees it: its frame's square, RGB uint8 (size, size, 3).

    Stretched: Pillow's bicubic resize of the photo to the square (SAM2's frame
    loader). Letterbox: Pillow's bicubic resize to the inner rectangle, pasted on a
    canvas of the fill colour (`fill_colour`).

    Args:
        rgb: the photo, RGB uint8 (H, W, 3): the full photo or a reduced copy of it (any
            size: it is resized to the frame's rectangle).
        frame: the photo's frame (`make_frame` of its full size).
        fill: the letterbox canvas colour, as `parse_fill` takes it (checked for a
            stretched frame too, which has no canvas).

    Returns:
        The framed image (size, size, 3) uint8.
    """
    fill = parse_fill(fill)
    size = frame.size
    if frame.stretched:
        resized = Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(resized)
    inner = Image.fromarray(rgb).resize(
        (frame.inner_width, frame.inner_height), Image.Resampling.BICUBIC
    )
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = np.asarray(fill_colour(rgb, fill), dtype=np.uint8)
    canvas[
        frame.top : frame.top + frame.inner_height, frame.left : frame.left + frame.inner_width
    ] = np.asarray(inner)
    return canvas


def framed_masks(masks: np.ndarray, frame: Frame, device=None) -> np.ndarray:
    """A photo's masks as the model takes them: binary float masks of its frame's square.

    Each mask is resized to the frame's rectangle as the official predictor's
    `add_new_mask` resizes a mask to the square (torch's bilinear `F.interpolate` with
    antialiasing, thresholded at 0.5; no resize when the sizes already agree) and the
    rest of the square is 0. For a stretched frame this is exactly the engine's
    `binary_mask_input`.

    Args:
        masks: (B, H, W) bool masks of the photo (H, W: the photo's full size).
        frame: the photo's frame.
        device: the torch device the resize runs on (default the CPU); the official
            predictor resizes on the model's device.

    Returns:
        (B, size, size) float32, 0.0 or 1.0.
    """
    import torch
    import torch.nn.functional as F

    masks = np.asarray(masks)
    size = frame.size
    out = np.zeros((masks.shape[0], size, size), dtype=np.float32)
    if masks.shape[0] == 0:
        return out
    inner = (frame.inner_height, frame.inner_width)
    tensor = torch.from_numpy(masks[:, None].astype(np.float32))
    if device is not None:
        tensor = tensor.to(device)
    if tuple(tensor.shape[-2:]) != inner:
        tensor = F.interpolate(
            tensor, size=inner, mode="bilinear", align_corners=False, antialias=True
        )
        tensor = (tensor >= 0.5).float()
    out[
        :, frame.top : frame.top + frame.inner_height, frame.left : frame.left + frame.inner_width
    ] = tensor[:, 0].cpu().numpy()
    return out


def frame_index(frame: Frame, axis: int, low_res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bilinear map from the square's low-resolution logit grid to the photo.

    A photo pixel's centre lies, in the square's pixel coordinates, at
    offset + (i + 0.5) * inner / n along the axis (n the photo's side, offset and inner
    the frame's rectangle), and the grid of `low_res` cells covers the square: the pixel
    reads the grid at that point times low_res / size, minus 0.5 (torch's
    `align_corners=False`), clamped at 0 below and at the last cell above as torch
    clamps. An axis that the photo fills (always, for a stretched frame) gives exactly
    `io.masks.source_index(n, low_res)`, torch's own float32 indices and weights.

    Args:
        frame: the photo's frame.
        axis: 0 for the photo's rows (frame.height outputs), 1 for its columns
            (frame.width outputs).
        low_res: the logit grid's side along that axis.

    Returns:
        For each photo pixel along the axis: the two grid indices (int64) and the weight
        of the second (float32).
    """
    if axis == 0:
        n, offset, inner = frame.height, frame.top, frame.inner_height
    elif axis == 1:
        n, offset, inner = frame.width, frame.left, frame.inner_width
    else:
        raise ValueError(f"axis must be 0 (rows) or 1 (columns), got {axis}")
    low_res = int(low_res)
    if offset == 0 and inner == frame.size:
        return source_index(n, low_res)
    # float64, so that a photo pixel that falls on a grid cell reads exactly that cell
    centre = offset + (np.arange(n, dtype=np.float64) + 0.5) * (inner / n)
    src = np.maximum(centre * (low_res / frame.size) - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), low_res - 1)
    i1 = np.minimum(i0 + 1, low_res - 1)
    return i0, i1, (src - i0).astype(np.float32)


def unframe_to_box(logits, frame: Frame, threshold: float = 0.0) -> BoxMask:
    """The photo's mask from the model's low-resolution logits of its frame's square.

    The logits are resized bilinearly (`frame_index`) to the photo's pixels and
    thresholded, computing the resize only where it can exceed the threshold: a bilinear
    value is a weighted mean of four grid cells, so it does only where one of its cells
    does, and outside the box of those nothing is computed. Grid cells that no photo
    pixel reads (the letterbox margins) are ignored. The values are computed in float32
    in torch's order of operations (rows, then columns).

    For a stretched frame this is the engine's `upsample_to_box` (which it
    generalises): the same mask as torch's `F.interpolate(mode="bilinear",
    align_corners=False)` of the logits to the photo's size, but where a value lies
    within rounding of the threshold; and when the box is most of the photo it is that
    resize.

    Args:
        logits: the (h, w) logit map of the square (torch tensor or numpy array).
        frame: the photo's frame.
        threshold: pixels above it are the mask.

    Returns:
        The mask as a tight `BoxMask` on the photo's (frame.height, frame.width) grid.
    """
    import torch
    import torch.nn.functional as F

    logits = torch.as_tensor(logits, dtype=torch.float32).cpu()
    height, width = frame.height, frame.width
    r_lo, r_hi, r_w = frame_index(frame, 0, logits.shape[0])
    c_lo, c_hi, c_w = frame_index(frame, 1, logits.shape[1])
    above = (logits > threshold).numpy()
    if not frame.stretched:
        # only the grid cells that some photo pixel reads
        read = np.zeros(above.shape, dtype=bool)
        read[r_lo[0] : r_hi[-1] + 1, c_lo[0] : c_hi[-1] + 1] = True
        above &= read
    rows = np.flatnonzero(above.any(axis=1))
    if rows.size == 0:
        return BoxMask.empty((height, width))
    cols = np.flatnonzero(above[rows[0] : rows[-1] + 1].any(axis=0))
    ys = np.flatnonzero((r_lo <= rows[-1]) & (r_hi >= rows[0]))
    xs = np.flatnonzero((c_lo <= cols[-1]) & (c_hi >= cols[0]))
    if ys.size == 0 or xs.size == 0:
        # the cells above the threshold fall between the pixels of a photo smaller than
        # the grid: no pixel reads them
        return BoxMask.empty((height, width))
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    if frame.stretched and (y1 - y0) * (x1 - x0) > _WHOLE * height * width:
        # the box is most of the photo (a mask scattered all over it): torch's own resize
        # of the whole photo is faster, and gives the same pixels
        full = F.interpolate(
            logits[None, None], size=(height, width), mode="bilinear", align_corners=False
        )
        return BoxMask((height, width), 0, 0, (full[0, 0] > threshold).numpy()).tight()
    # rows first (a small band), then columns, in place: torch's order of operations
    wy = torch.from_numpy(r_w[y0:y1, None])
    band = logits.index_select(0, torch.from_numpy(r_lo[y0:y1])).mul_(1.0 - wy)
    band.add_(logits.index_select(0, torch.from_numpy(r_hi[y0:y1])).mul_(wy))
    wx = torch.from_numpy(c_w[x0:x1])
    values = band.index_select(1, torch.from_numpy(c_lo[x0:x1])).mul_(1.0 - wx)
    values.add_(band.index_select(1, torch.from_numpy(c_hi[x0:x1])).mul_(wx))
    return BoxMask((height, width), y0, x0, (values > threshold).numpy()).tight()
