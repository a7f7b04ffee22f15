"""Segmentation quality on held-out synthetic collections.

For each held-out collection (generator settings that `sam2pal pretrain` never saw; see
`sam2pal.synth.quality`), prints per-structure IoU on the same targets for

  (a) zero-shot propagation from one template,
  (b) several templates in memory,
  (c) palindrome LoRA fine-tuning on the collection's unlabelled images with the
      workflow's default settings (the epoch picked by cycle IoU), then (a),
  (c') the same with the templates of (b) given to the fine-tuning, as the workflow
      does by default with three: one trains, the other two are held out and pick the
      epoch and, per structure, adapter or untouched model; then (a),
  (c'') the adapter of (c') with all the templates of (b) in memory: how the workflow
      segments a collection after fine-tuning with several templates,
  (d) an oracle upper bound: supervised LoRA on the same photos with their true masks,
      as many optimizer steps as (c) trained, then (a); the plain supervised
      objective, without the template views and the anchor term (as
      `benchmarks/palindrome.py`'s oracle: with them, on bronze_aligned, no epoch beat the
      untouched model on the held-out photos),

the gains of (c) and (c') over (a) and the shares of the gap to (d) they close, the gain of
(c'') over (b) (what the fine-tuning adds to several templates), and the Spearman
rank correlation of the label-free cycle IoU with the true IoU of the zero-shot
predictions. Checks the goals (zero-shot): body >= 0.85, head and pronotum >= 0.60,
eyes >= 0.40, antennae and legs >= 0.35, rank correlation >= 0.5; palindrome gain
>= 3 IoU points closing >= a third of the gap to the oracle on every collection.

    .venv/bin/python -u benchmarks/quality.py              # sam2pal-micro, ~40 min on 2 cores
    .venv/bin/python benchmarks/quality.py --checkpoint random --no-finetune   # the floor

`--size W H` renders the same specimens in about the same poses at another size (480 x
360 by default; users' photos are 4000 x 3000; the clutter and lighting are drawn anew,
so compare sizes with care) and `--zoom MODE` segments with the zoom pass (`propagate.zoom`),
every photo read as the workflow reads it; with `--no-finetune`, the zero-shot rows at
users' size (README, *Small and thin structures*):

    .venv/bin/python -u benchmarks/quality.py --no-finetune --size 4000 3000 --zoom best

`--reuse RECORD...` takes the fine-tuned rows named by `--keep` (default: (c) and (c'))
from earlier records with the same `--out` (whose training logs give the oracle its steps)
and measures the others again: (a) and (b) always (a minute or two), the oracle unless
kept and its steps are still (c)'s. After a change to the one-template fine-tuning alone:
`--reuse R --keep judged oracle`; to measure (c') and (c'') again, even with `--out` gone:
`--reuse R --keep palindrome oracle`. `--judge-memory training` judges (c')'s epochs as
sam2pal did before `finetune.judge_memory`: each held-out template segmented from the
training template alone, not from every other template.

Writes benchmarks/results/quality-<checkpoint>.json (`--record`; the collections and
adapters go to benchmarks/out/quality/, and each collection's zero-shot predictions from
one template and from all of them, photo by photo, to `<collection>-photos.csv` there:
IoU, cycle IoU, area over the true area and share on the truth of every structure).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sam2pal.inference.pipeline import _run_model, finetune, prepare_templates  # noqa: E402
from sam2pal.io.atomic import atomic_write  # noqa: E402
from sam2pal.settings import (  # noqa: E402
    ABSENTS,
    JUDGE_MEMORIES,
    MASK_CHOICES,
    TONES,
    ZOOMS,
    Segmentation,
    Training,
)
from sam2pal.synth.quality import (  # noqa: E402
    HELD_OUT,
    SIZE,
    STRUCTURES,
    make_held_out,
    rank_correlation,
    score_collection,
)

sys.path.insert(0, str(ROOT / "benchmarks"))
from palindrome import PLAIN, engine_options, finetune_and_score, model_arguments  # noqa: E402
from record import Recorder, load  # noqa: E402

#: the palindrome rows' gains over zero-shot and the shares of the oracle's gain they reach
GAINS = (("palindrome_gain", "gap_closed"), ("palindrome_judged_gain", "judged_gap_closed"))
#: the name of row (c)
PALINDROME = "palindrome LoRA (1 template)"
#: the fine-tuned rows that --keep can take from an earlier record: (c), (c'), (d)
KEEPABLE = ("palindrome", "judged", "oracle")
#: the name of row (d)
ORACLE = "oracle: supervised LoRA (1 template)"
#: the name of row (c')
JUDGED = "palindrome LoRA ({n} templates: one trains, {held} pick the epoch and structures)"
#: the name of row (c'')
JUDGED_ALL = "palindrome LoRA as (c'), all {n} templates in memory"
#: the zero-shot goals: structure -> lowest mean IoU (skipped where a collection lacks it)
GOALS = {"body": 0.85, "head": 0.60, "pronotum": 0.60, "eye": 0.40, "antenna": 0.35, "legs": 0.35}


def _photo_side(text: str) -> int:
    """A side of the rendered photos (`--size`): a whole number of pixels, at least 64."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of pixels: {text!r}") from None
    if value < 64:
        raise argparse.ArgumentTypeError(f"a photo side must be at least 64 pixels, not {value}")
    return value


