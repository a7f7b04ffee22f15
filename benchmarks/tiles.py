"""Tiles along thin structures against one window around them, both placed from the truth.

The zoom pass (`sam2pal.inference.zoom_pass`) segments a structure again on one square
window around it. An antenna or a leg is long: its window is nearly as large as the
specimen, so the structure stays a few mask cells wide in it. Square tiles along the
structure's midline, each a few times its width, would show it wider. Before building
that into the engine, this benchmark asks whether the model reads thin structures
better on such tiles, with every window placed from the target's true mask (so that
placement, which the engine would take from a first pass, is not what is measured):

* `window`: the zoom pass's framing (`zoom.crop_around` on the template with
  `--zoom_margin`, `zoom.same_framing` on the target's true box);
* `tiles k=K`: each piece of the structure (its 8-connected pieces of at least 2% of its
  area: two antennae, six legs) matched to a piece of the target's true mask (by the
  place of its centre in the specimen's box), its midline (the longest path through its
  skeleton, from the end nearer the specimen's centre) cut into tiles of side K times
  the piece's mean width (at least 32 px), overlapping by half, at the same fractions of
  the target piece's midline, scaled by the two midlines' lengths.

Each crop pair is segmented by the engine (`Propagator`, one template: the template's
crop and the structure's mask in it) and pasted back into the photo; the tiles' masks
are united. Scored by IoU with the true mask, per structure and collection, on the
zoom benchmark's collections (`benchmarks/zoom.py`'s `render`: held-out procedural
insects and NEON beetles, heads up, at 3000 x 2250).

    .venv/bin/python -u benchmarks/tiles.py --threads 1   # ~10 min

Writes benchmarks/results/tiles-<checkpoint>.json (`--record NAME`: NAME.json).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from poses import benchmark_model  # noqa: E402
from record import Recorder  # noqa: E402
from zoom import collection_arguments, render  # noqa: E402

from sam2pal.inference.engine import Propagator  # noqa: E402
from sam2pal.inference.zoom import (  # noqa: E402
    Crop,
    crop_around,
    crop_image,
    crop_masks,
    paste_box,
    same_framing,
)
from sam2pal.io.images import read_image  # noqa: E402
from sam2pal.io.masks import BoxMask, mask_bbox, mask_iou  # noqa: E402
from sam2pal.io.templates import TemplateImage, TemplateInstance, TemplateSet  # noqa: E402
from sam2pal.outputs.measure import _longest_path, _skeleton_graph  # noqa: E402

THIN = ("antenna", "legs")
MIN_PIECE = 0.02  # pieces under this share of the structure's area are left out
MIN_SIDE = 32


# -- geometry ------------------------------------------------------------------------


def pieces(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(piece mask, centre (x, y)) of the 8-connected pieces of at least MIN_PIECE of
    the mask's area."""
    import cv2

    n, labels, stats, centres = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    area = int(np.count_nonzero(mask))
    return [
        (labels == i, centres[i])
        for i in range(1, n)
        if stats[i, cv2.CC_STAT_AREA] >= MIN_PIECE * area
    ]


def midline(piece: np.ndarray, base) -> np.ndarray:
    """(N, 2) points (x, y) along the longest path through the piece's skeleton, from
    the end nearer `base` (x, y)."""
    from skimage.morphology import skeletonize

    x, y, w, h = (int(v) for v in mask_bbox(piece))
    skeleton = skeletonize(np.pad(piece[y : y + h, x : x + w], 1))
    coords, graph = _skeleton_graph(skeleton)
    path = coords[_longest_path(graph)] - 1  # (row, col) in the box
    points = np.stack([path[:, 1] + x, path[:, 0] + y], axis=1).astype(float)
    base = np.asarray(base, float)
    if np.hypot(*(points[-1] - base)) < np.hypot(*(points[0] - base)):
        points = points[::-1]
    return points


def path_length(points: np.ndarray) -> float:
    return float(np.hypot(*np.diff(points, axis=0).T).sum()) if len(points) > 1 else 0.0


def at_fractions(points: np.ndarray, fractions) -> np.ndarray:
    """The path's points at the given fractions of its length (the nearest vertex)."""
    steps = np.hypot(*np.diff(points, axis=0).T) if len(points) > 1 else np.zeros(0)
    along = np.concatenate([[0.0], np.cumsum(steps)])
    index = np.searchsorted(along, np.asarray(fractions, float) * along[-1])
    return points[np.minimum(index, len(points) - 1)]


def match_pieces(template: list, target: list, template_box, target_box) -> list[tuple]:
    """(template index, target index) pairs: the pieces' centres matched by their place
    in the specimen's box (the assignment of least total distance)."""
    from scipy.optimize import linear_sum_assignment

    def places(items, box):
        x, y, w, h = box
        return np.array([[(c[0] - x) / w, (c[1] - y) / h] for _, c in items])

    if not template or not target:
        return []
    cost = np.linalg.norm(
        places(template, template_box)[:, None] - places(target, target_box)[None], axis=2
    )
    rows, cols = linear_sum_assignment(cost)
    return list(zip(rows.tolist(), cols.tolist()))


def centre(box) -> np.ndarray:
    x, y, w, h = box
    return np.array([x + w / 2, y + h / 2])


def square(point, side: int, size) -> Crop:
    """The square window of `side` centred on `point` (x, y) of a photo of `size`."""
    return Crop(int(round(point[1] - side / 2)), int(round(point[0] - side / 2)), side, *size)


