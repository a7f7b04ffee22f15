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