def held_out_arguments(ap: argparse.ArgumentParser, out: str = "", record: str = "") -> None:
    """The options that choose the held-out collections (`--collections`, `--n-images`,
    `--n-templates`: the same photos in every benchmark given the same values); with
    `out` and `record`, also `--threads`, `--out` (where `rendered_held_out` renders
    them, default benchmarks/out/OUT) and `--record` (default RECORD)."""
    ap.add_argument(
        "--collections",
        nargs="+",
        default=[h.name for h in HELD_OUT],
        choices=[h.name for h in HELD_OUT],
    )
    ap.add_argument(
        "--n-images", type=int, default=23, help="images per collection, templates included"
    )
    ap.add_argument(
        "--n-templates",
        type=int,
        default=3,
        help="the first N photos are templates (quality.py's multi-template row uses them "
        "all; every other row and benchmark the first)",
    )
    ap.add_argument(
        "--size",
        type=_photo_side,
        nargs=2,
        default=SIZE,
        metavar=("WIDTH", "HEIGHT"),
        help="the photos' size in pixels (default 480 x 360; users' photos are 4000 x 3000: "
        "the same specimens in about the same poses, rendered larger, their clutter and "
        "lighting drawn anew)",
    )
    ap.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="render other photos from the same generator settings (each collection's "
        "seed plus this): a second sample, to check a finding on photos it was not made on",
    )
    if out and record:
        ap.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
        ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / out)
        ap.add_argument("--record", default=record)


def held_out_spec(spec, args):
    """The held-out collection `spec` as `args` asks for it (other photos with
    `--seed-offset`)."""
    return dataclasses.replace(spec, seed=spec.seed + args.seed_offset)


