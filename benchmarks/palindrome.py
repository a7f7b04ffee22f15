"""Does palindrome fine-tuning help, and why not: four rows side by side.

On each held-out collection of `sam2pal.synth.quality` (generator settings the model never
saw), the same 20 targets are segmented from one template by

  (a) zero-shot: the base model;
  (b) palindrome LoRA with the first default settings (learning rate 1e-4, epochs
      only: 50 optimizer steps on 20 photos, no template views);
  (c) an oracle upper bound: supervised LoRA on the same photos with their true
      masks (phase 1 against the truth, no template views), the same optimizer steps
      as (d);
  (d) palindrome LoRA with the present defaults (`FinetuneSettings`: at least 60
      optimizer steps, learning rate 1e-3, which these measurements chose; and, since
      2026-12-04, eight template views and the anchor term, `anchor_weight: 1`: the
      records made before ran without them);
  (e) as (d), with augmented template views (`template_views`) and without the
      anchor term;
  (f) as (d), given two templates: the first trains, the second is held out and its
      true masks (and those of six augmented views of it), segmented from the first,
      pick the epoch (`holdout_template`), the adapter segmenting every structure
      (`per_structure_choice: false`). The same training as (d) but for the second
      template's photo, which (d) trains on or holds out as an unlabelled photo;
  (g) as (f), with the per-structure choice (`per_structure_choice`; what the
      workflow does with two templates or more): per structure, the held-out
      template scores the adapter against the untouched model (epoch 0), the
      segmentation keeps the untouched model for the structures it does better, and the
      epoch is picked on that combined score. The same training as (f);
  (h) as (g), given three templates: the first two train (meant as a counter to the
      degenerate solution: with two, one template's masks whatever is in memory no
      longer lower the loss), the third is held out (`holdout_templates: 1`; what
      the workflow did with three templates before `holdout_templates` was 2).
  (i) as (g), given three templates: the first trains, the other two are held out
      (`holdout_templates: 2`) and judge together, each with its views: a judge less
      tied to one specimen than (g)'s. The same training as (g) but for the third
      template's photo, which (g) trains on or holds out as an unlabelled photo.
      What the workflow does with three templates.
  (j) as (h), with both training templates in the memory of each cycle's first half
      (`cycle_memory: training`): the photo is segmented as the workflow segments it
      with several templates, the return half and the loss on the cycle's template.
      The same training as (h) but for that memory.
  (k) given four templates (`--n-templates 4`): the first two train, one per cycle,
      the other two are held out and judge together (`holdout_templates: 2`, the
      default): what the workflow does with four templates.
  (l) as (k), with both training templates in each cycle's memory (`cycle_memory:
      training`). The same training as (k) but for that memory: with two judges, the
      steadier choice of epoch of (i), and (j)'s memory.

"zero-shot (all templates)" segments the targets with the `--n-templates` templates in
memory and no fine-tuning. `--seed-offset N` renders other photos from the same
generator settings (each collection's seed plus N), as quality.py's. The rows given
three templates are also scored with all three in memory and the kept
adapter (`all_templates`), as the workflow segments after such a fine-tuning.

The palindrome rows with one template pick their epoch on the label-free held-out
cycle IoU, those with two or more on the held-out template, as the workflow does
without ground truth; the truth is only logged. For every epoch the record keeps
the training loss, the true IoU of the training targets' phase-1 predictions (the
degenerate solution shows as a falling loss with a flat target IoU), the held-out
cycle IoU and the held-out true IoU, and for every method the IoU of the last epoch
beside the selected one, and per structure how the masks miss (`shape`: the median of
their area over the true area, the mean share of their pixels on the true structure).

    .venv/bin/python -u benchmarks/palindrome.py --collections bronze_aligned   # ~25 min on 2 cores

`--score-epochs` segments the targets after every epoch as well (as the table does,
the adapter for every structure) and keeps their IoU per structure and photo in each
epoch's row (`targets`), beside the held-out templates' IoU per structure and view
(`val_template_view_ious`): other rules for choosing the epoch and the structures
can then be scored from one run (`benchmarks/selection.py`).

Writes benchmarks/results/palindrome-<checkpoint>.json (adapters and collections go to
benchmarks/out/palindrome/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import Recorder  # noqa: E402

from sam2pal.inference.pipeline import _run_model  # noqa: E402
from sam2pal.io.coco import category_masks, load_coco  # noqa: E402
from sam2pal.io.templates import load_coco_templates  # noqa: E402
from sam2pal.models.registry import choose_config  # noqa: E402
from sam2pal.settings import Segmentation  # noqa: E402
from sam2pal.synth.quality import HELD_OUT, STRUCTURES, make_held_out, score_collection, spearman  # noqa: E402
from sam2pal.training.palindrome import FinetuneSettings, Trainer, release_inference_tensors  # noqa: E402

METHODS = (
    "zero-shot",
    "palindrome (previous defaults)",
    "oracle (supervised)",
    "palindrome (defaults)",
    "palindrome (defaults, template views)",
    "palindrome (second template picks the epoch)",
    "palindrome (defaults, second template picks the epoch and each structure's model)",
    "palindrome (defaults, two templates train, the third picks the epoch and each structure's model)",
    "palindrome (defaults, one template trains, the other two pick the epoch and each structure's model)",
    "palindrome (defaults, two templates train, both in each cycle's memory, the third picks the epoch and each structure's model)",
    "zero-shot (all templates)",
    "palindrome (defaults, two templates train, the other two pick the epoch and each structure's model)",
    "palindrome (defaults, two templates train, both in each cycle's memory, the other two pick the epoch and each structure's model)",
)
#: the methods (k) and (l), given four templates (`--n-templates 4`)
FOUR_TEMPLATE_METHODS = METHODS[-2:]
#: no template views and no anchor term (the oracle: supervised on the targets' truth alone)
PLAIN = {"template_views": 0, "anchor_weight": 0}
PREVIOUS_DEFAULTS = {**PLAIN, "learning_rate": 1e-4, "min_steps": 0}


def _spearman(a, b) -> float | None:
    """Rank correlation over the epochs where both values are known (None if undefined)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    value = spearman(*zip(*pairs)) if pairs else float("nan")
    return None if value != value else round(value, 3)


