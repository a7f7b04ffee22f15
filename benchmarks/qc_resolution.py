"""Does the cycle-consistency QC lose anything on the model's grid?

The engine's fast path takes the cycle IoU (QC) on the model's S x S input grid; the
exact path (`propagate.exact`) at each template's full pixel size. The QC is only worth
what it ranks: for each held-out collection (see `sam2pal.quality`; photos that
`sam2pal pretrain` never saw, larger than the model's input), this prints the Spearman
rank correlation of the cycle IoU with the true IoU both ways, the largest difference
(goal: at most 0.02), the largest difference of single cycle IoUs, and the time per
photo of each.

    .venv/bin/python -u benchmarks/qc_resolution.py --record     # sam2pal-micro, 1600 x 1200 photos
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sam2pal.pipeline import _run_model  # noqa: E402
from sam2pal.quality import HELD_OUT, make_held_out, rank_correlation, score_collection  # noqa: E402
from sam2pal.registry import choose_config  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from record import Recorder  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "qc_resolution"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="sam2pal-micro")
    parser.add_argument("--images", type=int, default=24, help="photos per collection (the first is the template)")
    parser.add_argument("--size", default="1600x1200", help="photo size, width x height")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    recorder = Recorder(f"qc-resolution-{args.checkpoint}", args, args.device) if args.record else None
    width, height = (int(v) for v in args.size.split("x"))
    model, _, _ = _run_model(choose_config(None, args.checkpoint), args.checkpoint, None, 0, args.device,
                             args.threads, None, None)
    results, worst = {}, 0.0
    for spec in HELD_OUT:
        folder = OUT / f"{spec.name}-{args.size}-{args.images}"
        if not (folder / "ground_truth.json").exists():
            make_held_out(folder, spec, args.images, 1, size=(width, height))
        row = {}
        cycles = {}
        for name, exact in (("exact", True), ("grid", False)):
            t0 = time.perf_counter()
            scores = score_collection(model, folder, 1, 1, cycle=True, exact=exact)
            row[f"{name}_s_per_photo"] = (time.perf_counter() - t0) / (args.images - 1)
            row[f"{name}_rank_correlation"] = rank_correlation(scores)
            cycles[name] = np.array([r["cycle_iou"] for r in scores.rows if r["cycle_iou"] is not None], float)
            row["predictions"] = len(scores.rows)
        row["rank_correlation_difference"] = abs(row["grid_rank_correlation"] - row["exact_rank_correlation"])
        row["max_cycle_iou_difference"] = float(np.abs(cycles["grid"] - cycles["exact"]).max())
        row["mean_cycle_iou_difference"] = float(np.abs(cycles["grid"] - cycles["exact"]).mean())
        worst = max(worst, row["rank_correlation_difference"])
        results[spec.name] = row
        print(f"{spec.name}: rank correlation exact {row['exact_rank_correlation']:.3f}, grid "
              f"{row['grid_rank_correlation']:.3f} (difference {row['rank_correlation_difference']:.3f}); "
              f"cycle IoU differs by {row['mean_cycle_iou_difference']:.4f} on average, "
              f"{row['max_cycle_iou_difference']:.4f} at most; {row['exact_s_per_photo']:.2f} vs "
              f"{row['grid_s_per_photo']:.2f} s per photo", flush=True)
    summary = {"collections": results, "max_rank_correlation_difference": worst, "goal": 0.02,
               "goal_met": worst <= 0.02, "photo_size": [width, height]}
    print(f"largest rank-correlation difference {worst:.3f} (goal <= 0.02: {'met' if worst <= 0.02 else 'missed'})")
    if recorder is not None:
        recorder.write(summary)


if __name__ == "__main__":
    main()
