"""Which of SAM2's candidate masks, and absent structures: the engine's mask rules side by
side on the held-out collections (`propagate.mask_choice`, `propagate.absent`).

For a structure tracked from memory SAM2's mask decoder gives three candidate masks; SAM2
keeps the one whose IoU it predicts highest and blanks it when its object score says
the structure is absent. Zero-shot, on the held-out collections of `quality.py` (the
same photos given the same `--n-images`, `--n-templates`, `--seed-offset`, `--size`),
each target is segmented under four rules:

* `sam2 / blank`: SAM2's own rule (the engine before these settings);
* `sam2 / keep`: SAM2's pick, kept where SAM2 judges the structure absent;
* `templates / blank`: per structure, the candidate that segments the templates from
  their own memory best, where it beats SAM2's pick there by 0.1 IoU
  (`engine.template_slots`), else SAM2's pick; absent ones blanked;
* `templates / keep`: both (the workflow's default).

from the first template alone and (`--templates 1 3`) from the first three. Per rule:
the IoU per structure, the mean of the parts, the cycle IoU's rank correlation with the
true IoU (the QC signal), and the candidate each structure got.

    .venv/bin/python -u benchmarks/readout.py --threads 1 --record readout-sam2pal-micro  # ~8 min
    .venv/bin/python -u benchmarks/readout.py --threads 1 --seed-offset 1000 \\
        --record readout-sam2pal-micro-s1000                  # other photos, the same settings
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from poses import benchmark_model  # noqa: E402
from quality import held_out_arguments, rendered_held_out  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.synth.quality import STRUCTURES, rank_correlation, score_collection  # noqa: E402

#: (mask_choice, absent), SAM2's own rule first, the workflow's default last
RULES = (("sam2", "blank"), ("sam2", "keep"), ("templates", "blank"), ("templates", "keep"))


def rule_name(mask_choice: str, absent: str) -> str:
    return f"{mask_choice} / {absent}"


def templates_label(n: int) -> str:
    """The record's key of the rows segmented from the first `n` templates."""
    return f"{n} template" + ("s" if n > 1 else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    ap.add_argument("--config", default=None, help="default: the checkpoint's own")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--templates",
        type=int,
        nargs="+",
        default=[1, 3],
        help="segment from the first N templates (each N a row; at most --n-templates)",
    )
    held_out_arguments(ap, out="readout", record="readout-sam2pal-micro")
    args = ap.parse_args(argv)
    if max(args.templates) > args.n_templates or min(args.templates) < 1:
        ap.error(f"--templates must be between 1 and --n-templates ({args.n_templates})")
    recorder = Recorder(args.record, args, args.device)
    model, info = benchmark_model(args)
    results = {"model": info, "rules": [rule_name(*r) for r in RULES], "collections": {}}
    for spec, coll in rendered_held_out(args):
        entry = results["collections"].setdefault(spec.name, {})
        for n in args.templates:
            rows = entry.setdefault(templates_label(n), {})
            for mask_choice, absent in RULES:
                scores = score_collection(
                    model,
                    coll,
                    n,
                    args.n_templates,
                    cycle=True,
                    mask_choice=mask_choice,
                    absent=absent,
                )
                absent_share = np.mean(
                    [r["object_score"] < 0.5 for r in scores.rows if r["object_score"] is not None]
                )
                rows[rule_name(mask_choice, absent)] = {
                    "iou": scores.table(),
                    "rank_correlation": round(rank_correlation(scores), 3),
                    "judged_absent": round(float(absent_share), 3),
                    "slots": scores.slots,
                }
            print(f"{spec.name}, {n} template(s):")
            for name, row in rows.items():
                cells = " ".join(
                    f"{s} {row['iou'][s]:.3f}"
                    for s in STRUCTURES
                    if row["iou"].get(s) == row["iou"].get(s)
                )
                print(
                    f"  {name:18s} mean {row['iou']['mean']:.3f} rank {row['rank_correlation']:.2f} {cells}"
                )
            print(f"  slots {rows[rule_name('templates', 'keep')]['slots']}", flush=True)
    summary = {}
    for n in args.templates:
        label = templates_label(n)
        summary[label] = {
            rule_name(*r): round(
                float(
                    np.mean(
                        [
                            e[label][rule_name(*r)]["iou"]["mean"]
                            for e in results["collections"].values()
                        ]
                    )
                ),
                4,
            )
            for r in RULES
        }
        print(f"mean of the parts over the collections, {label}: {summary[label]}")
    results["summary"] = summary
    recorder.write(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
