"""Time of `sam2pal.outputs.measure.measure_mask` per mask, on masks of a 12-megapixel photo.

Each mask lies in a full 4000 x 3000 frame (rows x cols: 3000 x 4000), as the measure
step gets it from a predictions file:

* the synthetic parts of tests/measure_golden.py (``photo/...``): a beetle body of 2.3
  million pixels (alone, and with 60 specks around it), a body-sized band (2 million
  pixels, measured along its centre line), curved antennae 20 to 40 px wide (one, and
  two in one mask), a leg with a knee, rectangles, an eye-sized and a large disc, a
  ring with a disc in its hole;
* the golden set's real parts enlarged 4 and 8 times (``real_x4/...``, ``real_x8/...``:
  vendored NEON beetle part masks, nearest neighbour), the size of parts in a
  12-megapixel photo; those larger than the frame keep their own size.

One core: OpenMP / BLAS threads are set to 1 before anything runs, and OpenCV runs
sequentially. Each mask is measured once to warm up, then `--repeat` times; the table gives the
fastest and the median wall time and the median CPU time of the process (on a busy
machine the fastest run is the best estimate of the cost). Writes
benchmarks/results/measure-speed.json (`--record`).

    .venv/bin/python -u benchmarks/measure_speed.py
    .venv/bin/python -u benchmarks/measure_speed.py --only photo/ --repeat 3
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
import measure_golden  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.outputs.measure import measure_mask  # noqa: E402

FRAME = measure_golden.PHOTO  # rows, cols


def shapes(only: str | None):
    """(name, build) of the masks, each in a 3000 x 4000 frame where it fits."""
    out = []
    for name, build in measure_golden.shapes():
        if not name.startswith(("photo/", "real_x4/", "real_x8/")):
            continue
        if only and only not in name:
            continue
        out.append((name, build))
    return out


def in_frame(mask: np.ndarray) -> np.ndarray:
    """The mask in the middle of a 3000 x 4000 frame, if it fits (else as it is)."""
    rows, cols = mask.shape
    if mask.shape == FRAME or rows > FRAME[0] or cols > FRAME[1]:
        return mask
    frame = np.zeros(FRAME, bool)
    top, left = (FRAME[0] - rows) // 2, (FRAME[1] - cols) // 2
    frame[top : top + rows, left : left + cols] = mask
    return frame


def time_one(mask: np.ndarray, repeat: int) -> dict:
    measure_mask(mask)  # warm-up
    wall, cpu = [], []
    for _ in range(repeat):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        measure_mask(mask)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return {
        "min_ms": round(1000 * min(wall), 2),
        "median_ms": round(1000 * statistics.median(wall), 2),
        "cpu_median_ms": round(1000 * statistics.median(cpu), 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed runs per mask (after one warm-up run)"
    )
    parser.add_argument("--only", default=None, help="only the masks whose name contains this")
    parser.add_argument(
        "--record", default="measure-speed", help="result name in benchmarks/results/"
    )
    args = parser.parse_args(argv)
    cv2.setNumThreads(0)  # OpenCV sequential: one core
    recorder = Recorder(args.record, args)

    results = {}
    print(
        f"{'mask':55s} {'pixels':>9s} {'frame':>11s} {'min ms':>8s} {'median':>8s} {'cpu ms':>8s}",
        flush=True,
    )
    for name, build in shapes(args.only):
        mask = in_frame(build())
        if not mask.any():
            continue
        timing = time_one(mask, args.repeat)
        results[name] = {"pixels": int(np.count_nonzero(mask)), "frame": list(mask.shape), **timing}
        print(
            f"{name:55s} {results[name]['pixels']:9d} {mask.shape[0]:5d}x{mask.shape[1]:<5d} "
            f"{timing['min_ms']:8.1f} {timing['median_ms']:8.1f} {timing['cpu_median_ms']:8.1f}",
            flush=True,
        )

    worst = max(results, key=lambda k: results[k]["min_ms"])
    summary = {
        "masks": len(results),
        "max_min_ms": results[worst]["min_ms"],
        "max_median_ms": max(r["median_ms"] for r in results.values()),
        "slowest": worst,
        "median_of_min_ms": round(statistics.median(r["min_ms"] for r in results.values()), 2),
    }
    print(
        f"\n{summary['masks']} masks: slowest {worst} {summary['max_min_ms']:.1f} ms (fastest run), "
        f"largest median {summary['max_median_ms']:.1f} ms, median mask {summary['median_of_min_ms']:.1f} ms"
    )
    recorder.write({"threads": 1, "repeat": args.repeat, "summary": summary, "masks": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
