"""Binary masks and their COCO encodings (pycocotools does the RLE work).

Masks are 2-D numpy bool arrays, height x width. COCO segmentations come in three forms,
all accepted by `decode_segmentation`: polygons (a list of flat [x0, y0, x1, y1, ...]
lists; parts are unioned), uncompressed RLE (`counts` a list of ints) and compressed RLE
(`counts` a string). `encode_rle` writes compressed RLE with `counts` as a str, which
is what JSON needs; holes are kept. Polygons (`mask_to_polygons`) cannot carry holes.
"""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a bool mask, JSON-ready (`counts` is a str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}


def _to_pycoco_rle(segmentation, height: int, width: int):
    if isinstance(segmentation, list):
        if len(segmentation) == 0:
            raise ValueError("empty polygon list")
        for poly in segmentation:
            if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                raise ValueError("a polygon needs an even number (>= 6) of coordinates")
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in segmentation], height, width)
        return mask_utils.merge(rles)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} does not match the image ({height}x{width})")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            if sum(int(c) for c in counts) != height * width:
                raise ValueError("uncompressed RLE counts do not add up to height*width")
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        return {"size": size, "counts": counts}
    raise ValueError("segmentation is neither a polygon list nor an RLE dict")


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Decode any COCO segmentation to a bool mask of shape (height, width).

    Raises ValueError with a short reason when the segmentation is malformed.
    """
    rle = _to_pycoco_rle(segmentation, height, width)
    mask = mask_utils.decode(rle)
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    return mask.astype(bool)


def polygons_out_of_bounds(segmentation, height: int, width: int, tol: float = 1.0) -> bool:
    """True when a polygon segmentation has a vertex outside the image (by more than tol)."""
    if not isinstance(segmentation, list):
        return False
    for poly in segmentation:
        xs = np.asarray(poly[0::2], dtype=float)
        ys = np.asarray(poly[1::2], dtype=float)
        if xs.min() < -tol or ys.min() < -tol or xs.max() > width + tol or ys.max() > height + tol:
            return True
    return False


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> list[list[float]]:
    """Outer contours of a mask as COCO polygons (holes are not representable)."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polygons = []
    for contour in contours:
        if len(contour) < min_points:
            # a 1- or 2-pixel sliver: keep it as a tiny box so the part is not lost
            x, y, w, h = cv2.boundingRect(contour)
            polygons.append([x, y, x + w, y, x + w, y + h, x, y + h])
            continue
        polygons.append(contour.reshape(-1).astype(float).tolist())
    return polygons


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO bbox [x, y, width, height] of a mask in pixel units ([0,0,0,0] if empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


# --------------------------------------------------------------------------------------
# masks stored as their box
# --------------------------------------------------------------------------------------


class BoxMask:
    """A bool mask of an image of `size` (height, width), stored as the part inside a box:
    `crop` (h, w) placed at row `y0`, column `x0`; every pixel outside is background.

    A structure covers a small part of a 12-megapixel photo: its box is all that is
    upsampled, counted and run-length encoded (`rle`, equal to `encode_rle` of the full
    mask), and the full-size array exists only when someone asks for it (`full`).
    """

    __slots__ = ("size", "y0", "x0", "crop")

    def __init__(self, size: tuple[int, int], y0: int, x0: int, crop: np.ndarray):
        height, width = int(size[0]), int(size[1])
        crop = np.asarray(crop, dtype=bool)
        if (
            crop.ndim != 2
            or y0 < 0
            or x0 < 0
            or y0 + crop.shape[0] > height
            or x0 + crop.shape[1] > width
        ):
            raise ValueError(
                f"box {crop.shape} at ({y0}, {x0}) does not fit an image of {height}x{width}"
            )
        self.size = (height, width)
        self.y0, self.x0, self.crop = int(y0), int(x0), crop

    @classmethod
    def empty(cls, size: tuple[int, int]) -> BoxMask:
        return cls(size, 0, 0, np.zeros((0, 0), bool))

    @classmethod
    def from_full(cls, mask: np.ndarray) -> BoxMask:
        """The tight box of a full-size bool mask."""
        mask = np.asarray(mask, dtype=bool)
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return cls.empty(mask.shape)
        cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
        crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        return cls(mask.shape, int(rows[0]), int(cols[0]), crop.copy())

    def tight(self) -> BoxMask:
        """The same mask in its smallest box."""
        inner = BoxMask.from_full(self.crop)
        if inner.crop.size == 0:
            return BoxMask.empty(self.size)
        return BoxMask(self.size, self.y0 + inner.y0, self.x0 + inner.x0, inner.crop)

    def full(self) -> np.ndarray:
        mask = np.zeros(self.size, dtype=bool)
        h, w = self.crop.shape
        mask[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.crop
        return mask

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.crop))

    def bbox(self) -> list[float]:
        """COCO bbox [x, y, width, height] ([0, 0, 0, 0] if empty), as `mask_bbox`."""
        tight = self.tight()
        if tight.crop.size == 0:
            return [0.0, 0.0, 0.0, 0.0]
        h, w = tight.crop.shape
        return [float(tight.x0), float(tight.y0), float(w), float(h)]

    def cut(self, x0: int, y0: int, x1: int, y1: int) -> BoxMask:
        """The mask with everything outside the box [x0, x1) x [y0, y1) removed."""
        h, w = self.crop.shape
        keep = np.zeros_like(self.crop)
        r0, r1 = max(y0 - self.y0, 0), min(y1 - self.y0, h)
        c0, c1 = max(x0 - self.x0, 0), min(x1 - self.x0, w)
        if r0 < r1 and c0 < c1:
            keep[r0:r1, c0:c1] = self.crop[r0:r1, c0:c1]
        return BoxMask(self.size, self.y0, self.x0, keep)

    def rle(self) -> dict:
        """Compressed COCO RLE of the full mask (the same as `encode_rle(self.full())`),
        computed from the box."""
        height, width = self.size
        h, w = self.crop.shape
        if h == 0 or w == 0 or not self.crop.any():
            counts = [height * width]
        elif h * w > 0.5 * height * width:
            return encode_rle(self.full())  # most of the image: pycocotools on the whole
        else:
            # column-major, as COCO: pad each box column with background above and
            # below so that runs start and end inside it, find the edges, and place
            # them in the full image's column-major order
            padded = np.zeros((h + 2, w), dtype=np.int8)
            padded[1:-1] = self.crop
            flat = padded.ravel(order="F")
            edges = np.flatnonzero(np.diff(flat))  # a run starts or ends after index i
            col, row = np.divmod(edges + 1, h + 2)
            where = (self.x0 + col).astype(np.int64) * height + (self.y0 + row - 1)
            starts, ends = where[0::2], where[1::2]
            # a run that reaches the bottom of a column continues at the top of the
            # next one when that pixel is set: merge runs that touch
            touch = starts[1:] == ends[:-1]
            if touch.any():
                starts = np.concatenate([starts[:1], starts[1:][~touch]])
                ends = np.concatenate([ends[:-1][~touch], ends[-1:]])
            bounds = np.empty(2 * len(starts) + 2, dtype=np.int64)
            bounds[0], bounds[-1] = 0, height * width
            bounds[1:-1:2], bounds[2:-1:2] = starts, ends
            counts = np.diff(bounds).tolist()
            if counts[-1] == 0:  # COCO ends on the last run, with no empty one after it
                counts.pop()
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def box_iou(a: BoxMask, b: BoxMask) -> float:
    """`mask_iou` of two masks of the same image, from their boxes."""
    area_a, area_b = a.area, b.area
    (ha, wa), (hb, wb) = a.crop.shape, b.crop.shape
    y0, y1 = max(a.y0, b.y0), min(a.y0 + ha, b.y0 + hb)
    x0, x1 = max(a.x0, b.x0), min(a.x0 + wa, b.x0 + wb)
    inter = 0
    if y0 < y1 and x0 < x1:
        inter = int(
            np.count_nonzero(
                a.crop[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
                & b.crop[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
            )
        )
    union = area_a + area_b - inter
    return 1.0 if union == 0 else inter / union


def source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index of a bilinear resize (align_corners False, no antialias, as
    torch's `F.interpolate`): the two input indices and the weight of the second."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)