def rendered_held_out(args):
    """(spec, folder) of each held-out collection `args` asks for, rendered afresh into
    `args.out` (the same photos as here; afresh, since `--n-images` may differ; other
    photos with `--seed-offset`), after setting torch's threads."""
    import shutil

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in HELD_OUT:
        if spec.name in args.collections:
            spec = held_out_spec(spec, args)
            coll = args.out / spec.name
            shutil.rmtree(coll, ignore_errors=True)
            make_held_out(coll, spec, args.n_images, args.n_templates, args.size)
            yield spec, coll


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    ap.add_argument("--config", default=None, help="default: the checkpoint's own")
    ap.add_argument("--image-size", type=int, default=None)
    held_out_arguments(ap)
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="palindrome fine-tuning epochs (default: the workflow's)",
    )
    ap.add_argument(
        "--lr", type=float, default=None, help="LoRA learning rate (default: the workflow's)"
    )
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument(
        "--framing",
        default="stretch",
        choices=("stretch", "letterbox"),
        help="how the photos go into the model's square input (propagate.framing)",
    )
    ap.add_argument(
        "--tone",
        default=Segmentation.tone,
        choices=TONES,
        help="lift the dark tones of dark-on-dark photos (propagate.tone; the workflow's default)",
    )
    ap.add_argument(
        "--zoom",
        default=Segmentation.zoom,
        choices=ZOOMS,
        help="segment small structures again on crops at the model's full input "
        "(propagate.zoom; the fine-tuning trains on the zoom windows too, as the workflow's)",
    )
    ap.add_argument(
        "--mask-choice",
        default=Segmentation.mask_choice,
        choices=MASK_CHOICES,
        help="which of SAM2's candidate masks each structure gets (propagate.mask_choice; "
        "sam2 with --absent blank: SAM2's own rule, as every record before 2026-12-08)",
    )
    ap.add_argument(
        "--absent",
        default=Segmentation.absent,
        choices=ABSENTS,
        help="the mask of a structure SAM2 judges absent: keep or blank (propagate.absent)",
    )
    ap.add_argument(
        "--judge-memory",
        default=Training.judge_memory,
        choices=JUDGE_MEMORIES,
        help="the templates each held-out template is segmented from when it judges an "
        "epoch of (c') (finetune.judge_memory)",
    )
    ap.add_argument("--no-oracle", action="store_true", help="skip the supervised upper bound")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "quality"))
    ap.add_argument("--record", default=None, help="result name (default quality-<checkpoint>)")
    ap.add_argument(
        "--reuse",
        nargs="+",
        default=None,
        help="records of earlier runs with the same --out: take the rows of --keep from them",
    )
    ap.add_argument(
        "--keep",
        nargs="+",
        choices=KEEPABLE,
        default=["palindrome", "judged"],
        help="with --reuse: the fine-tuned rows taken from the record, the others measured "
        "again (default: palindrome judged; the oracle is measured again unless kept and "
        "trained as many steps as the palindrome)",
    )
    args = ap.parse_args(argv)
    if args.reuse and (args.no_oracle or args.no_finetune):
        ap.error("--reuse keeps fine-tuned rows: not with --no-oracle or --no-finetune")
    reused = {}
    if args.reuse:
        for record in args.reuse:
            try:
                earlier = load(record)
                reused.update(earlier["results"]["collections"])
            except (OSError, ValueError, KeyError) as e:
                ap.error(f"--reuse {record}: not a readable quality record ({e})")
            if earlier.get("args", {}).get("seed_offset", 0) != args.seed_offset:
                ap.error(f"--reuse {record}: measured on other photos (another --seed-offset)")
        for name in set(reused) & set(args.collections):
            log = Path(args.out) / f"{name}-adapter" / "training_log.csv"
            if log.is_file() or "palindrome" not in args.keep:
                continue
            if "oracle" not in args.keep or "oracle_steps" not in reused[name]:
                ap.error(f"--reuse: {log} is missing: the oracle takes its steps from it")
    recorder = Recorder(args.record or f"quality-{Path(args.checkpoint).stem}", args, args.device)

    out = Path(args.out)
    model_args = model_arguments(args)
    config = model_args["config"]
    base, info, _ = _run_model(**model_args, adapter=None)
    print(
        f"model {args.checkpoint} ({config}), input {info['image_size']} px, sha256 {str(info['checkpoint_sha256'])[:12]}"
    )
    results = {"model": info, "collections": {}}
    t_start = time.time()
    specs = {h.name: h for h in HELD_OUT}
    for name in args.collections:
        spec = held_out_spec(specs[name], args)
        coll = out / name
        make_held_out(coll, spec, args.n_images, args.n_templates, args.size)
        t0 = time.time()
        previous = reused.get(name)
        keep = set(args.keep) if previous else set()
        zero = score_collection(base, coll, 1, args.n_templates, cycle=True, **engine_options(args))
        multi = score_collection(
            base, coll, args.n_templates, args.n_templates, **engine_options(args)
        )
        rows = {
            "zero-shot (1 template)": zero.table(),
            f"{args.n_templates} templates": multi.table(),
        }
        write_photo_rows(out / f"{name}-photos.csv", dict(zip(rows, (zero, multi))))
        entry = {
            "description": spec.description,
            "targets": args.n_images - args.n_templates,
            "rank_correlation": round(rank_correlation(zero), 3),
            # how the zero-shot masks miss: swollen or shrunk, on the structure or elsewhere
            "zero_shot_shape": zero.shape_table(),
        }
        if not args.no_finetune:
            settings = {"lora_rank": args.lora_rank}
            if args.epochs:
                settings["num_epochs"] = args.epochs
            if args.lr:
                settings["learning_rate"] = args.lr
            if "palindrome" in keep:
                rows[PALINDROME] = previous["methods"][PALINDROME]
                entry["finetune_seconds"] = previous.get("finetune_seconds")
            else:
                t_ft = time.time()
                rows[PALINDROME] = _palindrome(args, model_args, config, coll, out, name, settings)
                entry["finetune_seconds"] = round(time.time() - t_ft, 1)
            entry["palindrome_gain"] = round(rows[PALINDROME]["mean"] - zero.mean_parts(), 3)
            if args.n_templates >= 2:  # the workflow's default with several templates
                held = min(2, args.n_templates - 1)
                row = JUDGED.format(n=args.n_templates, held=held)
                row_all = JUDGED_ALL.format(n=args.n_templates)
                if "judged" in keep:
                    rows[row] = previous["methods"][row]
                    if row_all in previous["methods"]:  # records from before (c'') lack it
                        rows[row_all] = previous["methods"][row_all]
                    for k in ("judged_epoch", "judged_untouched_structures"):
                        entry[k] = previous[k]
                else:
                    judged = finetune_and_score(
                        args,
                        model_args,
                        coll,
                        out / f"{name}-judged",
                        {**settings, "holdout_templates": held, "judge_memory": args.judge_memory},
                        "palindrome",
                        args.n_templates,
                        all_templates=True,
                    )
                    rows[row] = judged["table"]
                    rows[row_all] = judged["table_all_templates"]
                    entry["judged_epoch"] = judged["best_epoch"]
                    entry["judged_untouched_structures"] = judged["untouched_structures"]
                entry["palindrome_judged_gain"] = round(rows[row]["mean"] - zero.mean_parts(), 3)
                if row_all in rows:
                    # what the fine-tuning adds where the workflow segments from all templates
                    entry["judged_all_gain_over_templates"] = round(
                        rows[row_all]["mean"] - multi.mean_parts(), 3
                    )
        entry["methods"] = rows
        if not args.no_finetune and not args.no_oracle:
            entry = _oracle(
                args, model_args, coll, out, name, entry, previous if "oracle" in keep else None
            )
        entry["seconds"] = round(time.time() - t0, 1)
        results["collections"][name] = entry
        _print_collection(name, entry)
    results["seconds"] = round(time.time() - t_start, 1)
    results["goals"] = _goals(results)
    for line in results["goals"]["lines"]:
        print(line)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    recorder.write(results)
    print(f"\n{results['seconds']:.0f} s")
    return 0


