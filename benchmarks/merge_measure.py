"""Memory of the collection-wide steps after segmentation, on a synthetic collection of
N images x 5 structures (default 100,000 x 5 = 500,000 masks).

The per-shard result files are made up (no model runs): each image gets five masks
(two blobs, a plate, a thin curved antenna and a leg), drawn from a pool of varied
shapes so that RLE sizes and measures vary like real ones. Then each step runs in its
own process, so that its peak RSS is its own:

  merge     sam2pal.inference.pipeline.merge: the shards' JSON-lines files -> predictions.json
  qc        sam2pal.inference.pipeline.qc: the shards' files -> qc.csv
  measure   sam2pal.outputs.measure.measure_coco: predictions.json -> long + wide tables
            (streamed: ijson, one annotation at a time)
  json.load the whole predictions.json loaded as Python objects, which is what any
            step that reads the file whole would hold at least (the measure step did,
            before it streamed)

Prints seconds and peak RSS per step (the step's process; for measure also the largest
of its worker processes and the total, process + threads x worker; the other steps'
only child process is a short `git` call) and each total as a multiple of json.load's;
writes benchmarks/results/merge_measure.json (`--record`).

    .venv/bin/python benchmarks/merge_measure.py                 # 100,000 images
    .venv/bin/python benchmarks/merge_measure.py --images 5000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import Recorder  # noqa: E402

STRUCTURES = ["head", "pronotum", "elytra", "antenna", "legs"]

STEP = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
step, work = sys.argv[2], sys.argv[3]
from pathlib import Path
work = Path(work)
shards = sorted(str(p) for p in work.glob("shard-*.jsonl"))
start = time.perf_counter()
if step == "merge":
    from sam2pal.inference import pipeline
    result = pipeline.merge(shards, work / "templates.json", sorted(str(p) for p in work.glob("shard-*.run.json")),
                            work / "predictions.json", provenance_json=work / "provenance.json")
elif step == "qc":
    from sam2pal.inference import pipeline
    result = pipeline.qc(shards, work / "templates.json", work / "qc.csv")
elif step == "measure":
    from sam2pal.outputs.measure import measure_coco
    result = measure_coco(work / "predictions.json", work / "measurements.csv", px_per_mm=10.0,
                          wide_csv=work / "measurements_wide.csv", threads=int(sys.argv[4]))
elif step == "json.load":
    with open(work / "predictions.json") as handle:
        data = json.load(handle)
    result = {"annotations": len(data["annotations"])}
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"step": step, "seconds": round(seconds, 1), "peak_mb": round(peak, 1),
                  "worker_peak_mb": round(worker, 1), "result": result}))
"""


def shape_pool(rng, height: int, width: int, per_kind: int = 40):
    """Varied masks of each structure, as COCO RLE dicts."""
    import cv2

    from sam2pal.io.masks import encode_rle

    pool = {name: [] for name in STRUCTURES}
    for _ in range(per_kind):
        cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
        for name, (ax, ay) in (
            ("head", (0.08, 0.07)),
            ("pronotum", (0.12, 0.1)),
            ("elytra", (0.22, 0.16)),
        ):
            mask = np.zeros((height, width), np.uint8)
            axes = (
                int(width * ax * rng.uniform(0.8, 1.2)),
                int(height * ay * rng.uniform(0.8, 1.2)),
            )
            offset = {"head": -0.25, "pronotum": -0.1, "elytra": 0.15}[name] * width
            cv2.ellipse(
                mask, (int(cx + offset), int(cy)), axes, rng.uniform(-20, 20), 0, 360, 1, -1
            )
            pool[name].append(encode_rle(mask.astype(bool)))
        for name, thickness in (("antenna", 2), ("legs", 3)):
            mask = np.zeros((height, width), np.uint8)
            x = np.linspace(0.1, 0.45, 6) * width + rng.uniform(0, 0.3) * width
            y = cy + np.cumsum(rng.normal(0, height * 0.05, 6))
            points = np.stack([x, np.clip(y, 2, height - 3)], 1).astype(np.int32)
            cv2.polylines(mask, [points], False, 1, thickness)
            pool[name].append(encode_rle(mask.astype(bool)))
    return pool


