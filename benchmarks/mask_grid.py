"""How much of each structure a mask on the model's output grid can hold: at least
the IoU a perfect model could reach, per structure, on the held-out collections of
`benchmarks/quality.py`, at each input size.

SAM2 predicts a structure's mask as logits on a grid a quarter of its input size (96 x
96 for sam2pal-micro's 384, 128 for 512, 256 for the official models' 1024), which the
engine resizes bilinearly to the photo and thresholds at 0 (`engine.upsample_to_box`;
the photo stretched to the square, `propagate.framing: stretch`). Two maps per true
mask of the targets:

  cells' shares  each cell given the share of it the structure covers, thresholded at
                 one half: what a model that has not learnt to sharpen gives; a
                 structure thinner than half a cell fades from it;
  fitted         logits fitted to the mask (Adam on a soft IoU of the resized logits,
                 from the shares; also every threshold of the shares), the best hard
                 IoU found kept: values a model could give, so the best a model can
                 reach at that input size is at least that.

Where a structure's goal of `quality.py` lies above the fitted value, no training of the
model reaches it at that input size (the zoom pass, `propagate.zoom`, or a larger
input would be the way there); where it lies far below, the model is what falls short.

    .venv/bin/python -u benchmarks/mask_grid.py --threads 1   # five collections, 45 min

Writes benchmarks/results/mask-grid.json (`--record`); the collections are rendered
afresh into `--out` as quality.py renders them (the same photos with the same seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import GOALS, held_out_arguments, rendered_held_out  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.outputs.overlay import mean_width  # noqa: E402
from sam2pal.synth.quality import STRUCTURES  # noqa: E402

#: the input sizes measured: sam2pal-micro's, a larger one, the official models'
INPUT_SIZES = (384, 512, 1024)
#: SAM2's masks are predicted at a quarter of the input size
GRID_STRIDE = 4


def _hard_iou(logits, truth):
    """IoU of (N, 1, H, W) truth with the (N, 1, g, g) logits resized bilinearly to
    (H, W) and thresholded at 0, as the engine does; (N,)."""
    import torch.nn.functional as F

    pred = F.interpolate(logits, size=truth.shape[-2:], mode="bilinear", align_corners=False) > 0
    true = truth > 0.5
    inter = (pred & true).flatten(1).sum(1).float()
    union = (pred | true).flatten(1).sum(1).float()
    return (inter / union.clamp(min=1)).numpy()


def grid_ceiling(masks: np.ndarray, grid: int, steps: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """The IoU of each of `masks` (N, H, W) drawn as a (grid, grid) logit map resized
    bilinearly to (H, W) and thresholded at 0: (the best found, each cell's share of
    the mask minus one half).

    The second is a model that gives each cell its coverage (a thin structure's cells
    are mostly background: it fades). The first starts from those shares thresholded at
    every tenth, then fits the logits to the mask (Adam on a soft IoU, the sigmoid's
    slope rising) and keeps the best hard IoU seen per mask (an empty mask scores 0).
    """
    import torch
    import torch.nn.functional as F

    truth = torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, None]
    share = F.interpolate(truth, size=(grid, grid), mode="area")
    coverage = _hard_iou(share - 0.5, truth)
    best = coverage.copy()
    for threshold in np.linspace(0.1, 0.9, 9):
        best = np.maximum(best, _hard_iou(share - float(threshold), truth))
    logits = ((share - 0.5) * 8).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.25)
    for step in range(steps):
        slope = 1.0 + 9.0 * step / max(steps - 1, 1)
        up = F.interpolate(logits, size=truth.shape[-2:], mode="bilinear", align_corners=False)
        prob = torch.sigmoid(slope * up)
        inter = (prob * truth).flatten(1).sum(1)
        union = (prob + truth - prob * truth).flatten(1).sum(1).clamp(min=1e-6)
        loss = -(inter / union).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 24 or step == steps - 1:
            with torch.no_grad():
                best = np.maximum(best, _hard_iou(logits.detach(), truth))
    return best, coverage


def collection_ceilings(coll: Path, n_templates: int, steps: int) -> dict:
    """Per structure and input size, the mean ceiling over the targets of a collection
    made by `make_held_out` (images from index `n_templates` on), with the structures'
    true mean widths in pixels (area over half the contour length)."""
    from sam2pal.io.coco import category_masks, load_coco

    gt_path = coll / "ground_truth.json"
    _, truth = category_masks(load_coco(gt_path), gt_path)
    per: dict[str, dict[int, list[float]]] = {}
    shares: dict[str, dict[int, list[float]]] = {}
    widths: dict[str, list[float]] = {}
    shape = None
    for file_name in sorted(truth)[n_templates:]:
        names = [s for s in STRUCTURES if s in truth[file_name] and truth[file_name][s].any()]
        masks = np.stack([truth[file_name][s] for s in names])
        shape = masks.shape[1:]
        for size in INPUT_SIZES:
            best, coverage = grid_ceiling(masks, size // GRID_STRIDE, steps)
            for name, value, plain in zip(names, best, coverage):
                per.setdefault(name, {}).setdefault(size, []).append(float(value))
                shares.setdefault(name, {}).setdefault(size, []).append(float(plain))
        for name, mask in zip(names, masks):
            widths.setdefault(name, []).append(mean_width(mask))
    return {
        "photo": list(shape),
        "structures": {
            name: {
                "ceiling": {str(size): round(float(np.mean(v)), 3) for size, v in sizes.items()},
                "coverage": {
                    str(size): round(float(np.mean(v)), 3) for size, v in shares[name].items()
                },
                "width_px": round(float(np.mean(widths[name])), 1),
                "targets": len(sizes[INPUT_SIZES[0]]),
            }
            for name, sizes in per.items()
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    held_out_arguments(ap, "mask_grid", "mask-grid")
    ap.add_argument("--steps", type=int, default=150, help="fitting steps per mask")
    args = ap.parse_args(argv)
    recorder = Recorder(args.record, args)
    results = {"input_sizes": list(INPUT_SIZES), "goals": GOALS, "collections": {}}
    for spec, coll in rendered_held_out(args):
        entry = collection_ceilings(coll, args.n_templates, args.steps)
        results["collections"][spec.name] = entry
        print(f"{spec.name} ({entry['photo'][1]} x {entry['photo'][0]} px)")
        for name, row in entry["structures"].items():
            cells = "  ".join(
                f"{size}: {row['ceiling'][str(size)]:.3f} ({row['coverage'][str(size)]:.3f})"
                for size in INPUT_SIZES
            )
            print(f"  {name:9s} width {row['width_px']:5.1f} px  best (coverage): {cells}")
    recorder.write(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