#: the columns of `<collection>-photos.csv`
PHOTO_COLUMNS = ("method", "image", "structure", "iou", "cycle_iou", "area_ratio", "on_truth")


def write_photo_rows(path: Path, scores: dict) -> None:
    """Write the per-photo rows of each method's `Scores` (method name -> Scores) to the
    CSV `path` (PHOTO_COLUMNS; written whole or not at all)."""
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, PHOTO_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for method, score in scores.items():
            for row in score.rows:
                writer.writerow({**row, "method": method})


def _palindrome(args, model_args, config, coll: Path, out: Path, name: str, settings) -> dict:
    """Row (c): palindrome LoRA from the first template with the workflow's defaults
    (but `settings`), its adapter and training log in `out`; the targets' table."""
    prepare_templates(
        coll / "templates.json",
        coll / "images",
        out / f"{name}-template1.json",
        max_templates=1,
    )
    pool = sorted(p.name for p in (coll / "images").iterdir())
    finetune(
        out / f"{name}-template1.json",
        coll / "images",
        pool,
        out / f"{name}-adapter",
        config=config,
        checkpoint=args.checkpoint,
        image_size=args.image_size,
        seed=0,
        device=args.device,
        threads=args.threads,
        settings=settings,
        **engine_options(args),
        log=lambda *_: None,
    )
    tuned, _, _ = _run_model(**model_args, adapter=out / f"{name}-adapter" / "adapter")
    return score_collection(tuned, coll, 1, args.n_templates, **engine_options(args)).table()