def tile_pairs(template_mask, target_mask, template_box, target_box, k: float) -> list[tuple]:
    """(template tile, target tile) Crops along the matched pieces' midlines."""
    template_pieces, target_pieces = pieces(template_mask), pieces(target_mask)
    pairs = []
    for a, b in match_pieces(template_pieces, target_pieces, template_box, target_box):
        t_piece, g_piece = template_pieces[a][0], target_pieces[b][0]
        t_line = midline(t_piece, centre(template_box))
        g_line = midline(g_piece, centre(target_box))
        t_length, g_length = path_length(t_line), path_length(g_line)
        width = np.count_nonzero(t_piece) / max(t_length, 1.0)
        side = max(MIN_SIDE, int(round(k * width)))
        n = max(1, math.ceil(t_length / (side / 2)))
        fractions = [(i + 0.5) / n for i in range(n)]
        g_side = max(MIN_SIDE // 4, int(round(side * g_length / max(t_length, 1.0))))
        for p, q in zip(at_fractions(t_line, fractions), at_fractions(g_line, fractions)):
            pairs.append(
                (square(p, side, template_mask.shape), square(q, g_side, target_mask.shape))
            )
    return pairs


# -- segmenting ----------------------------------------------------------------------


def segment_crop(model, name, template_rgb, template_mask, t_crop, target_rgb, g_crop):
    """The structure's mask on the target's crop, from the template's crop (None where
    the template's crop holds none of it)."""
    masks = crop_masks(template_mask[None], t_crop)
    if not masks.any():
        return None
    crop_rgb = crop_image(template_rgb, t_crop)
    image = TemplateImage(
        "crop", Path("crop"), t_crop.side, t_crop.side, 1, [TemplateInstance(1, 1, 1, masks[0])]
    )
    engine = Propagator(model, TemplateSet({1: name}, [image]), read_image=lambda _: crop_rgb)
    predictions = engine.predict(crop_image(target_rgb, g_crop))
    return predictions[0].mask if len(predictions) else None


def paste(photo_mask: np.ndarray, mask, crop: Crop) -> None:
    """OR a crop's mask into the photo's (the part inside the photo, `zoom.paste_box`)."""
    if mask is None:
        return
    box = paste_box(BoxMask.from_full(mask), crop)
    h, w = box.crop.shape
    photo_mask[box.y0 : box.y0 + h, box.x0 : box.x0 + w] |= box.crop


def run_target(model, template, target, args) -> dict:
    """Per structure and method, the IoU on one target."""
    t_rgb, t_truth = template
    g_rgb, g_truth = target
    t_box = mask_bbox(np.any(np.stack(list(t_truth.values())), axis=0))
    g_box = mask_bbox(np.any(np.stack(list(g_truth.values())), axis=0))
    scores = {}
    for name in args.structures:
        t_mask, g_mask = t_truth.get(name), g_truth.get(name)
        if t_mask is None or g_mask is None or not t_mask.any() or not g_mask.any():
            continue
        methods = {}
        t_crop = crop_around(mask_bbox(t_mask), t_mask.shape, args.zoom_margin, MIN_SIDE)
        g_crop = same_framing(mask_bbox(t_mask), t_crop, mask_bbox(g_mask), g_mask.shape)
        pairs = {"window": [(t_crop, g_crop)]}
        for k in args.k:
            pairs[f"tiles k={k:g}"] = tile_pairs(t_mask, g_mask, t_box, g_box, k)
        for method, crops in pairs.items():
            start = time.perf_counter()
            mask = np.zeros(g_mask.shape, bool)
            for tc, gc in crops:
                paste(mask, segment_crop(model, name, t_rgb, t_mask, tc, g_rgb, gc), gc)
            methods[method] = {
                "iou": round(float(mask_iou(mask, g_mask)), 4),
                "crops": len(crops),
                "side": int(crops[0][0].side) if crops else None,
                "seconds": round(time.perf_counter() - start, 2),
            }
        scores[name] = methods
    return scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    collection_arguments(ap)
    ap.add_argument("--structures", nargs="+", default=list(THIN))
    ap.add_argument(
        "--k", type=float, nargs="+", default=[12.0, 24.0, 40.0], help="tile side / width"
    )
    args = ap.parse_args(argv)
    if args.targets < 1 or min(args.k) <= 0:
        ap.error("--targets must be at least 1 and --k above 0")
    recorder = Recorder(args.record or f"tiles-{Path(args.checkpoint).stem}", args, args.device)
    t_start = time.time()
    model, info = benchmark_model(args)
    results = {"model": info, "size": list(args.size), "k": args.k, "shapes": {}}
    for kind in args.shapes:
        collection = render(
            Path(args.out) / kind, kind, args.targets, args.size, args.seed, args.scale
        )
        template = collection["templates"].images[0]
        names = collection["templates"].categories
        t_truth = {names[i.category_id]: i.mask for i in template.instances}
        t_rgb = read_image(template.path)
        rows = []
        for path, truth in collection["targets"]:
            scores = run_target(model, (t_rgb, t_truth), (read_image(path), truth), args)
            rows.append({"image": path.name, "structures": scores})
        means = {}
        for row in rows:
            for name, methods in row["structures"].items():
                for method, value in methods.items():
                    means.setdefault(name, {}).setdefault(method, []).append(value["iou"])
        means = {
            name: {m: round(float(np.mean(v)), 4) for m, v in methods.items()}
            for name, methods in means.items()
        }
        results["shapes"][kind] = {"means": means, "targets": rows}
        print(f"\n{kind} ({len(rows)} targets), mean IoU")
        for name, methods in means.items():
            print(f"  {name:8s} " + "  ".join(f"{m} {v:.3f}" for m, v in methods.items()))
    results["seconds"] = round(time.time() - t_start, 1)
    print(f"\n{results['seconds']:.0f} s")
    recorder.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
