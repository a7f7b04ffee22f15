"""Do the QC scores rank the predictions the way their true IoU does? Zero-shot, one
template, on the held-out collections of `benchmarks/quality.py` (the same photos, the
same seeds), three ways:

  pooled           every part prediction of a collection in one ranking: the issue's
                   goal (`quality.py`'s rank correlation). It rewards a score that
                   tells the structures apart (eyes low, elytra high) even where it
                   cannot tell a good antenna from a bad one;
  within structure the same per structure, averaged over the structures: whether it
                   picks out the photos whose antenna (say) is wrong;
  per photo        each photo's score (qc.csv's `qc_score`, now the mean of its
                   structures' cycle IoU x stability, before the lowest cycle IoU; and
                   other poolings of its predictions' scores) against its parts' mean
                   true IoU: the order in which qc.csv sends photos to review.

Signals: cycle IoU, SAM2's predicted IoU, its object score, the mask's stability (SAM's
stability score: the IoU of the mask cut at logits -1 and +1), and products of them
(cycle IoU x stability: the workflow's QC score of a structure). Spearman correlations
(ties get their mean rank).

    .venv/bin/python -u benchmarks/qc_rank.py --threads 1   # five collections, about a minute

Writes benchmarks/results/qc-rank.json (`--record`); the collections are rendered
afresh into `--out` as quality.py renders them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import held_out_arguments, rendered_held_out  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.synth.quality import spearman  # noqa: E402

#: the signals compared, each from a prediction's row
SIGNALS = {
    "cycle IoU": lambda r: r["cycle_iou"],
    "predicted IoU": lambda r: r["predicted_iou"],
    "object score": lambda r: r["object_score"],
    "stability": lambda r: r["stability"],
    "cycle IoU x predicted IoU": lambda r: r["cycle_iou"] * r["predicted_iou"],
    "cycle IoU x stability": lambda r: r["cycle_iou"] * r["stability"],
}


#: a photo's score from its predictions': qc.csv's (the mean cycle IoU x stability;
#: before, the lowest cycle IoU), and others
PHOTO_SCORES = {
    "lowest cycle IoU": (min, "cycle IoU"),
    "mean cycle IoU": (np.mean, "cycle IoU"),
    "median cycle IoU": (np.median, "cycle IoU"),
    "mean predicted IoU": (np.mean, "predicted IoU"),
    "mean object score": (np.mean, "object score"),
    "mean stability": (np.mean, "stability"),
    "mean cycle IoU x predicted IoU": (np.mean, "cycle IoU x predicted IoU"),
    "lowest cycle IoU x stability": (min, "cycle IoU x stability"),
    "mean cycle IoU x stability": (np.mean, "cycle IoU x stability"),
}


def rank_agreement(rows: list[dict]) -> dict:
    """Spearman correlations of each signal with the true IoU over part predictions
    (`rows`: dicts with "image", "structure", "iou" and the signals' fields; the body
    left out): {"pooled": {signal: r}, "within_structure": {signal: mean r over the
    structures}, "per_photo": {photo score (`PHOTO_SCORES`): r}}, each r
    rounded to 3 places (nan where undefined: a constant signal, under 3 pairs)."""
    rows = [r for r in rows if r["structure"] != "body" and r["cycle_iou"] is not None]
    truth = [r["iou"] for r in rows]
    out = {"pooled": {}, "within_structure": {}, "per_photo": {}}
    structures = sorted({r["structure"] for r in rows})
    for name, signal in SIGNALS.items():
        out["pooled"][name] = round(spearman([signal(r) for r in rows], truth), 3)
        within = []
        for s in structures:
            group = [r for r in rows if r["structure"] == s]
            value = spearman([signal(r) for r in group], [r["iou"] for r in group])
            if not np.isnan(value):
                within.append(value)
        out["within_structure"][name] = round(float(np.mean(within)), 3) if within else np.nan
    photos = sorted({r["image"] for r in rows})
    by_photo = [[r for r in rows if r["image"] == p] for p in photos]
    true_mean = [float(np.mean([r["iou"] for r in g])) for g in by_photo]
    for name, (pool, signal) in PHOTO_SCORES.items():
        score = [float(pool([SIGNALS[signal](r) for r in g])) for g in by_photo]
        out["per_photo"][name] = round(spearman(score, true_mean), 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    held_out_arguments(ap, "qc_rank", "qc-rank")
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    args = ap.parse_args(argv)
    from sam2pal.errors import InputError
    from sam2pal.models.build import build_model
    from sam2pal.models.download import resolve_checkpoint_digest
    from sam2pal.models.registry import config_for_checkpoint
    from sam2pal.synth.quality import score_collection

    try:
        checkpoint, digest = resolve_checkpoint_digest(args.checkpoint)
    except InputError as e:
        ap.error(str(e))
    recorder = Recorder(args.record, args)
    model = build_model(config_for_checkpoint(args.checkpoint), checkpoint)
    results = {"checkpoint_sha256": digest, "collections": {}}
    for spec, coll in rendered_held_out(args):
        scores = score_collection(model, coll, 1, args.n_templates, cycle=True)
        entry = rank_agreement(scores.rows)
        entry["predictions"] = sum(1 for r in scores.rows if r["structure"] != "body")
        results["collections"][spec.name] = entry
        print(spec.name, entry)
    recorder.write(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
