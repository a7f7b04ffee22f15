"""Which epoch, and which structures to the adapter: rules scored on recorded runs.

`benchmarks/palindrome.py --score-epochs` keeps, for every epoch of a run, the
targets' true IoU per structure and photo (the adapter segmenting every structure)
and the held-out templates' IoU per structure and view. From one run this script
scores, without training again, the rules the fine-tuning could follow:

  per structure, the untouched model (epoch 0) where the held-out templates' IoU, the
  adapter's minus the untouched model's, is below zero by more than `margin` standard
  errors (`sam2pal.training.palindrome.left_untouched`; the workflow's margin is
  `Trainer.UNTOUCHED_MARGIN`, 2); a negative margin keeps the adapter only where it
  is surely better. The epoch: the one whose combined held-out template score is
  highest (epoch 0 competes), as `Trainer.score` does.

For each rule it gives the targets' mean IoU of the parts at the epoch it picks, the
same with the epoch picked in hindsight (the best the rule's structure choice allows),
and the structures left to the untouched model; for each run, the ceiling: each part
at the epoch where it did best, which no choice of one epoch and of the structures
left untouched can beat. Epoch 0's targets are the zero-shot
row. The targets' masks of a structure left untouched are epoch 0's: in the workflow
the untouched model tracks those structures in a group of their own, so the figures
differ a little from a run's table.

    .venv/bin/python benchmarks/selection.py palindrome-sam2pal-micro-v2-epochs palindrome-sam2pal-micro-v2-epochs-b
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import load  # noqa: E402

from sam2pal.training.palindrome import Trainer, left_untouched  # noqa: E402

#: margins scored: the workflow's first; None: the adapter for every structure
MARGINS = (Trainer.UNTOUCHED_MARGIN, 1.0, 0.0, -1.0, -2.0, None)


def _parts_mean(history: list[dict], epoch: int, untouched: list[str]) -> float:
    """The targets' mean IoU over the rows of the parts (body left out, as the
    quality tables do): the structures in `untouched` from epoch 0."""
    rows = [
        iou
        for name, values in history[epoch]["targets"].items()
        if name != "body"
        for iou in (history[0]["targets"][name] if name in untouched else values)
    ]
    return sum(rows) / len(rows) if rows else math.nan


def _ceiling(history: list[dict]) -> float:
    """The targets' mean IoU of the parts with each part at the epoch where its mean was
    highest (epoch 0 included): what no choice of one epoch and of the structures left
    untouched can beat."""
    rows = []
    for name in history[0]["targets"]:
        if name == "body":
            continue
        per_epoch = [row["targets"][name] for row in history]
        best = max(per_epoch, key=lambda v: (sum(v) / len(v)) if v else -1.0)
        rows += best
    return sum(rows) / len(rows) if rows else math.nan


def _rule(history: list[dict], margin: float | None) -> dict:
    """The epoch `margin`'s rule picks, its structures left untouched and the targets'
    mean there, and the same at the epoch that would have been best in hindsight."""
    before = history[0]["val_template_view_ious"]
    before_means = history[0]["val_template_ious"]
    picks = []
    for row in history:
        left = (
            [] if margin is None else left_untouched(before, row["val_template_view_ious"], margin)
        )
        scores = [before_means[n] if n in left else v for n, v in row["val_template_ious"].items()]
        picks.append((sum(scores) / len(scores), left))
    best = max(range(len(picks)), key=lambda e: (picks[e][0], -e))  # the first of ties
    means = [_parts_mean(history, e, picks[e][1]) for e in range(len(history))]
    hindsight = max(range(len(means)), key=lambda e: (means[e], -e))
    return {
        "epoch": best,
        "untouched": picks[best][1],
        "mean": means[best],
        "hindsight_epoch": hindsight,
        "hindsight_mean": means[hindsight],
    }


def score_rules(records: list[str]) -> dict:
    """{(collection, method): {"zero_shot": mean, "ceiling": `_ceiling`, "rules": {margin:
    `_rule`}}} of the
    runs in `records` recorded with `--score-epochs`."""
    out = {}
    for record in records:
        for name, entry in load(record)["results"]["collections"].items():
            for method, run in entry["methods"].items():
                history = run.get("history") or []
                if not history or "targets" not in history[0]:
                    continue
                out[(name, method)] = {
                    "zero_shot": _parts_mean(history, 0, []),
                    "ceiling": _ceiling(history),
                    "rules": {margin: _rule(history, margin) for margin in MARGINS},
                }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+", help="record names in benchmarks/results")
    args = ap.parse_args(argv)
    for (name, method), scored in score_rules(args.records).items():
        print(
            f"\n{name} / {method}: zero-shot {scored['zero_shot']:.3f}, ceiling "
            f"(each part at its best epoch) {scored['ceiling']:.3f}"
        )
        print("margin  epoch  mean of parts  (hindsight epoch: mean)  left to the untouched model")
        for margin, rule in scored["rules"].items():
            label = "none" if margin is None else f"{margin:+.0f}"
            print(
                f"{label:>6}  {rule['epoch']:5d}  {rule['mean']:.3f}          "
                f"({rule['hindsight_epoch']:2d}: {rule['hindsight_mean']:.3f})"
                f"             {', '.join(rule['untouched']) or '-'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