class _EpochScoringTrainer(Trainer):
    """A Trainer that also segments the table's targets after every epoch, as the
    table does (from the first template; the adapter for every structure), and keeps
    their IoU per structure and photo in the epoch's row (`targets`), so that other
    ways to choose the epoch and the structures can be scored from one run."""

    def __init__(self, coll: Path, targets_from: int, *args, **kwargs):
        self.coll, self.targets_from = coll, targets_from
        super().__init__(*args, **kwargs)

    def validate(self) -> dict:
        metrics = super().validate()
        self.sam.eval()
        rows = score_collection(
            self.sam, self.coll, 1, self.targets_from, framing=self.framing, tone=self.tone.mode
        ).rows
        release_inference_tensors(self.sam)
        self.sam.train()
        metrics["targets"] = {
            s: [round(r["iou"], 4) for r in rows if r["structure"] == s] for s in STRUCTURES
        }
        return metrics


def engine_options(args) -> dict:
    """How the photos go into the model (framing, tone), whether small structures are
    zoomed (zoom) and which mask each structure gets (mask_choice, absent), as the
    benchmark was asked (the workflow's defaults where it has no such flag)."""
    return {
        "framing": getattr(args, "framing", Segmentation.framing),
        "tone": getattr(args, "tone", Segmentation.tone),
        "zoom": getattr(args, "zoom", Segmentation.zoom),
        "mask_choice": getattr(args, "mask_choice", Segmentation.mask_choice),
        "absent": getattr(args, "absent", Segmentation.absent),
    }


