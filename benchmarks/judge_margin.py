"""How sure the held-out templates must be before a structure leaves the adapter: the
judged palindrome's per-structure choice replayed at other margins.

With three templates, `benchmarks/quality.py` trains the palindrome on the first and
holds the other two out to judge it (`finetune.holdout_templates`): per structure, the
segmentation keeps the untouched model where the adapter's IoU on the held-out templates
and their views is below the untouched model's by more than `Trainer.UNTOUCHED_MARGIN`
standard errors of the difference (`training.palindrome.left_untouched`). Two photos
and their views are a noisy judge. This script takes the judged adapters a quality.py
run left in its `--out` folder and, per collection, segments the table's targets (from
the first template, as the table does) with the adapter for every structure and with
the untouched model; every margin's choice is then a choice per structure between two
known rows, so the margins are compared on the same adapter, the same targets and the
same judges:

* margin m: the untouched model keeps a structure where the judges' mean difference
  plus m standard errors is below zero (m = 2, the default: only where the adapter is
  surely worse; m = 0: wherever it is worse on average; m = -2: unless it is surely
  better);
* the two ends (adapter for every structure; untouched model for every structure) and
  the ceiling (per structure, whichever is better on the targets themselves);
* a label-free check on the targets themselves: per structure, the mean cycle IoU
  (`Propagator(cycle_consistency=True)`: the target's mask segments the template back,
  scored against the template's known mask, the score qc.csv reports) of the adapter
  against the untouched model's; the untouched model keeps a structure where the
  adapter's is lower ("targets' cycle"), or where either that or the default margin's
  judges say so ("judges or targets' cycle"). The adapter was trained on these photos
  to raise the cycle it ends on, so the check can only catch a loss large enough to
  show through that.

The epoch stays the one the run picked (with the default margin): the trainer keeps only
that adapter and the last epoch's.

    .venv/bin/python -u benchmarks/judge_margin.py --threads 2 \\
        --checkpoint resources/models/sam2pal-micro.pt --runs /tmp/q/a /tmp/q/small_mixed ...

Prints, per collection and margin, the structures left to the untouched model and the
mean IoU of the parts; writes benchmarks/results/<--record>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from palindrome import model_arguments  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.inference.pipeline import _run_model  # noqa: E402
from sam2pal.settings import Segmentation  # noqa: E402
from sam2pal.synth.quality import Scores, score_collection  # noqa: E402
from sam2pal.training.palindrome import Trainer, left_untouched  # noqa: E402

MARGINS = (2.0, 1.0, 0.0, -1.0, -2.0)
ADAPTER_RECORD = "sam2pal_adapter.json"
# as quality.py segments its table (its defaults)
ENGINE = {"framing": "stretch", "tone": Segmentation.tone, "zoom": Segmentation.zoom}


def judged_runs(folders: list[Path]) -> list[tuple[str, Path, Path]]:
    """(collection, collection folder, judged adapter folder) for every `<name>-judged`
    training folder under `folders` (quality.py's --out) beside its collection `<name>`."""
    found = []
    for folder in folders:
        for run in sorted(folder.glob("*-judged")):
            name = run.name[: -len("-judged")]
            coll, adapter = folder / name, run / "adapter"
            if (coll / "templates.json").is_file() and (adapter / ADAPTER_RECORD).is_file():
                found.append((name, coll, adapter))
    return found


def every_structure(adapter: Path, folder: Path) -> Path:
    """A copy of `adapter` that leaves no structure to the untouched model."""
    copy = folder / "every-structure"
    shutil.copytree(adapter, copy)
    record = json.loads((copy / ADAPTER_RECORD).read_text())
    record.setdefault("selection", {})["untouched_structures"] = []
    (copy / ADAPTER_RECORD).write_text(json.dumps(record, indent=1))
    return copy


def combine(rows_a: list[dict], rows_u: list[dict], left: set[str]) -> float:
    """Mean IoU of the parts (`Scores.mean_parts`) with the structures of `left` from the
    untouched rows and the others from the adapter's."""
    rows = [r for r in rows_a if r["structure"] not in left]
    rows += [r for r in rows_u if r["structure"] in left]
    return round(Scores(rows).mean_parts(), 4)


def per_structure(rows: list[dict], key: str = "iou") -> dict[str, float]:
    """Mean of `key` (the IoU, or another column of `score_collection`'s rows) per
    structure present in `rows`, body left out."""
    values: dict[str, list[float]] = {}
    for r in rows:
        if r["structure"] != "body" and r.get(key) is not None:
            values.setdefault(r["structure"], []).append(float(r[key]))
    return {n: round(sum(v) / len(v), 4) for n, v in sorted(values.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="quality.py --out folders")
    ap.add_argument("--checkpoint", required=True, help="the model the runs fine-tuned")
    ap.add_argument("--config", default=None)
    ap.add_argument("--n-templates", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", default=None, help="benchmarks/results/<name>.json")
    args = ap.parse_args(argv)
    runs = judged_runs([Path(f) for f in args.runs])
    if not runs:
        ap.error(f"no <name>-judged folder beside its collection under {args.runs}")
    recorder = Recorder(args.record or f"judge-margin-{Path(args.checkpoint).stem}", args, "cpu")
    model_args = model_arguments(args, device="cpu")
    base, info, _ = _run_model(**model_args, adapter=None)
    results = {"model": info, "default_margin": Trainer.UNTOUCHED_MARGIN, "collections": {}}
    for name, coll, adapter in runs:
        record = json.loads((adapter / ADAPTER_RECORD).read_text())
        history = {row["epoch"]: row for row in record["history"]}
        before = history[0].get("val_template_view_ious") or {}
        after = history[record["epoch"]].get("val_template_view_ious") or {}
        untouched = score_collection(base, coll, 1, args.n_templates, cycle=True, **ENGINE).rows
        with tempfile.TemporaryDirectory() as tmp:
            tuned, _, _ = _run_model(**model_args, adapter=every_structure(adapter, Path(tmp)))
            adapted = score_collection(tuned, coll, 1, args.n_templates, cycle=True, **ENGINE).rows
        a, u = per_structure(adapted), per_structure(untouched)
        judges = {
            n: round(sum(after[n]) / len(after[n]) - sum(before[n]) / len(before[n]), 4)
            for n in sorted(after)
            if n in before
        }
        ca, cu = per_structure(adapted, "cycle_iou"), per_structure(untouched, "cycle_iou")
        cycles = {n: round(ca[n] - cu[n], 4) for n in sorted(ca) if n in cu}
        entry = {
            "epoch": record["epoch"],
            "recorded_untouched": record.get("selection", {}).get("untouched_structures", []),
            "adapter": a,
            "untouched": u,
            "judges_difference": judges,  # held-out templates and views: adapter - untouched
            "targets_cycle_difference": cycles,  # the targets' cycle IoU: adapter - untouched
            "margins": {},
        }
        for m in MARGINS:
            left = left_untouched(before, after, m)
            entry["margins"][str(m)] = {
                "untouched": left,
                "mean": combine(adapted, untouched, set(left)),
            }
        by_cycle = {n for n, d in cycles.items() if d < 0}
        either = by_cycle | set(left_untouched(before, after, Trainer.UNTOUCHED_MARGIN))
        entry["targets' cycle"] = {
            "untouched": sorted(by_cycle),
            "mean": combine(adapted, untouched, by_cycle),
        }
        entry["judges or targets' cycle"] = {
            "untouched": sorted(either),
            "mean": combine(adapted, untouched, either),
        }
        entry["every structure adapter"] = combine(adapted, untouched, set())
        entry["every structure untouched"] = combine(adapted, untouched, set(u))
        better = {n for n in u if u[n] > a.get(n, -1.0)}
        entry["ceiling"] = {
            "untouched": sorted(better),
            "mean": combine(adapted, untouched, better),
        }
        results["collections"][name] = entry
        print(
            f"\n{name} (epoch {record['epoch']}, recorded untouched {entry['recorded_untouched']})"
        )
        print("  structure   adapter untouched judges(a-u) cycle(a-u)")
        nan = float("nan")
        for n in sorted(u):
            print(
                f"  {n:<10} {a.get(n, nan):8.3f} {u[n]:8.3f} {judges.get(n, nan):+9.3f}"
                f" {cycles.get(n, nan):+10.3f}"
            )
        for m, row in entry["margins"].items():
            print(f"  margin {m:>5}: {row['mean']:.3f}  untouched {row['untouched']}")
        for label in ("targets' cycle", "judges or targets' cycle"):
            print(f"  {label}: {entry[label]['mean']:.3f}  untouched {entry[label]['untouched']}")
        print(
            f"  adapter everywhere {entry['every structure adapter']:.3f}, untouched everywhere "
            f"{entry['every structure untouched']:.3f}, ceiling {entry['ceiling']['mean']:.3f}"
        )
    names = list(results["collections"])
    summary = {
        label: round(sum(pick(results["collections"][n]) for n in names) / len(names), 4)
        for label, pick in [
            *[(f"margin {m}", lambda e, m=m: e["margins"][str(m)]["mean"]) for m in MARGINS],
            ("targets' cycle", lambda e: e["targets' cycle"]["mean"]),
            ("judges or targets' cycle", lambda e: e["judges or targets' cycle"]["mean"]),
            ("adapter everywhere", lambda e: e["every structure adapter"]),
            ("untouched everywhere", lambda e: e["every structure untouched"]),
            ("ceiling", lambda e: e["ceiling"]["mean"]),
        ]
    }
    results["mean_over_collections"] = summary
    print("\nmean over collections:", json.dumps(summary))
    recorder.write(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
