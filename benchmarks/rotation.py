"""How a model copes with a target turned (or mirrored) relative to its template.

One head-up template (a held-out NEON beetle), then for each relative rotation the same
10 held-out beetles rendered with their heads turned by that angle (`poses.py`: every
beetle in the template's pose first) (and mirrored at 0 degrees), in one look (a
training palette on paper, so that only the pose differs): zero-shot IoU per structure
and relative rotation. This is what decides how much rotation the training episodes put
between template and target (see resources/models/README.md).

    .venv/bin/python -u benchmarks/rotation.py --checkpoint sam2pal-micro

Writes benchmarks/results/rotation-<checkpoint>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from poses import benchmark_model, heading_style, pose_template  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.inference.engine import Propagator  # noqa: E402
from sam2pal.io.coco import category_masks, load_coco  # noqa: E402
from sam2pal.io.images import read_image  # noqa: E402
from sam2pal.io.masks import mask_iou  # noqa: E402
from sam2pal.synth.quality import STRUCTURES, _with_body, held_out_masks  # noqa: E402
from sam2pal.synth.specimens import make_collection  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    ap.add_argument("--config", default=None)
    ap.add_argument("--angles", type=float, nargs="+", default=[0, 30, 60, 90, 135, 180])
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "rotation"))
    ap.add_argument("--record", default=None)
    args = ap.parse_args(argv)
    recorder = Recorder(args.record or f"rotation-{Path(args.checkpoint).stem}", args, args.device)
    out = Path(args.out)
    model, info = benchmark_model(args)
    names = held_out_masks()
    templates = pose_template(out / "template", names[0], 90.0)
    engine = Propagator(model, templates)
    categories = dict(templates.categories)
    poses = [(a, False) for a in args.angles] + [(0.0, True)]
    results = {"model": info, "poses": {}}
    print("| relative pose | " + " | ".join(STRUCTURES[:6]) + " | mean of parts |")
    print("|---|" + "---|" * 7)
    for angle, mirrored in poses:
        label = f"{angle:g} deg" + (", mirrored" if mirrored else "")
        coll = out / label.replace(" ", "_").replace(",", "")
        make_collection(
            coll,
            n_images=args.targets,
            n_templates=0,
            seed=8,
            mask_names=names[1 : 1 + args.targets],
            style=heading_style(90.0 + angle, flip_prob=1.0 if mirrored else 0.0),
        )
        gt_path = coll / "ground_truth.json"
        _, truth = category_masks(load_coco(gt_path), gt_path)
        ious: dict[str, list[float]] = {}
        for file_name in sorted(truth):
            image = read_image(coll / "images" / file_name)
            preds = {categories[p.category_id]: p.mask for p in engine.predict(image)}
            pred, gt = (
                _with_body(preds, image.shape[:2]),
                _with_body(truth[file_name], image.shape[:2]),
            )
            for s in STRUCTURES:
                if s in gt and gt[s].any() and s in pred:
                    ious.setdefault(s, []).append(float(mask_iou(pred[s], gt[s])))
        table = {s: round(float(np.mean(v)), 3) for s, v in ious.items()}
        table["mean"] = round(
            float(np.mean([np.mean(v) for s, v in ious.items() if s != "body"])), 3
        )
        results["poses"][label] = table
        print(
            f"| {label} | "
            + " | ".join(f"{table.get(s, float('nan')):.3f}" for s in STRUCTURES[:6])
            + f" | {table['mean']:.3f} |"
        )
    recorder.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