def model_arguments(args, device: str | None = None) -> dict:
    """`_run_model`'s arguments for the model a benchmark was asked for (`args.config`,
    `args.checkpoint`, `args.threads`, and `args.image_size` and `args.device` where the
    benchmark has them; `device` overrides), seed 0, no checkpoint folder."""
    return dict(
        config=choose_config(args.config, args.checkpoint),
        checkpoint=args.checkpoint,
        image_size=getattr(args, "image_size", None),
        seed=0,
        device=device or args.device,
        threads=args.threads,
        checkpoint_dir=None,
    )


def finetune_and_score(
    args,
    model_args,
    coll: Path,
    out: Path,
    settings: dict,
    objective: str,
    templates: int = 1,
    all_templates: bool = False,
) -> dict:
    """`templates`: the first this many of the collection's templates go to the
    trainer (with two or more, the last, or the last `holdout_templates`, are held
    out to pick the epoch); the targets
    are segmented from the first alone either way, and with `all_templates` also from
    all `templates` in memory with the kept adapter (`table_all_templates`: how the
    workflow segments after such a fine-tuning)."""
    import numpy as np

    templates = load_coco_templates(coll / "templates.json", coll / "images").select(
        max_templates=templates
    )
    gt_path = coll / "ground_truth.json"
    _, truth = category_masks(load_coco(gt_path), gt_path)
    pool = {p.name: p for p in sorted((coll / "images").iterdir())}
    model, info, _ = _run_model(**model_args, adapter=None)
    scoring = (
        (_EpochScoringTrainer, coll, args.n_templates)
        if getattr(args, "score_epochs", False)  # quality.py has no such flag
        else (Trainer,)
    )
    trainer = scoring[0](
        *scoring[1:],
        model,
        templates,
        pool,
        FinetuneSettings(**settings),
        ground_truth=truth,
        log=lambda *_: None,
        objective=objective,
        select_by="auto" if objective == "supervised" else "no_ground_truth",
        **engine_options(args),
    )
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    result = trainer.train(
        out,
        {
            "base_id": info["base_id"],
            "image_size": info["image_size"],
            "model_config_sha256": info["config_sha256"],
        },
    )
    seconds = time.time() - t0
    # per epoch: mean training loss and training-target IoU of its steps (every epoch
    # has the same number of steps)
    per_epoch = len(trainer.step_target_ious) // trainer.num_epochs
    history = []
    for row in result["history"]:
        epoch = row["epoch"]
        steps = (
            trainer.step_target_ious[(epoch - 1) * per_epoch : epoch * per_epoch] if epoch else []
        )
        ious = [v for v in steps if v is not None]
        history.append(
            {
                "epoch": epoch,
                "optimizer_steps": row["optimizer_steps"],
                "loss": None if row["train_loss"] is None else round(row["train_loss"], 4),
                "train_target_iou": round(float(np.mean(ious)), 4) if ious else None,
                **{
                    key: None if row.get(key) is None else round(row[key], 4)
                    for key in ("val_cycle_iou", "val_template_iou")
                },
                "val_iou": None if row["val_iou"] is None else round(row["val_iou"], 4),
                "val_template_ious": {
                    name: round(v, 4) for name, v in row.get("val_template_ious", {}).items()
                },
                # the held-out photos' true IoU per structure (the judges' yardstick)
                "val_ious": {name: round(v, 4) for name, v in row.get("val_ious", {}).items()},
                # per structure, the held-out templates' and their views' IoU (what the
                # per-structure choice weighs)
                "val_template_view_ious": {
                    name: [round(v, 4) for v in values]
                    for name, values in row.get("val_template_view_ious", {}).items()
                },
                **({"targets": row["targets"]} if "targets" in row else {}),
            }
        )
    scored = {}
    for which in ("adapter", "adapter_last"):
        tuned, _, _ = _run_model(**model_args, adapter=out / which)
        scored[which] = score_collection(tuned, coll, 1, args.n_templates, **engine_options(args))
        if which == "adapter" and all_templates:
            scored["all_templates"] = score_collection(
                tuned, coll, len(templates.images), args.n_templates, **engine_options(args)
            )
    later = history[1:]
    return {
        **({"table_all_templates": scored["all_templates"].table()} if all_templates else {}),
        "table": scored["adapter"].table(),
        "last_epoch_table": scored["adapter_last"].table(),
        # per structure, the masks' area over the true area and their share on the truth
        "shape": scored["adapter"].shape_table(),
        "last_epoch_shape": scored["adapter_last"].shape_table(),
        "best_epoch": result["best_epoch"],
        # the structures the kept adapter leaves to the untouched model
        "untouched_structures": result.get("untouched_structures", []),
        "optimizer_steps": history[-1]["optimizer_steps"],
        "seconds": round(seconds, 1),
        "settings": settings,
        "history": history,
        # does the label-free selection signal follow the truth over epochs?
        "cycle_vs_target_iou_spearman": _spearman(
            [h["val_cycle_iou"] for h in later], [h["train_target_iou"] for h in later]
        ),
        "cycle_vs_val_iou_spearman": _spearman(
            [h["val_cycle_iou"] for h in later], [h["val_iou"] for h in later]
        ),
        "template_vs_val_iou_spearman": _spearman(
            [h["val_template_iou"] for h in later], [h["val_iou"] for h in later]
        ),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    ap.add_argument("--config", default=None)
    ap.add_argument(
        "--collections",
        nargs="+",
        default=[h.name for h in HELD_OUT],
        choices=[h.name for h in HELD_OUT],
    )
    ap.add_argument("--n-images", type=int, default=23)
    ap.add_argument(
        "--n-templates", type=int, default=3, help="the targets start after these images"
    )
    ap.add_argument(
        "--tuned",
        default="{}",
        help="settings of (d) and, with the same steps, (c), as JSON (default: the workflow's)",
    )
    ap.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="render other photos from the same generator settings (each collection's seed "
        "plus this)",
    )
    ap.add_argument("--views", type=int, default=8, help="template views of the last method")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--score-epochs",
        action="store_true",
        help="segment the targets after every epoch too (their IoU per structure and photo "
        "in each epoch's row: other selection rules can be scored from one run; slower)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "palindrome"))
    ap.add_argument("--record", default=None, help="result name (default palindrome-<checkpoint>)")
    args = ap.parse_args(argv)
    too_few = [m for m in args.methods if m in FOUR_TEMPLATE_METHODS and args.n_templates < 4]
    if too_few:
        ap.error(f"--n-templates {args.n_templates}: {too_few[0]!r} needs 4 templates")
    recorder = Recorder(
        args.record or f"palindrome-{Path(args.checkpoint).stem}", args, args.device
    )
    tuned = json.loads(args.tuned)
    out = Path(args.out)
    model_args = model_arguments(args)
    base, info, _ = _run_model(**model_args, adapter=None)
    results = {"model": info, "tuned_settings": tuned, "collections": {}}
    specs = {h.name: h for h in HELD_OUT}
    for name in args.collections:
        coll = out / name
        spec = dataclasses.replace(specs[name], seed=specs[name].seed + args.seed_offset)
        make_held_out(coll, spec, args.n_images, args.n_templates)
        entry = {
            "description": specs[name].description,
            "targets": args.n_images - args.n_templates,
            "methods": {},
        }
        for method, templates in (
            ("zero-shot", 1),
            ("zero-shot (all templates)", args.n_templates),
        ):
            if method in args.methods:
                scores = score_collection(base, coll, templates, args.n_templates)
                entry["methods"][method] = {"table": scores.table(), "shape": scores.shape_table()}
        # method: (settings, objective, templates given to the trainer: with two or
        # more, the last is held out to pick the epoch)
        runs = {
            "palindrome (previous defaults)": (PREVIOUS_DEFAULTS, "palindrome", 1),
            "oracle (supervised)": ({**PLAIN, **tuned}, "supervised", 1),
            "palindrome (defaults)": (tuned, "palindrome", 1),
            "palindrome (defaults, template views)": (
                {**tuned, **PLAIN, "template_views": args.views},
                "palindrome",
                1,
            ),
            "palindrome (second template picks the epoch)": (
                {**tuned, "per_structure_choice": False},
                "palindrome",
                2,
            ),
            "palindrome (defaults, second template picks the epoch and each structure's model)": (
                tuned,
                "palindrome",
                2,
            ),
            "palindrome (defaults, two templates train, the third picks the epoch and each structure's model)": (
                {**tuned, "holdout_templates": 1},
                "palindrome",
                3,
            ),
            "palindrome (defaults, one template trains, the other two pick the epoch and each structure's model)": (
                {**tuned, "holdout_templates": 2},
                "palindrome",
                3,
            ),
            "palindrome (defaults, two templates train, both in each cycle's memory, the third picks the epoch and each structure's model)": (
                {**tuned, "holdout_templates": 1, "cycle_memory": "training"},
                "palindrome",
                3,
            ),
            "palindrome (defaults, two templates train, the other two pick the epoch and each structure's model)": (
                {**tuned, "holdout_templates": 2},
                "palindrome",
                4,
            ),
            "palindrome (defaults, two templates train, both in each cycle's memory, the other two pick the epoch and each structure's model)": (
                {**tuned, "holdout_templates": 2, "cycle_memory": "training"},
                "palindrome",
                4,
            ),
        }
        for method, (settings, objective, templates) in runs.items():
            if method in args.methods:
                entry["methods"][method] = finetune_and_score(
                    args,
                    model_args,
                    coll,
                    out / f"{name}-{METHODS.index(method)}",
                    settings,
                    objective,
                    templates=templates,
                    all_templates=templates > 2,
                )
                _print_method(name, method, entry["methods"][method])
        results["collections"][name] = entry
        _print_table(name, entry)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    recorder.write(results)
    return 0


