"""Corrections as templates: how much the reviewed worst images help the rest.

A held-out synthetic collection (`sam2pal.synth.quality`, generator settings training
never saw) is segmented from one template; its images are ranked by QC (the worst
structure's cycle-consistency IoU, as `qc.csv` ranks them). The ground truth plays the
reviewer: the K worst images' true masks are written as a COCO corrections file, which
`sam2pal.outputs.corrections.corrected_templates` turns into K more templates (the
workflow's `corrections: {files, as_templates: true}`), and the collection is segmented
again. Printed per structure: the mean IoU on the images that are neither a template nor
among the 5 worst (the same images for every K), for K = 0 (one template), 1, 3 and 5.

    .venv/bin/python -u benchmarks/review_templates.py --threads 1   # ~10 min on 2 cores

Writes benchmarks/results/review-templates-<checkpoint>.json (`--record`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sam2pal.inference.engine import Propagator  # noqa: E402
from sam2pal.inference.pipeline import load_model  # noqa: E402
from sam2pal.io.coco import category_masks, load_coco  # noqa: E402
from sam2pal.io.images import read_image  # noqa: E402
from sam2pal.io.masks import mask_iou  # noqa: E402
from sam2pal.io.templates import load_coco_templates  # noqa: E402
from sam2pal.models.registry import choose_config  # noqa: E402
from sam2pal.outputs.corrections import corrected_templates  # noqa: E402
from sam2pal.synth.quality import HELD_OUT, make_held_out  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from record import Recorder  # noqa: E402

KS = (1, 3, 5)


def segment(model, templates, images_dir: Path, files: list[str]) -> dict:
    """{file: ({structure: mask}, worst cycle IoU)} of the files, from the templates."""
    engine = Propagator(model, templates, cycle_consistency=True)
    names = dict(templates.categories)
    out = {}
    for file_name in files:
        preds = engine.predict(read_image(images_dir / file_name))
        masks = {names[p.category_id]: p.mask for p in preds}
        cycles = [p.cycle_iou for p in preds if p.cycle_iou is not None]
        out[file_name] = (masks, min(cycles) if cycles else 0.0)
    return out


def mean_ious(predicted: dict, truth: dict, files: list[str]) -> dict:
    """{structure: mean IoU over the files}, and "mean of structures"."""
    per: dict[str, list[float]] = {}
    for file_name in files:
        masks = predicted[file_name][0]
        for name, true in truth[file_name].items():
            if not true.any():
                continue
            pred = masks.get(name, np.zeros_like(true))
            per.setdefault(name, []).append(mask_iou(pred, true))
    result = {name: round(float(np.mean(v)), 4) for name, v in sorted(per.items())}
    result["mean of structures"] = round(float(np.mean(list(result.values()))), 4)
    return result


def corrections_file(ground_truth: dict, files: list[str], path: Path) -> Path:
    """A COCO corrections file holding the true masks of `files` (the reviewer's work)."""
    ids = {im["id"] for im in ground_truth["images"] if im["file_name"] in files}
    data = {
        "images": [im for im in ground_truth["images"] if im["id"] in ids],
        "annotations": [a for a in ground_truth["annotations"] if a["image_id"] in ids],
        "categories": ground_truth["categories"],
    }
    path.write_text(json.dumps(data))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    ap.add_argument("--collection", default="bronze_aligned", help="a held-out collection")
    ap.add_argument("--images", type=int, default=30, help="photos in the collection")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "review_templates"))
    ap.add_argument("--record", default=None, help="default review-templates-<checkpoint>")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rec = Recorder(args.record or f"review-templates-{args.checkpoint}", args)
    spec = next(h for h in HELD_OUT if h.name == args.collection)
    out = Path(args.out)
    coll = out / spec.name
    if not (coll / "ground_truth.json").is_file():
        make_held_out(coll, spec, n_images=args.images, n_templates=1)
    model, info = load_model(choose_config(None, args.checkpoint), args.checkpoint, None, 0, "cpu")
    model.eval()
    images_dir = coll / "images"
    base = load_coco_templates(coll / "templates.json", images_dir).select(max_templates=1)
    gt_path = coll / "ground_truth.json"
    ground_truth = load_coco(gt_path)
    _, truth = category_masks(ground_truth, gt_path)
    template_names = {im.file_name for im in base.images}
    targets = [f for f in sorted(truth) if f not in template_names]

    started = time.perf_counter()
    first = segment(model, base, images_dir, targets)
    ranking = sorted(targets, key=lambda f: first[f][1])  # worst first, as qc.csv
    evaluated = [f for f in targets if f not in ranking[: max(KS)]]
    rows = {"0 (1 template)": mean_ious(first, truth, evaluated)}
    print(f"K=0: {rows['0 (1 template)']}", flush=True)
    for k in KS:
        reviewed = ranking[:k]
        path = corrections_file(ground_truth, reviewed, out / f"corrections-{k}.json")
        templates = corrected_templates(base, [path], images_dir)
        assert len(templates.images) == 1 + k
        again = segment(model, templates, images_dir, evaluated)
        rows[str(k)] = mean_ious(again, truth, evaluated)
        print(f"K={k}: {rows[str(k)]}", flush=True)
    results = {
        "collection": spec.name,
        "description": spec.description,
        "images": len(targets),
        "evaluated": len(evaluated),
        "worst": ranking[: max(KS)],
        "model": {k: info[k] for k in ("checkpoint", "checkpoint_sha256", "image_size")},
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"record: {rec.write(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