def make_collection(
    work: Path, n_images: int, n_shards: int, height: int, width: int, seed: int = 0
) -> None:
    """Shard result files, their run files and a template file, as the workflow
    writes them."""
    from sam2pal.inference.shards import label, shard_index

    rng = np.random.default_rng(seed)
    pool = shape_pool(rng, height, width)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(STRUCTURES)]
    (work / "templates.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": categories})
    )
    names = sorted(f"drawer_{i // 1000:03d}/specimen_{i:06d}.jpg" for i in range(n_images))
    handles = {k: open(work / f"shard-{label(k, n_shards)}.jsonl", "w") for k in range(n_shards)}
    for name in names:
        picks = rng.integers(0, len(pool["head"]), len(STRUCTURES))
        structures = []
        for cid, (structure, pick) in enumerate(zip(STRUCTURES, picks), start=1):
            rle = pool[structure][pick]
            structures.append(
                {
                    "category_id": cid,
                    "instance": 1,
                    "segmentation": rle,
                    "area": 1,
                    "bbox": [0, 0, 1, 1],
                    "score": 0.9,
                    "predicted_iou": 0.9,
                    "object_score": 5.0,
                    "cycle_iou": round(float(rng.uniform(0.3, 1.0)), 4),
                    "clamped": False,
                }
            )
        record = {"file_name": name, "width": width, "height": height, "structures": structures}
        handles[shard_index(name, n_shards)].write(json.dumps(record) + "\n")
    for handle in handles.values():
        handle.close()
    run = {
        "sam2pal_version": "bench",
        "started": "2026-01-01T00:00:00",
        "finished": "2026-01-01T01:00:00",
        "host": "bench",
        "device": "cpu",
        "device_name": "cpu",
        "model": {"seed": 0},
        "templates": {},
        "settings": {},
        "counts": {},
        "versions": {},
    }
    for k in range(n_shards):
        (work / f"shard-{label(k, n_shards)}.run.json").write_text(
            json.dumps(dict(run, shard=label(k, n_shards)))
        )
    # the workflow writes every shard file in file-name order
    for k in range(n_shards):
        path = work / f"shard-{label(k, n_shards)}.jsonl"
        lines = sorted(
            path.read_text().splitlines(), key=lambda line: json.loads(line)["file_name"]
        )
        path.write_text("\n".join(lines) + ("\n" if lines else ""))


def run_step(step: str, work: Path, threads: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", STEP, str(ROOT / "src"), step, str(work), str(threads)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"{step} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=128)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the files (default: a temp folder)"
    )
    parser.add_argument(
        "--record", default="merge_measure", help="result name in benchmarks/results/"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))

    recorder = Recorder(args.record, args)
    work = args.work or Path(tempfile.mkdtemp(prefix="sam2pal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    make_collection(work, args.images, args.shards, args.height, args.width)
    print(
        f"{args.images} images x {len(STRUCTURES)} structures in {args.shards} shards "
        f"({args.width}x{args.height} px), made in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    results = {}
    for step in ("merge", "qc", "measure", "json.load"):
        results[step] = run_step(step, work, args.threads)
        print(
            f"  {step:10s} {results[step]['seconds']:8.1f} s  peak {results[step]['peak_mb']:8.1f} MB",
            flush=True,
        )
    for step, r in results.items():  # measure's process plus its worker processes at their peaks
        workers = (
            args.threads * r["worker_peak_mb"] if step == "measure" and args.threads > 1 else 0
        )
        r["total_peak_mb"] = round(r["peak_mb"] + workers, 1)
    size_mb = os.path.getsize(work / "predictions.json") / 2**20
    base = results["json.load"]["peak_mb"]
    print(
        f"\npredictions.json: {size_mb:.0f} MB, {results['merge']['result']['annotations']} annotations"
    )
    print(
        f"{'step':10s} {'seconds':>8s} {'peak MB':>9s} {'workers MB':>11s} {'total MB':>9s} {'vs json.load':>13s}"
    )
    for step, r in results.items():
        print(
            f"{step:10s} {r['seconds']:8.1f} {r['peak_mb']:9.1f} {r['worker_peak_mb']:11.1f} "
            f"{r['total_peak_mb']:9.1f} {r['total_peak_mb'] / base:12.2f}x"
        )
    recorder.write(
        {
            "images": args.images,
            "structures": len(STRUCTURES),
            "shards": args.shards,
            "threads": args.threads,
            "predictions_mb": round(size_mb, 1),
            "steps": results,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