def _print_method(name: str, method: str, run: dict) -> None:
    print(
        f"\n{name} / {method}: {run['optimizer_steps']} optimizer steps, best epoch {run['best_epoch']}, "
        f"{run['seconds']:.0f} s; cycle IoU vs target IoU over epochs (Spearman): "
        f"{run['cycle_vs_target_iou_spearman']}"
    )
    print("epoch  steps  loss    target IoU  val cycle IoU  template IoU  val IoU")
    for h in run["history"]:
        print(
            f"{h['epoch']:5d}  {h['optimizer_steps']:5d}  {h['loss'] if h['loss'] is not None else '-':<7}"
            f" {h['train_target_iou'] if h['train_target_iou'] is not None else '-':<11} "
            f"{h['val_cycle_iou']!s:<14} {h.get('val_template_iou')!s:<13} {h['val_iou']}"
        )


def _print_table(name: str, entry: dict) -> None:
    print(f"\n### {name}: {entry['description']} ({entry['targets']} targets)\n")
    print("| method | " + " | ".join(STRUCTURES) + " | mean of parts | last epoch's mean |")
    print("|---|" + "---|" * (len(STRUCTURES) + 2))
    for method, run in entry["methods"].items():
        table = run["table"]
        last = run.get("last_epoch_table", {}).get("mean")
        print(
            f"| {method} | "
            + " | ".join(f"{table[s]:.3f}" for s in STRUCTURES)
            + f" | {table['mean']:.3f} | {'' if last is None else f'{last:.3f}'} |"
        )
        if "table_all_templates" in run:
            table = run["table_all_templates"]
            print(
                "| the same, all templates in memory | "
                + " | ".join(f"{table[s]:.3f}" for s in STRUCTURES)
                + f" | {table['mean']:.3f} | |"
            )


if __name__ == "__main__":
    sys.exit(main())