def _oracle(
    args, model_args, coll: Path, out: Path, name: str, entry: dict, kept: dict | None = None
) -> dict:
    """`entry` with the oracle's row, steps and the shares of its gain the palindrome
    rows reach: supervised LoRA on the true masks, as many optimizer steps as the
    one-template palindrome trained (its training log in `out`; all its epochs, not
    only up to the one it kept). `kept`: an earlier record's entry whose oracle is
    taken if it trained that many steps; without the training log (the palindrome row
    kept from the same record, its adapter gone), its steps are the record's."""
    log = out / f"{name}-adapter" / "training_log.csv"
    if kept is not None and not log.is_file():
        n_steps = kept.get("oracle_steps")
    else:
        with open(log, newline="") as f:
            n_steps = int(list(csv.DictReader(f))[-1]["optimizer_steps"])
    if kept is not None and kept.get("oracle_steps") == n_steps:
        table, steps = kept["methods"][ORACLE], n_steps
    else:
        if kept is not None:
            print(
                f"{name}: the kept oracle trained {kept.get('oracle_steps')} steps, not {n_steps}: measured again"
            )
        settings = {"lora_rank": args.lora_rank, **PLAIN, "min_steps": n_steps, "num_epochs": 1}
        if args.lr:
            settings["learning_rate"] = args.lr
        oracle = finetune_and_score(
            args, model_args, coll, out / f"{name}-oracle", settings, "supervised"
        )
        table, steps = oracle["table"], oracle["optimizer_steps"]
    methods = {m: t for m, t in entry["methods"].items() if m != ORACLE}
    entry = {**entry, "methods": {**methods, ORACLE: table}}
    entry["oracle_steps"] = steps
    gap = table["mean"] - entry["methods"]["zero-shot (1 template)"]["mean"]
    for gain, closed in GAINS:
        if gain in entry:
            entry[closed] = round(entry[gain] / gap, 3) if gap > 0 else None
    return entry


def _print_collection(name: str, entry: dict) -> None:
    print(f"\n### {name}: {entry['description']} ({entry['targets']} targets)\n")
    print("| method | " + " | ".join(STRUCTURES) + " | mean of parts |")
    print("|---|" + "---|" * (len(STRUCTURES) + 1))
    for method, table in entry["methods"].items():
        print(
            f"| {method} | "
            + " | ".join(_cell(table.get(s)) for s in STRUCTURES)
            + f" | {table['mean']:.3f} |"
        )
    extra = f"cycle-IoU rank correlation with true IoU (zero-shot): {entry['rank_correlation']:.3f}"
    for (gain, closed), which in zip(GAINS, ("1 template", "judged")):
        if gain in entry:
            extra += f"; palindrome gain ({which}): {100 * entry[gain]:+.1f} IoU points"
        if entry.get(closed) is not None:
            extra += f", {100 * entry[closed]:.0f}% of the gap to the oracle"
    if "judged_all_gain_over_templates" in entry:
        extra += (
            "; palindrome (judged) with all templates in memory over the templates alone: "
            f"{100 * entry['judged_all_gain_over_templates']:+.1f} IoU points"
        )
    print("\n" + extra)


def _cell(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


def _goals(results: dict) -> dict:
    lines, ok = ["\nGoals:"], {}
    for name, entry in results["collections"].items():
        zero = entry["methods"]["zero-shot (1 template)"]
        misses = []
        for structure, goal in GOALS.items():
            value = zero.get(structure)
            if value is None or value != value:
                continue
            ok[f"{name}: {structure} >= {goal:.2f}"] = value >= goal
            if value < goal:
                misses.append(f"{structure} {value:.3f} (goal {goal:.2f})")
        ok[f"{name}: rank correlation >= 0.5"] = entry["rank_correlation"] >= 0.5
        gains = ""
        for (gain, closed), which in zip(GAINS, ("", " (judged)")):
            if gain in entry:
                ok[f"{name}: palindrome{which} gain >= 3 points"] = entry[gain] >= 0.03
                gains += f", gain{which} {100 * entry[gain]:+.1f}"
            if entry.get(closed) is not None:
                ok[f"{name}: palindrome{which} closes >= 1/3 of the gap to the oracle"] = (
                    entry[closed] >= 1 / 3
                )
        lines.append(
            f"- {name}: rank corr {entry['rank_correlation']:.3f}"
            + gains
            + (f"; below goal: {', '.join(misses)}" if misses else "")
        )
    lines += [f"  {'met ' if v else 'MISSED'} {k}" for k, v in ok.items()]
    return {"met": ok, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
