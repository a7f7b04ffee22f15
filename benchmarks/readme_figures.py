"""Write the README's figures from the committed benchmark records.

Every measured figure in README.md (and in the model card, resources/models/README.md)
sits in a block between

    <!-- figures:NAME -->
    ...
    <!-- /figures:NAME -->

and each block is rendered here from `benchmarks/results/*.json` (written by the
benchmarks through `record.py`), ending with the record it comes from: the command, the
date and the machine. So a figure in the README can only change by rerunning a benchmark
and this script.

    .venv/bin/python benchmarks/readme_figures.py            # rewrite the blocks
    .venv/bin/python benchmarks/readme_figures.py --check    # exit 1 if the README differs

`tests/test_readme_figures.py` runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import RESULTS, ROOT, load  # noqa: E402

README = ROOT / "README.md"
# the documents with figure blocks, and the path from each to the repository root
DOCUMENTS = {README: "", ROOT / "resources" / "models" / "README.md": "../../"}
BLOCK = re.compile(
    r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S
)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


_ROOT_LINK = [""]  # the relative path from the document being rendered to the repository root


def source(*names: str) -> str:
    """The closing line of a block: which record(s), which command, when, where."""
    parts = []
    for name in names:
        rec = load(name)
        m = rec["machine"]
        where = f"{m['cpu_count']} x {m['cpu']}" + (f", {m['gpu']}" if m.get("gpu") else "")
        load_avg = rec.get("load_average_at_start")
        busy = f", load average {load_avg[0]:.1f} at the start" if load_avg else ""
        v = rec["versions"]
        parts.append(
            f"[`benchmarks/results/{name}.json`]({_ROOT_LINK[0]}benchmarks/results/{name}.json): "
            f"`{rec['command']}`, {rec['started'][:10]}, {where}{busy}, "
            f"torch {v.get('torch', '?')}, sam2 {v.get('sam2', '?')}"
        )
    return "*Source: " + "; ".join(parts) + ".*\n"


def mb(value: float) -> str:
    return f"{value:,.0f} MB"


# --------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------


QUALITY_STRUCTURES = ["body", "head", "pronotum", "elytra", "antenna", "legs", "eye", "scape"]
QUALITY_LABELS = {
    "zero-shot (1 template)": "zero-shot",
    "palindrome LoRA (1 template)": "palindrome LoRA",
    "oracle: supervised LoRA (1 template)": "oracle: supervised LoRA",
}


#: quality.py's row of the palindrome with three templates (one trains, two judge)
JUDGED_ROW = "palindrome LoRA (3 templates"


def _judged(methods: dict) -> dict | None:
    """The row of quality.py's palindrome with three templates, or None."""
    return next((t for m, t in methods.items() if m.startswith(JUDGED_ROW)), None)


def _row_ending(methods: dict, suffix: str) -> dict | None:
    """The first of quality.py's rows whose name ends with `suffix` ("templates": the
    several templates without fine-tuning; "in memory": the judged adapter with all of
    them), or None."""
    return next((t for m, t in methods.items() if m.endswith(suffix)), None)


def _iou(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


def _quality_table(collections: dict, structures=QUALITY_STRUCTURES) -> list[str]:
    lines = [
        "| collection | method | " + " | ".join(structures) + " | mean of parts |",
        "|---|---|" + "---|" * (len(structures) + 1),
    ]
    for name, entry in collections.items():
        for i, (method, table) in enumerate(entry["methods"].items()):
            label = QUALITY_LABELS.get(method, method.replace(" (1 template)", ""))
            if method.startswith(JUDGED_ROW):
                label = "palindrome LoRA, 3 templates (one trains, two judge)"
            lines.append(
                f"| {name if i == 0 else ''} | {label} | "
                + " | ".join(_iou(table.get(s)) for s in structures)
                + f" | {table['mean']:.3f} |"
            )
    return lines


def _tried_records(version: int | str) -> tuple[str, ...]:
    """The four quality records of a candidate model (v6 on; `version` as its file
    names it: 11, "12b"), named as they were measured: blue_slate and bronze_aligned in
    one run, the other collections each in its own."""
    parts = ("full", "small_mixed", "pale_on_dark", "procedural_eyes")
    return tuple(f"quality-sam2pal-micro-v{version}-tried-{part}" for part in parts)


#: the quality records of the shipped model (v12, measured before it was shipped as the
#: run v12b, hence their names), in collection order, with the workflow's defaults:
#: photos toned (`tone: auto`): blue_slate's lifted, the others' unchanged; every row
#: measured
QUALITY_RECORDS = _tried_records("12b")
#: v11's, the model shipped before, then v10's to v6's, the same way
QUALITY_RECORDS_V11 = _tried_records(11)
QUALITY_RECORDS_V10 = _tried_records(10)
QUALITY_RECORDS_V9 = _tried_records(9)
QUALITY_RECORDS_V8 = _tried_records(8)
QUALITY_RECORDS_V7 = _tried_records(7)
QUALITY_RECORDS_V6 = _tried_records(6)
#: v5's, the model shipped before, the same way
QUALITY_RECORDS_V5 = (
    "quality-sam2pal-micro-v5-tried-full",
    "quality-sam2pal-micro-v5-tried-small",
    "quality-sam2pal-micro-v5-tried-new",
)
#: v4's, the model shipped before, the same way
QUALITY_RECORDS_V4 = (
    "quality-sam2pal-micro-v4-tried",
    "quality-sam2pal-micro-v4-tried-small",
    "quality-sam2pal-micro-v4-tried-new",
)
#: v3's, the model shipped before, the same way
QUALITY_RECORDS_V3 = (
    "quality-sam2pal-micro-v3-lowc-tried",
    "quality-sam2pal-micro-v3-lowc-tried-new",
)
#: v2's, the model shipped before, the same way (its fine-tuned rows on the four
#: collections not lifted kept from the records before, `--reuse ... --keep palindrome
#: judged oracle`, each record says so)
QUALITY_RECORDS_V2 = (
    "quality-sam2pal-micro-v2-tone-blue_slate",
    "quality-sam2pal-micro-v2-tone",
    "quality-sam2pal-micro-v2-tone-new",
)
#: the same with the photos as they are (before `tone`)
QUALITY_RECORDS_TONE_NONE = (
    "quality-sam2pal-micro-v2-stay-default",
    "quality-sam2pal-micro-v2-stay-default-new",
)
#: the same before, the one-template palindrome without the stay term (the oracle rows
#: measured again with `--reuse`)
QUALITY_RECORDS_STAY_OFF = (
    "quality-sam2pal-micro-v2-blue_slate",
    "quality-sam2pal-micro-v2",
    "quality-sam2pal-micro-v2-new",
)
#: the same as first measured (2026-12-02: the palindrome rows with that day's defaults,
#: no template views, no anchor term), whose palindrome the holdout-template table cites
QUALITY_RECORDS_FIRST = (
    "quality-sam2pal-micro-v2-2026-12-02",
    "quality-sam2pal-micro-v2-new-2026-12-02",
)
#: the same for the first version, kept in the model card for comparison
QUALITY_RECORDS_V1 = ("quality-sam2pal-micro-v1", "quality-sam2pal-micro-v1-new")
#: the first GPU run from v2 (7 minutes on an H200), measured and not shipped
QUALITY_RECORDS_V3_TRIED = (
    "quality-sam2pal-micro-v3-gpu-tried",
    "quality-sam2pal-micro-v3-gpu-tried-new",
)
#: a CPU run from v2 at the full input size (112 minutes on one thread), not shipped
QUALITY_RECORDS_V3_CPU_TRIED = ("quality-sam2pal-micro-v3-cpu-tried",)
PALINDROME_RECORD = "palindrome-sam2pal-micro-v2"
PALINDROME_RECORD_V1 = "palindrome-sam2pal-micro-v1"
ROTATION_RECORD = "rotation-sam2pal-micro-v2"


#: runs shipped under another name than their records give (the run v12b is v12)
SHIPPED_AS = {"v12b": "v12"}


def micro(record: str) -> str:
    """The model a record of sam2pal-micro was measured with, from its name: "sam2pal-micro v2"
    (a run's records name the run: "v12b", shipped as v12)."""
    version = re.search(r"-(v\d+[a-z]?)(-|$)", record)
    if not version:
        return "sam2pal-micro"
    return f"sam2pal-micro {SHIPPED_AS.get(version.group(1), version.group(1))}"


def _quality_results(records=QUALITY_RECORDS) -> dict:
    """The quality records merged: collections in order, the goals of all."""
    merged = {"collections": {}, "goals": {"met": {}}}
    for name in records:
        res = load(name)["results"]
        merged["collections"].update(res["collections"])
        merged["goals"]["met"].update(res["goals"]["met"])
    return merged


def quality() -> str:
    res = _quality_results()
    args = load(QUALITY_RECORDS[0])["args"]
    text = [
        f"Measured with `benchmarks/quality.py` ({micro(QUALITY_RECORDS[0])}; "
        f"{next(iter(res['collections'].values()))['targets']} targets per collection, "
        f"{args['n_templates']} templates for the multi-template row; palindrome with the workflow's "
        "default settings: the photos toned (`tone: auto`: blue_slate's lifted, the others' "
        "unchanged); from one template, with the stay term, the epoch picked by cycle "
        "IoU; from three, one "
        "trains and the other two pick the epoch and, per structure, adapter or untouched model; "
        "the targets segmented from the first template in every row but the multi-template one; "
        "the oracle, plain supervised LoRA, with as many optimizer steps as the one-template "
        "palindrome trained):",
        "",
        *_quality_table(res["collections"]),
        "",
    ]
    corr = [f"{e['rank_correlation']:.3f} on {n}" for n, e in res["collections"].items()]
    text.append(
        "Cycle-IoU rank correlation with the true IoU (zero-shot, all parts): "
        + ", ".join(corr)
        + "."
    )
    for gain_key, closed_key, which in (
        ("palindrome_gain", "gap_closed", "from one template"),
        ("palindrome_judged_gain", "judged_gap_closed", "from three templates (one trains)"),
    ):
        gains = [
            f"{100 * e[gain_key]:+.1f} on {n}"
            for n, e in res["collections"].items()
            if gain_key in e
        ]
        closed = [
            f"{100 * e[closed_key]:.0f}% on {n}"
            for n, e in res["collections"].items()
            if e.get(closed_key) is not None
        ]
        if gains:
            text.append(
                f"Palindrome fine-tuning {which} changed the mean IoU of the parts (points): "
                f"{', '.join(gains)} (goal: +3 on every collection)"
                + (
                    f" and closed this share of the gap to the oracle: {', '.join(closed)} (goal: a third)."
                    if closed
                    else "."
                )
            )
    missed = [k for k, v in res["goals"]["met"].items() if not v]
    met = [k for k, v in res["goals"]["met"].items() if v]
    text.append(
        f"Goals met: {len(met)} of {len(met) + len(missed)}"
        + (f"; missed: {'; '.join(missed)}." if missed else ".")
    )
    names = list(QUALITY_RECORDS)
    if (RESULTS / "quality-random.json").exists():
        rnd = load("quality-random")["results"]["collections"]
        zero = [e["methods"]["zero-shot (1 template)"] for e in rnd.values()]
        targets = next(iter(rnd.values()))["targets"]
        text.append(
            f"Random weights, for scale ({targets} targets each on {', '.join(rnd)}): body "
            + " / ".join(f"{z['body']:.2f}" for z in zero)
            + ", mean of parts "
            + " / ".join(f"{z['mean']:.2f}" for z in zero)
            + "."
        )
        names.append("quality-random")
    return "\n".join(text) + "\n\n" + source(*names)


def palindrome(record: str = PALINDROME_RECORD) -> str:
    """The palindrome diagnosis: four settings side by side, and the curves."""
    rec = load(record)
    res = rec["results"]
    text = []
    for name, entry in res["collections"].items():
        text += [
            f"On {name} ({entry['description']}, {entry['targets']} targets), {micro(record)}:",
            "",
        ]
        structures = [
            s
            for s in QUALITY_STRUCTURES
            if any(
                s in r["table"] and r["table"][s] == r["table"][s]
                for r in entry["methods"].values()
            )
        ]
        text += [
            "| method | optimizer steps | " + " | ".join(structures) + " | mean of parts |",
            "|---|---|" + "---|" * (len(structures) + 1),
        ]
        for method, run in entry["methods"].items():
            steps = run.get("optimizer_steps", 0)
            text.append(
                f"| {method} | {steps} | "
                + " | ".join(_iou(run["table"].get(s)) for s in structures)
                + f" | {run['table']['mean']:.3f} |"
            )
        text.append("")
        for method, run in entry["methods"].items():
            hist = run.get("history")
            if not hist or len(hist) < 2:
                continue
            first, last = hist[1], hist[-1]
            text.append(
                f"- {method}: training loss {first['loss']:.3f} to {last['loss']:.3f} while the "
                f"training targets' IoU went {first['train_target_iou']:.3f} to "
                f"{last['train_target_iou']:.3f}; held-out cycle IoU {hist[0]['val_cycle_iou']:.3f} to "
                f"{last['val_cycle_iou']:.3f} (rank correlation with the targets' IoU over epochs "
                f"{run['cycle_vs_target_iou_spearman']}){_true_holdout(run)}"
            )
        text.append("")
    return "\n".join(text).rstrip() + "\n\n" + source(record)


def _true_holdout(run: dict) -> str:
    """The held-out photos' true IoU over the epochs, and at the epoch kept."""
    hist = [h for h in run["history"] if h.get("val_iou") is not None]
    if len(hist) < 2 or "best_epoch" not in run:
        return ""
    best = max(hist, key=lambda h: h["val_iou"])
    kept = next((h for h in hist if h["epoch"] == run["best_epoch"]), None)
    text = (
        f"; their true IoU {hist[0]['val_iou']:.3f} before, at most {best['val_iou']:.3f} "
        f"(epoch {best['epoch']})"
    )
    return text + (f", {kept['val_iou']:.3f} at the epoch kept ({kept['epoch']})" if kept else "")


def propagate() -> str:
    rec = load("propagate-cpu")
    res, args = rec["results"], rec["args"]
    m = res["methods"]
    labels = {
        "engine": "sam2-pal engine",
        "engine+cycle": "sam2-pal engine with cycle-consistency QC",
        "per-image": "official predictor, a [template, target] video per photo",
        "long-video": "official predictor, one video of all photos (the old tool's way)",
        "engine@4N": "sam2-pal engine",
        "long-video@4N": "official predictor, one video of all photos",
    }
    base = m["engine"]["per_target_s"]
    lines = [
        f"Measured with `benchmarks/propagate.py` (hiera-t at {args['image_size']} px, random weights, "
        f"{args['structures']} structures, 480x360 synthetic specimens; each method in its own process):",
        "",
        "| method | targets | s / target | relative | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for key, label in labels.items():
        r = m[key]
        lines.append(
            f"| {label} | {r['n']} | {r['per_target_s']:.2f} | {r['per_target_s'] / base:.2f}x "
            f"| {mb(r['peak_rss_mb'])} |"
        )
    lines += [
        "",
        f"From {args['n']} to {4 * args['n']} photos the engine's peak memory changed "
        f"{m['engine@4N']['peak_rss_mb'] / m['engine']['peak_rss_mb']:.2f}x and one long video's "
        f"{m['long-video@4N']['peak_rss_mb'] / m['long-video']['peak_rss_mb']:.2f}x. The template memory "
        f"took {m['engine']['setup_s']:.1f} s once. The engine's masks differed from the official "
        f"predictor's (a video per photo) in {res['differing_pixels']:,} of {res['pixels']:,} pixels.",
        "",
        source("propagate-cpu"),
    ]
    return "\n".join(lines)


def finetune() -> str:
    rec = load("finetune-cpu-512")
    res, args = rec["results"]["variants"], rec["args"]
    labels = {
        "cached": "cached image features (the default)",
        "re-encode": "re-encoding both photos every step",
        "official": "SAM2's own training style (re-encode, gradients through the image encoder)",
        "cached+dropout": "cached, with SAM2's attention dropout (`finetune.attention_dropout: 0.1`)",
        "cached+checkpointing": "cached, with `finetune.gradient_checkpointing`",
    }
    base = res["cached"]["s_per_step"]
    lines = [
        f"Measured with `benchmarks/finetune.py` (hiera-t at {args['image_size']} px, "
        f"{args['structures']} structures, LoRA rank 8, {args['steps']} timed steps after a warm-up; "
        "each variant in its own process):",
        "",
        "| training step | s / step | relative | peak RSS |",
        "|---|---|---|---|",
    ]
    for key, label in labels.items():
        r = res.get(key)
        if r is None:
            continue
        if "failed" in r:
            lines.append(f"| {label} | failed: {r['failed']} | | |")
            continue
        lines.append(
            f"| {label} | {r['s_per_step']:.2f} | {r['s_per_step'] / base:.2f}x | {mb(r['peak_rss_mb'])} |"
        )
    return "\n".join(lines) + "\n\n" + source("finetune-cpu-512")


def finetune_step() -> str:
    rec = load("finetune-cpu-512")
    r = rec["results"]["variants"]["cached"]
    m = rec["machine"]
    load_avg = (rec.get("load_average_at_start") or [0.0])[0]
    busy = (
        f", on a machine busy with other work (load average {load_avg:.1f})"
        if load_avg > m["cpu_count"]
        else ""
    )
    return (
        f"on {m['cpu_count']} CPU cores a training step at {rec['args']['image_size']} px took "
        f"{r['s_per_step']:.1f} s and {r['peak_rss_mb'] / 1024:.1f} GB of memory{busy} "
        "(*Speed*), so 10 epochs of 100 photos take about "
        f"{10 * 100 * r['s_per_step'] / 3600:.1f} hours; a larger `model.image_size` costs more per step, a smaller one less.\n"
    )


def video() -> str:
    rec = load("video-cpu")
    res, args = rec["results"], rec["args"]
    m = res["methods"]
    labels = {
        "temporal": "sam2-pal temporal tracker",
        "official": "official predictor (its defaults)",
        "temporal@4N": "sam2-pal temporal tracker",
        "official@4N": "official predictor",
    }
    base = m["temporal"]["per_frame_s"]
    lines = [
        f"Measured with `benchmarks/video.py` (hiera-t at {args['image_size']} px, random weights, "
        f"{args['structures']} structures, a synthetic {args['frame_size'][0]}x{args['frame_size'][1]} "
        "clip tracked forwards from keyframe 0; each run in its own process):",
        "",
        "| method | frames | s / frame | relative | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for key, label in labels.items():
        r = m[key]
        lines.append(
            f"| {label} | {r['n']} | {r['per_frame_s']:.2f} | {r['per_frame_s'] / base:.2f}x "
            f"| {mb(r['peak_rss_mb'])} |"
        )
    lines += [
        "",
        f"From {args['n']} to {4 * args['n']} frames the tracker's peak memory changed "
        f"{m['temporal@4N']['peak_rss_mb'] / m['temporal']['peak_rss_mb']:.2f}x (it holds "
        f"{m['temporal']['state_mb']:.1f} MB of SAM2 state at {args['n']} frames, "
        f"{m['temporal@4N']['state_mb']:.1f} MB at {4 * args['n']}), the official predictor's "
        f"{m['official@4N']['peak_rss_mb'] / m['official']['peak_rss_mb']:.2f}x: it loads every frame "
        "up front and keeps every frame's memory. Their masks differed in "
        f"{res['differing_pixels']:,} of {res['pixels']:,} pixels.",
        "",
        source("video-cpu"),
    ]
    return "\n".join(lines)


def merge_measure() -> str:
    rec = load("merge_measure")
    res = rec["results"]
    steps = res["steps"]
    base = steps["json.load"]["total_peak_mb"]
    labels = {
        "merge": f"merge ({res['shards']} shards -> predictions.json, {res['predictions_mb']:.0f} MB)",
        "qc": "qc",
        "measure": f"measure ({res['threads']} worker processes)",
        "json.load": "`json.load` of predictions.json, for comparison",
    }
    lines = [
        f"Measured with `benchmarks/merge_measure.py`: a synthetic collection of {res['images']:,} photos x "
        f"{res['structures']} structures ({res['images'] * res['structures']:,} masks, "
        f"{rec['args']['width']}x{rec['args']['height']} px, made-up shard results; no model runs), "
        "each step in its own process:",
        "",
        "| step | seconds | peak memory (with workers) | vs. loading predictions.json whole |",
        "|---|---|---|---|",
    ]
    for key, label in labels.items():
        r = steps[key]
        lines.append(
            f"| {label} | {r['seconds']:.1f} | {mb(r['total_peak_mb'])} | {r['total_peak_mb'] / base:.2f}x |"
        )
    n_masks = res["images"] * res["structures"]
    per_mask_ms = 1000 * steps["measure"]["seconds"] * res["threads"] / n_masks
    lines += [
        "",
        f"The measure step spent about {per_mask_ms:.1f} ms of CPU per mask.",
        "",
        source("merge_measure"),
    ]
    return "\n".join(lines)


def _model_name(args: dict) -> str:
    if args.get("checkpoint", "random") == "random":
        name = Path(str(args["config"])).name.replace(".yaml", "").replace("sam2.1_", "")
        return f"{name} with random weights"
    return Path(str(args["checkpoint"])).stem


def collection(name: str = "collection-cpu") -> str:
    rec = load(name)
    res, args = rec["results"], rec["args"]
    width, height = res["photo_size"]
    steps = res["steps"]["per_photo_s"]
    big = res.get("steps_24mp", {}).get("per_photo_s")

    def ms(value: float | None) -> str:
        return "" if value is None else f"{1000 * value:,.0f}"

    rows = [
        ("read the JPEG", "read", "read_full"),
        ("SAM2 preprocessing (resize to the model's input)", "preprocess", "preprocess_full"),
        (
            f"model: image encoder + one memory pass for {res['structures']} structures",
            "model",
            "model",
        ),
        ("masks: resize the logits to the photo", "masks", "masks_full"),
        ("RLE, area and box of every mask", "rle", "rle_full"),
        ("cycle-consistency QC", "qc", "qc_full"),
        (f"measure {res['structures']} masks (all columns)", "measure", None),
        ("merge into predictions.json", "merge", None),
    ]
    head = "| step, per photo | ms, fast path (default) | ms, exact path |"
    if big:
        head += " ms, fast path at 24 MP |"
    lines = [
        f"Measured with `benchmarks/collection.py`: {res['photos']} synthetic specimens of {width}x{height} "
        f"px (12 MP JPEG), 1 template, {res['structures']} structures (head, pronotum, elytra, antenna, "
        f"legs, the whole specimen), {_model_name(args)} at {args['image_size']} px, "
        f"{args['threads']} CPU threads; the median photo:",
        "",
        head,
        "|---|---|---|" + ("---|" if big else ""),
    ]
    for label, fast, exact in rows:
        cells = [ms(steps[fast]), ms(steps[exact]) if exact else "the same"]
        if big:
            cells.append(ms(big[fast]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    differ = res["steps"]
    lines += [
        "",
        f"The fast path's masks differ from the exact path's (`propagate.exact: true`, which reproduces "
        f"the official predictor) in {differ['pixels_differ_fast_vs_exact']:,} of "
        f"{differ['mask_pixels']:,} mask pixels ({100 * differ['differ_fraction_of_mask_area']:.2f} %; "
        f"at most {100 * differ['max_differ_fraction_one_mask']:.1f} % of one mask's area), "
        "along outlines. The box resize gives the very pixels of a full-size one; the difference is "
        "the reduced JPEG decoding, which changes the model's input a little, and one pixel of the "
        f"model's low-resolution mask is about {width / (args['image_size'] / 4):.0f} photo pixels wide. "
        "Set `propagate.exact: true` (and `tone: none`, where the default lifts dark photos) "
        "to reproduce the official predictor's masks.",
        "",
        "End to end, per photo added to the run (`sam2pal segment`: segmentation, merge, QC table, "
        "measurement tables; the model loaded once):",
        "",
        "| run | s / photo | official / this | peak RSS |",
        "|---|---|---|---|",
    ]
    official = res["official"]["per_photo_s"]
    for qc in ("off", "on"):
        r = res[f"segment_qc_{qc}"]
        lines.append(
            f"| `sam2pal segment`, cycle-consistency QC {qc} | {r['per_photo_s']:.2f} | "
            f"{official / r['per_photo_s']:.2f}x | {mb(r['peak_rss_mb'])} |"
        )
    lines.append(
        f"| official predictor, a [template, photo] video per photo (masks only) | {official:.2f} | 1.00x | "
        f"{mb(res['official']['peak_rss_mb'])} |"
    )
    model = res["model_only"]
    lines += [
        "",
        f"The model alone, on photos already decoded in memory, takes {model['per_photo_s']:.2f} s per "
        f"photo (batch {model['batch_size']}): end to end without QC runs at "
        f"{100 * res['end_to_end_share_of_model_throughput']:.0f} % of that throughput.",
        "",
        source(name),
    ]
    return "\n".join(lines)


def measure_speed() -> str:
    rec = load("measure-speed")
    res = rec["results"]
    masks = res["masks"]
    photo = {k.split("/", 1)[1]: v for k, v in masks.items() if k.startswith("photo/")}
    real = {k: v for k, v in masks.items() if k.startswith("real_x")}
    lines = [
        "Measured with `benchmarks/measure_speed.py`: `measure_mask` (every column) on one CPU thread, "
        f"masks in a 4000x3000 photo, fastest and median of {res['repeat']} runs:",
        "",
        "| mask | pixels | ms, fastest | ms, median |",
        "|---|---|---|---|",
    ]
    for name, r in photo.items():
        lines.append(
            f"| {name.replace('_', ' ')} | {r['pixels']:,} | {r['min_ms']:.1f} | {r['median_ms']:.1f} |"
        )
    slow = max(real.values(), key=lambda r: r["median_ms"])
    lines += [
        "",
        f"On {len(real)} real beetle part masks enlarged 4 or 8 times (up to {max(r['pixels'] for r in real.values()):,} "
        f"pixels) the slowest took {max(r['min_ms'] for r in real.values()):.1f} ms at best and "
        f"{slow['median_ms']:.1f} ms at the median; over all {res['summary']['masks']} masks the median "
        f"mask took {res['summary']['median_of_min_ms']:.1f} ms.",
        "",
        source("measure-speed"),
    ]
    return "\n".join(lines)


def quality_card(records=QUALITY_RECORDS) -> str:
    """The model card's summary of the same records: zero-shot per structure."""
    res = _quality_results(records)
    judged = any(_judged(e["methods"]) for e in res["collections"].values())
    # (c''), the judged adapter with all the templates in memory, where measured
    every = any(_row_ending(e["methods"], "in memory") for e in res["collections"].values())
    extra = " palindrome LoRA, 3 templates |" if judged else ""
    extra += " the same, all 3 in memory |" if every else ""
    lines = [
        "| collection | "
        + " | ".join(QUALITY_STRUCTURES)
        + f" | several templates | palindrome LoRA |{extra} oracle | cycle-IoU rank corr. |",
        "|---|" + "---|" * (len(QUALITY_STRUCTURES) + 4 + judged + every),
    ]
    for cname, entry in res["collections"].items():
        methods = entry["methods"]
        zero = methods["zero-shot (1 template)"]
        multi = _row_ending(methods, "templates")
        pal = methods.get("palindrome LoRA (1 template)")
        oracle = methods.get("oracle: supervised LoRA (1 template)")
        means = (multi, pal, *([_judged(methods)] if judged else []))
        means += (_row_ending(methods, "in memory"),) if every else ()
        means += (oracle,)
        cells = [
            cname,
            *(_iou(zero.get(s)) for s in QUALITY_STRUCTURES),
            *(f"{t['mean']:.3f}" if t else "" for t in means),
            f"{entry['rank_correlation']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "Zero-shot IoU per structure from one template; the other columns but the last are "
        "the mean of the parts.\n\n" + "\n".join(lines) + "\n\n" + source(*records)
    )


def rotation() -> str:
    """Zero-shot IoU against the relative pose of template and target."""
    poses = load(ROTATION_RECORD)["results"]["poses"]
    lines = ["| relative pose | " + " | ".join(poses) + " |", "|---|" + "---|" * len(poses)]
    lines.append("| body | " + " | ".join(f"{t['body']:.3f}" for t in poses.values()) + " |")
    lines.append(
        "| mean of parts | " + " | ".join(f"{t['mean']:.3f}" for t in poses.values()) + " |"
    )
    return "\n".join(lines) + "\n\n" + source(ROTATION_RECORD)


ORIENTATION_RECORD = "orientation-sam2pal-micro-v2"


def orientation() -> str:
    """Orientation search, mirror pairs and framing on turned, mirrored and differently
    framed synthetic beetles."""
    rec = load(ORIENTATION_RECORD)
    res = rec["results"]
    n = res["targets"]
    modes = res["orientation"]["modes"]
    upright = modes["upright, none"]["iou"]
    text = [
        f"Measured with `benchmarks/orientation.py` ({micro(ORIENTATION_RECORD)}; {n} held-out beetles in "
        f"the template's pose, leaning {res['tilt']:g} degrees, shown in the eight orientations; "
        "IoU per structure, mean of the parts without the body):",
        "",
        "| targets | orientation | correct orientation | body | mean of parts "
        "| parts, points below upright | s / photo |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, entry in modes.items():
        targets, mode = label.rsplit(", ", 1)
        correct = entry.get("correct_orientation")
        below = 100 * (upright["mean"] - entry["iou"]["mean"])
        text.append(
            f"| {targets} | `{mode}` | {'-' if correct is None else f'{correct:.1%}'} "
            f"| {_iou(entry['iou'].get('body'))} | {entry['iou']['mean']:.3f} "
            f"| {'-' if entry is modes['upright, none'] else f'{below:.1f}'} "
            f"| {entry['seconds_per_target']:.2f} |"
        )
    text += [
        "",
        "Paired structures after a mirrored match (`rot4_mirror`; elytra, antennae and legs "
        "split by side, by name or as two instances; a mirrored photo taken as the specimen's "
        "other side): the share named as their true side.",
        "",
        "| pairs by | `mirror_swap` | photos | named correctly | named the other side "
        "| named correctly, orientation found |",
        "|---|---|---|---|---|---|",
    ]
    for variant, runs in res["pairs"].items():
        for swap, entry in runs.items():
            for kind in ("mirrored", "unmirrored"):
                if kind not in entry:
                    continue
                summary = entry[kind]
                when = summary["named_correctly_when_orientation_right"]
                text.append(
                    f"| {variant} | {swap.split()[-1]} | {kind} | {summary['named_correctly']:.3f} "
                    f"| {summary['swapped']:.3f} | {'-' if when is None else f'{when:.3f}'} |"
                )
    aspects = list(next(iter(next(iter(res["framing"].values())).values()))["targets"])
    text += [
        "",
        "Framing: templates of one aspect, photos of 4:3, 1:1 and 3:4 (mean IoU of the parts; "
        "body in brackets):",
        "",
        "| template | framing | "
        + " | ".join(f"{a} photos" for a in aspects)
        + " | all | s / photo |",
        "|---|---|" + "---|" * (len(aspects) + 2),
    ]
    for template, framings in res["framing"].items():
        for framing, entry in framings.items():
            cells = [
                f"{entry['targets'][a]['iou']['mean']:.3f} ({_iou(entry['targets'][a]['iou'].get('body'))})"
                for a in aspects
            ]
            text.append(
                f"| {template.split()[-1]} | `{framing}` | "
                + " | ".join(cells)
                + f" | {entry['all']['mean']:.3f} ({_iou(entry['all'].get('body'))}) "
                f"| {entry['seconds_per_target']:.2f} |"
            )
    return "\n".join(text) + "\n\n" + source(ORIENTATION_RECORD)


ZOOM_RECORD = "zoom-sam2pal-micro-v5"  # v5 (the text after it quotes v6, shipped after it)
ZOOM_RECORD_V2 = "zoom-sam2pal-micro-v2"
ZOOM_STRUCTURES = ["body", "head", "pronotum", "elytra", "antenna", "legs", "eye", "scape"]
ZOOM_THIN = ["antenna", "legs", "eye", "scape"]


def _percent(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.0f}%"


def zoom(record_name: str = ZOOM_RECORD) -> str:
    """The zoom pass on high-resolution specimens with small structures."""
    res = load(record_name)["results"]
    modes = res["modes"]
    base = modes["off"]["seconds_per_target"]
    width, height = res["size"]
    widths = modes["off"].get("true_width_px", {})
    text = [
        f"Measured with `benchmarks/zoom.py` ({micro(record_name)}; {res['targets']} targets of each "
        f"kind, procedural insects and NEON beetles, at {width} x {height} pixels; "
        f"`zoom_below` {res['zoom_below']:g}):",
        "",
        "| zoom | " + " | ".join(ZOOM_STRUCTURES) + " | mean of parts | s / photo |",
        "|---|" + "---|" * (len(ZOOM_STRUCTURES) + 2),
    ]
    for mode, entry in modes.items():
        text.append(
            f"| `{mode}` | "
            + " | ".join(_iou(entry["iou"].get(s)) for s in ZOOM_STRUCTURES)
            + f" | {entry['iou']['mean']:.3f} | {entry['seconds_per_target']:.2f} "
            f"({entry['seconds_per_target'] / base:.1f}x) |"
        )
    text += [
        "",
        "Relative error of the area and of the curve length of the thin parts (true mean "
        "width in pixels in brackets), and the share of photos whose mask the zoom pass made:",
        "",
        "| zoom | "
        + " | ".join(
            f"{s} ({widths.get(s, float('nan')):.0f} px) area / length / zoomed" for s in ZOOM_THIN
        )
        + " |",
        "|---|" + "---|" * len(ZOOM_THIN),
    ]
    for mode, entry in modes.items():
        cells = [
            f"{_percent(entry['area_error'].get(s))} / {_percent(entry['length_error'].get(s))}"
            f" / {_percent(entry.get('zoomed', {}).get(s))}"
            for s in ZOOM_THIN
        ]
        text.append(f"| `{mode}` | " + " | ".join(cells) + " |")
    return "\n".join(text) + "\n\n" + source(record_name)


#: zero-shot quality on the held-out collections rendered at users' size, per zoom mode
#: (`quality.py --no-finetune --size W H --zoom MODE`), measured with v5
QUALITY_SIZE_RECORDS = {
    mode: f"quality-sam2pal-micro-v5-12mp-zoom-{mode}" for mode in ("off", "on", "best")
}


#: the same with the shipped model (v12), `off` and `best` (SAM2's choice of mask, as
#: measured then), and `best` with the workflow's choice of mask since 2026-12-08
QUALITY_SIZE_RECORDS_V12 = {
    **{mode: f"quality-sam2pal-micro-v12-12mp-zoom-{mode}" for mode in ("off", "best")},
    "`best`, `mask_choice: templates`, `absent: keep`": (
        "quality-sam2pal-micro-v12-12mp-zoom-best-templates-keep"
    ),
}


def _mode_label(mode: str) -> str:
    """A zoom mode as code ("`best`"); a longer label as it is written."""
    return mode if "`" in mode else f"`{mode}`"


def quality_size(records: dict = QUALITY_SIZE_RECORDS) -> str:
    """Zero-shot IoU per structure on the held-out collections at users' photo size,
    with each zoom mode side by side (and the goals met per mode)."""
    loaded = {mode: load(name) for mode, name in records.items()}
    first_name, first = next(iter(records.values())), next(iter(loaded.values()))
    width, height = first["args"]["size"]
    zero = "zero-shot (1 template)"
    entries = {mode: rec["results"]["collections"] for mode, rec in loaded.items()}
    collections = list(first["results"]["collections"])
    targets = first["results"]["collections"][collections[0]]["targets"]
    parts = QUALITY_STRUCTURES
    lines = [
        f"Zero-shot from one template ({micro(first_name)}), the held-out "
        f"collections of *Segmentation quality* rendered at {width} x {height} pixels (the "
        f"same specimens in about the same poses, their clutter and lighting drawn anew; "
        f"{targets} targets each), segmented as the workflow does with each "
        "`zoom` mode:",
        "",
        "| collection | zoom | " + " | ".join(parts) + " | mean of parts |",
        "|---|---|" + "---|" * (len(parts) + 1),
    ]
    for name in collections:
        for i, (mode, colls) in enumerate(entries.items()):
            table = colls[name]["methods"][zero]
            lines.append(
                f"| {name if i == 0 else ''} | {_mode_label(mode)} | "
                + " | ".join(_iou(table.get(s)) for s in parts)
                + f" | {table['mean']:.3f} |"
            )
    lines += ["", "| zoom | mean of parts over the collections | part goals met |", "|---|---|---|"]
    for mode, colls in entries.items():
        means = [c["methods"][zero]["mean"] for c in colls.values()]
        met = loaded[mode]["results"]["goals"]["met"]
        goals = {k: v for k, v in met.items() if "palindrome" not in k and "rank" not in k}
        lines.append(
            f"| {_mode_label(mode)} | {sum(means) / len(means):.3f} "
            f"| {sum(goals.values())} of {len(goals)} |"
        )
    return "\n".join(lines) + "\n\n" + source(*records.values())


#: the palindrome through the zoom pass (`quality.py --zoom best`, v11, beside v11's
#: quality rows), one record per collection measured so far, in collection order
#: (the "-all-" records: the fine-tuned rows from three templates trained again for the
#: row with all three in memory, the one-template row and the oracle kept from the first
#: record)
PALINDROME_ZOOM_RECORDS = (
    "quality-palindrome-zoom-all-blue_slate",
    "quality-palindrome-zoom-all-bronze_aligned",
    "quality-palindrome-zoom-small_mixed",
    "quality-palindrome-zoom-all-pale_on_dark",
    "quality-palindrome-zoom-procedural_eyes",
)


def palindrome_zoom(records=PALINDROME_ZOOM_RECORDS, without=QUALITY_RECORDS_V11) -> str:
    """The quality table's fine-tuned rows without the zoom pass and with `zoom: best`,
    per collection: the means of the parts, the gains over the same pass's zero-shot and
    the thin parts of the judged row."""
    off = _quality_results(without)["collections"]
    best = _quality_results(records)["collections"]
    heads = [
        "zero-shot",
        "3 templates",
        "palindrome, 1 template",
        "palindrome, 3 templates",
        "the same, all 3 in memory",
    ]
    lines = [
        "| collection | zoom | " + " | ".join(heads) + " | oracle | gain, 1 template "
        "| gain, 3 templates | share of the oracle's gain, 1 / 3 templates "
        "| legs, palindrome from 3 templates | antennae, the same |",
        "|---|---|" + "---|" * (len(heads) + 6),
    ]
    for name, entry in best.items():
        for i, (mode, e) in enumerate((("off", off[name]), ("best", entry))):
            methods = e["methods"]
            judged = _judged(methods)
            rows = (
                methods["zero-shot (1 template)"],
                _row_ending(methods, "templates"),
                methods.get("palindrome LoRA (1 template)"),
                judged,
                _row_ending(methods, "in memory"),
                methods.get("oracle: supervised LoRA (1 template)"),
            )
            shares = [e.get(k) for k in ("gap_closed", "judged_gap_closed")]
            cells = [
                name if i == 0 else "",
                f"`{mode}`",
                *(f"{t['mean']:.3f}" if t else "-" for t in rows),
                *(
                    f"{100 * e[k]:+.1f}" if k in e else "-"
                    for k in ("palindrome_gain", "palindrome_judged_gain")
                ),
                " / ".join(f"{100 * v:.0f}%" if v is not None else "-" for v in shares),
                _iou(judged.get("legs")) if judged else "-",
                _iou(judged.get("antenna")) if judged else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return (
        f"Mean IoU of the parts per method ({micro(without[0])}), without the zoom pass (its "
        "quality table's rows) and with `zoom: best` (the fine-tuning trains on the zoom windows too); the gains "
        "are over the same pass's zero-shot, in points; *palindrome, 3 templates* segments "
        "from the first template with its adapter, *the same, all 3 in memory* from the "
        "three, as the workflow does (measured where the record has it):\n\n"
        + "\n".join(lines)
        + "\n\n"
        + source(*records)
    )


#: the fine-tuned rows of `quality.py --zoom best` from three templates, per collection:
#: (judged from the training template alone, judged from every other template:
#: `finetune.judge_memory` training, others); the same photos, templates and training
JUDGE_MEMORY_RECORDS = tuple(
    (before, f"quality-palindrome-zoom-others-{name}")
    for name, before in (
        ("blue_slate", "quality-palindrome-zoom-all-blue_slate"),
        ("bronze_aligned", "quality-palindrome-zoom-all-bronze_aligned"),
        ("pale_on_dark", "quality-palindrome-zoom-all-pale_on_dark"),
        ("procedural_eyes", "quality-palindrome-zoom-procedural_eyes"),
    )
)


def judge_memory(pairs=JUDGE_MEMORY_RECORDS) -> str:
    """Per collection, the judged adapter segmenting with all three templates in memory
    when its held-out templates were segmented from the training template alone and
    when from every other template: the mean of the parts, the epoch and the structures
    left to the untouched model, the antennae; beside the three templates alone."""
    lines = [
        "| collection | 3 templates, no fine-tuning | judged from the training template "
        "| epoch, structures left untouched | judged from the other templates "
        "| epoch, structures left untouched | change | antennae: 3 templates / first judge "
        "/ second judge |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for before, after in pairs:
        ((name, old),) = _quality_results([before])["collections"].items()
        new = _quality_results([after])["collections"][name]
        three = _row_ending(old["methods"], "templates")
        rows = [_row_ending(e["methods"], "in memory") for e in (old, new)]
        chosen = [
            f"{e['judged_epoch']}, {', '.join(e['judged_untouched_structures']) or 'none'}"
            for e in (old, new)
        ]
        lines.append(
            f"| {name} | {three['mean']:.3f} | {rows[0]['mean']:.3f} | {chosen[0]} "
            f"| {rows[1]['mean']:.3f} | {chosen[1]} "
            f"| {100 * (rows[1]['mean'] - rows[0]['mean']):+.1f} "
            f"| {' / '.join(_iou(t.get('antenna')) for t in (three, *rows))} |"
        )
    return (
        "Mean IoU of the parts on the 20 targets of each collection, segmented with the "
        "three templates in memory as the workflow segments after the fine-tuning "
        "(`zoom: best`; one template trains, two judge the epochs and choose, per "
        "structure, between the adapter and the untouched model); the same training, "
        "judged two ways; change in points:\n\n"
        + "\n".join(lines)
        + "\n\n"
        + source(*(name for pair in pairs for name in pair))
    )


#: palindrome.py's runs of (j) (`cycle_memory: training`) and, where measured, (h), per
#: collection, on the photos and templates of the shipped model's quality records
CYCLE_MEMORY_RECORDS = (
    ("palindrome-cycle-memory-blue_slate", "palindrome-two-train-blue_slate"),
    ("palindrome-cycle-memory-bronze_aligned",),
    ("palindrome-cycle-memory-small_mixed", "palindrome-two-train-small_mixed"),
    ("palindrome-cycle-memory-pale_on_dark",),
    ("palindrome-cycle-memory-procedural_eyes",),
)
#: palindrome.py's method (j); (h) and (i) are THREE_TEMPLATE_METHOD and TWO_JUDGES_METHOD
BOTH_IN_MEMORY = (
    "palindrome (defaults, two templates train, both in each cycle's memory, the third picks "
    "the epoch and each structure's model)"
)


#: the same, on other photos (`--seed-offset 1000`): where palindrome.py ran the default
#: (i) too, its record alone; else beside quality.py's record of those photos
CYCLE_MEMORY_RECORDS_1000 = (
    ("palindrome-cycle-memory-s1000-blue_slate",),
    ("palindrome-cycle-memory-s1000-bronze_aligned",),
)
CYCLE_MEMORY_QUALITY_1000 = ("quality-v12-seed1000-bronze_aligned",)


def _kept_with_all_templates(methods: dict, names) -> tuple[list, list]:
    """palindrome.py's runs of the methods `names` (None where not measured) and their
    kept adapters' tables with all the templates in memory."""
    runs = [methods.get(m) for m in names]
    return runs, [None if r is None else r["table_all_templates"] for r in runs]


def _means(tables) -> str:
    """The tables' means of the parts as table cells ("-" where not measured)."""
    return " | ".join("-" if t is None else f"{t['mean']:.3f}" for t in tables)


def cycle_memory(
    records=CYCLE_MEMORY_RECORDS, quality_records=QUALITY_RECORDS, photos: str = ""
) -> str:
    """Per collection, the adapters of three-template fine-tunings segmenting with all
    three templates in memory: the default (one template trains, two judge), two
    training templates one per cycle (h) and both in each cycle's memory (j); beside the
    three templates without fine-tuning. The default and the three templates come from
    palindrome.py's records where they ran them, else from the quality record of the
    same photos and templates (their zero-shot rows must agree)."""
    quality_rows = _quality_results(quality_records)["collections"] if quality_records else {}
    lines = [
        "| collection | 3 templates, no fine-tuning | one trains, two judge (default) "
        "| two train, one judges | two train, both in each cycle's memory "
        "| change against the default | epoch, structures left untouched "
        "| antennae: 3 templates / default / two train / both in memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group in records:
        methods = {}
        for record in group:
            ((name, entry),) = load(record)["results"]["collections"].items()
            methods.update(entry["methods"])
        old = quality_rows.get(name, {}).get("methods", {})
        if old:
            zero = methods["zero-shot"]["table"]["mean"]
            if abs(zero - old["zero-shot (1 template)"]["mean"]) > 1e-9:
                raise SystemExit(f"{group[0]}: its zero-shot row is not {name}'s quality record's")
        three = (
            methods["zero-shot (all templates)"]["table"]
            if "zero-shot (all templates)" in methods
            else _row_ending(old, "templates")
        )
        default = (
            methods[TWO_JUDGES_METHOD]["table_all_templates"]
            if TWO_JUDGES_METHOD in methods
            else _row_ending(old, "in memory")
        )
        runs, tables = _kept_with_all_templates(methods, (THREE_TEMPLATE_METHOD, BOTH_IN_MEMORY))
        both = runs[1]
        lines.append(
            f"| {name} | {three['mean']:.3f} | {default['mean']:.3f} | {_means(tables)}"
            + f" | {100 * (tables[1]['mean'] - default['mean']):+.1f} "
            f"| {both['best_epoch']}, {', '.join(both['untouched_structures']) or 'none'} "
            f"| {' / '.join(_iou(None if t is None else t.get('antenna')) for t in (three, default, *tables))} |"
        )
    return (
        f"Mean IoU of the parts on the 20 targets of each collection{photos} (sam2pal-micro "
        "v12), segmented with the three templates in memory, as the workflow segments "
        "after the fine-tuning; change in points:\n\n"
        + "\n".join(lines)
        + "\n\n"
        + source(*quality_records, *(name for group in records for name in group))
    )


#: the held-out collections of `sam2pal.synth.quality`, in its order
HELD_OUT_NAMES = ("blue_slate", "bronze_aligned", "small_mixed", "pale_on_dark", "procedural_eyes")
#: how a block on the second draw of photos names them
OTHER_PHOTOS = ", other photos (`--seed-offset 1000`)"
#: palindrome.py's runs of (k) and (l) (`--n-templates 4 --n-images 24`), one record per
#: collection
FOUR_TEMPLATE_RECORDS = tuple(f"palindrome-four-templates-{c}" for c in HELD_OUT_NAMES)
#: the default (k) alone on other photos (`--seed-offset 1000`)
FOUR_TEMPLATE_RECORDS_1000 = tuple(
    f"palindrome-four-templates-s1000-{c}"
    for c in HELD_OUT_NAMES[:4]  # the beetles
)
#: palindrome.py's methods (k) and (l): two templates train (one per cycle / both in each
#: cycle's memory), the other two judge
FOUR_TEMPLATE_METHODS = (
    "palindrome (defaults, two templates train, the other two pick the epoch and each "
    "structure's model)",
    "palindrome (defaults, two templates train, both in each cycle's memory, the other two "
    "pick the epoch and each structure's model)",
)


def four_templates(records=FOUR_TEMPLATE_RECORDS, photos: str = "") -> str:
    """Per collection, four templates: two train, two judge (the workflow's default
    with four), each training template alone in its cycles' memory (`cycle_memory:
    template`) or, where measured, both (`training`); every row segments with all four
    in memory, beside the four without fine-tuning and one template zero-shot."""
    lines = [
        "| collection | 1 template, no fine-tuning | 4 templates, no fine-tuning "
        "| two train, one per cycle (default) | two train, both in each cycle's memory "
        "| default against the 4 alone | both against the default "
        "| epochs kept (default / both) | antennae: 4 templates / default / both |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        ((name, entry),) = load(record)["results"]["collections"].items()
        methods = entry["methods"]
        one = methods["zero-shot"]["table"]
        four = methods["zero-shot (all templates)"]["table"]
        runs, tables = _kept_with_all_templates(methods, FOUR_TEMPLATE_METHODS)
        default, both = tables
        change = "-" if both is None else f"{100 * (both['mean'] - default['mean']):+.1f}"
        lines.append(
            f"| {name} | {one['mean']:.3f} | {four['mean']:.3f} | {_means(tables)}"
            + f" | {100 * (default['mean'] - four['mean']):+.1f} | {change} "
            f"| {' / '.join('-' if r is None else str(r['best_epoch']) for r in runs)} "
            f"| {' / '.join(_iou(None if t is None else t.get('antenna')) for t in (four, *tables))} |"
        )
    return (
        f"Mean IoU of the parts on the 20 targets of each collection{photos} (sam2pal-micro "
        "v12), four templates, segmented with all four in memory, as the workflow segments "
        "after the fine-tuning; change in points:\n\n"
        + "\n".join(lines)
        + "\n\n"
        + source(*records)
    )


#: the mask rules side by side (`benchmarks/readout.py`): the quality table's photos, and
#: others drawn from the same settings
READOUT_RECORDS = {"": "readout-sam2pal-micro", "other photos": "readout-sam2pal-micro-s1000"}
READOUT_SAM2, READOUT_DEFAULT = "sam2 / blank", "templates / keep"


def readout(records: dict = READOUT_RECORDS) -> str:
    """Zero-shot, per held-out collection: the mean of the parts under each of the
    engine's mask rules (`mask_choice` / `absent`), from one template and from three,
    the cycle IoU's rank correlation, and per structure SAM2's rule against the default."""
    loaded = {photos: load(name) for photos, name in records.items()}
    first = next(iter(loaded.values()))["results"]
    rules = first["rules"]
    model = model_version(first["model"]["checkpoint_sha256"])
    head = " | ".join(f"`{r}`" for r in rules)
    lines = [
        f"| collection | photos | 1 template: {head} | 3 templates: `{READOUT_SAM2}` "
        f"| `{READOUT_DEFAULT}` | cycle-IoU rank corr. (1 template) |",
        "|---|---|" + "---|" * (len(rules) + 3),
    ]
    per_structure = [
        "| collection | photos | " + " | ".join(QUALITY_STRUCTURES[1:]) + " |",
        "|---|---|" + "---|" * (len(QUALITY_STRUCTURES) - 1),
    ]
    switched = []
    for photos, record in loaded.items():
        label = photos or "the quality table's"  # the records' keys: "" or "other photos"
        collections = record["results"]["collections"]
        for name, entry in collections.items():
            one, three = entry["1 template"], entry["3 templates"]
            lines.append(
                f"| {name} | {label} | "
                + " | ".join(f"{one[r]['iou']['mean']:.3f}" for r in rules)
                + f" | {three[READOUT_SAM2]['iou']['mean']:.3f} "
                f"| {three[READOUT_DEFAULT]['iou']['mean']:.3f} "
                f"| {one[READOUT_SAM2]['rank_correlation']:.2f} / "
                f"{one[READOUT_DEFAULT]['rank_correlation']:.2f} |"
            )
            sam2, ours = one[READOUT_SAM2]["iou"], one[READOUT_DEFAULT]["iou"]
            per_structure.append(
                f"| {name} | {label} | "
                + " | ".join(
                    "-"
                    if sam2.get(s) != sam2.get(s) or s not in sam2
                    else f"{sam2[s]:.3f} / {ours[s]:.3f}"
                    for s in QUALITY_STRUCTURES[1:]
                )
                + " |"
            )
            for n, rows in (("1", one), ("3", three)):
                chosen = [
                    f"{s} {slot + 1}"
                    for s, slot in rows[READOUT_DEFAULT]["slots"].items()
                    if slot >= 0
                ]
                if chosen:
                    switched.append(
                        f"{name} ({photos or label + ' photos'}, "
                        f"{n} template{'s' if n != '1' else ''}): {', '.join(chosen)}"
                    )
        summary = record["results"]["summary"]
        lines.append(
            f"| **mean** | {label} | "
            + " | ".join(f"**{summary['1 template'][r]:.3f}**" for r in rules)
            + f" | **{summary['3 templates'][READOUT_SAM2]:.3f}** "
            f"| **{summary['3 templates'][READOUT_DEFAULT]:.3f}** | |"
        )
    return (
        f"Mean IoU of the parts on the 20 targets of each held-out collection ({model}, "
        "zero-shot), under each rule `mask_choice / absent` (`sam2 / blank`: SAM2's own):\n\n"
        + "\n".join(lines)
        + "\n\nPer structure from one template, SAM2's rule / the default "
        f"(`{READOUT_DEFAULT}`):\n\n"
        + "\n".join(per_structure)
        + "\n\nThe candidates `templates` chose (of SAM2's three; every other structure kept "
        "SAM2's pick): " + ("; ".join(switched) or "none") + ".\n\n" + source(*records.values())
    )


#: quality.py's rows under the workflow's choice of mask since 2026-12-08 (`mask_choice:
#: templates`, `absent: keep`), v12, on the collections where it changes the zero-shot
#: rows; beside them the quality table's, measured with SAM2's choice
QUALITY_RULE_RECORDS = {
    name: f"quality-sam2pal-micro-v12-templates-keep-{name}"
    for name in ("small_mixed", "pale_on_dark", "procedural_eyes")
}
QUALITY_RULE_COLUMNS = (
    ("zero-shot", lambda m: m["zero-shot (1 template)"]),
    ("3 templates", lambda m: _row_ending(m, "templates")),
    ("palindrome LoRA", lambda m: m["palindrome LoRA (1 template)"]),
    ("palindrome LoRA, 3 templates", _judged),
    ("the same, all 3 in memory", lambda m: _row_ending(m, "in memory")),
    ("oracle", lambda m: m["oracle: supervised LoRA (1 template)"]),
)


def quality_rule(records: dict = QUALITY_RULE_RECORDS, before=QUALITY_RECORDS) -> str:
    """Per collection, quality.py's rows (mean of the parts) with SAM2's choice of mask
    (the quality table) and with the workflow's, and the palindrome's gains."""
    earlier = _quality_results(before)["collections"]
    lines = [
        "| collection | mask rule | "
        + " | ".join(label for label, _ in QUALITY_RULE_COLUMNS)
        + " | palindrome's gain, 1 / 3 templates | share of the oracle's gain |",
        "|---|---|" + "---|" * (len(QUALITY_RULE_COLUMNS) + 2),
    ]
    for name, record in records.items():
        entries = {
            "SAM2's (`sam2 / blank`)": earlier[name],
            "the workflow's (`templates / keep`)": load(record)["results"]["collections"][name],
        }
        for i, (rule, entry) in enumerate(entries.items()):
            methods = entry["methods"]
            cells = [pick(methods) for _, pick in QUALITY_RULE_COLUMNS]
            lines.append(
                f"| {name if i == 0 else ''} | {rule} | "
                + " | ".join("-" if t is None else f"{t['mean']:.3f}" for t in cells)
                + f" | {100 * entry['palindrome_gain']:+.1f} / "
                f"{100 * entry['palindrome_judged_gain']:+.1f} "
                f"| {100 * entry['gap_closed']:.0f}% / {100 * entry['judged_gap_closed']:.0f}% |"
            )
    return (
        "Mean IoU of the parts on the 20 targets of each collection (sam2pal-micro v12; "
        "quality.py's rows, the workflow's other defaults; gains in points over zero-shot "
        "under the same rule):\n\n" + "\n".join(lines) + "\n\n" + source(*records.values())
    )


MASK_GRID_RECORD = "mask-grid"


QC_RANK_RECORD = "qc-rank"


def model_version(sha256: str) -> str | None:
    """Which sam2pal-micro a checkpoint is ("sam2pal-micro v4"), from the training records
    kept under resources/models (a version's folder, or the shipped file's record)."""
    for path in sorted((ROOT / "resources" / "models").rglob("*.training.json")):
        record = json.loads(path.read_text())
        if record.get("checkpoint_sha256") == sha256:
            named = path.parent.name if path.parent.name != "models" else record["name"]
            version = re.search(r"v\d+", named)
            if version:  # else a copy in next/ or tried/: the shipped or kept one may follow
                return f"sam2pal-micro {version.group(0)}"
    return None


def record_model(record: dict) -> str:
    """The model a benchmark record measured: its sam2pal-micro version, else the
    checkpoint argument it was given."""
    return model_version(record["results"]["checkpoint_sha256"]) or record["args"]["checkpoint"]


def qc_rank(record_name: str = QC_RANK_RECORD) -> str:
    """How well each QC signal ranks the predictions by their true IoU: pooled (the
    goal's), within each structure, per photo (qc.csv's order)."""
    record = load(record_name)
    res, args = record["results"]["collections"], record["args"]
    signals = list(next(iter(res.values()))["pooled"])
    offset = args.get("seed_offset", 0)
    photos = f"other photos (`--seed-offset {offset}`)" if offset else "the photos of quality.py"
    digest = record["results"]["checkpoint_sha256"]
    model = record_model(record)
    lines = [
        f"Spearman correlation with the true IoU, zero-shot from one template "
        f"({model}, SHA-256 {digest[:12]}...; "
        f"the part predictions of each collection's {args['n_images'] - args['n_templates']} "
        f"targets, {photos}):",
        "",
        "| collection | ranked | " + " | ".join(signals) + " |",
        "|---|---|" + "---|" * len(signals),
    ]
    for name, entry in res.items():
        for i, (key, label) in enumerate(
            (("pooled", "all parts pooled"), ("within_structure", "within each structure"))
        ):
            cells = " | ".join(f"{entry[key][sig]:.3f}" for sig in signals)
            lines.append(f"| {name if i == 0 else ''} | {label} | {cells} |")
    photo = list(next(iter(res.values()))["per_photo"])
    lines += [
        "",
        "Per photo, a photo's score (qc.csv's: the mean of its structures' cycle IoU x "
        "stability; until 2026-12-05 the lowest cycle IoU) against the mean true IoU of its "
        "parts:",
        "",
        "| collection | " + " | ".join(photo) + " |",
        "|---|" + "---|" * len(photo),
        *(
            f"| {name} | " + " | ".join(f"{entry['per_photo'][p]:.3f}" for p in photo) + " |"
            for name, entry in res.items()
        ),
    ]
    return "\n".join(lines) + "\n\n" + source(record_name)


QC_RANK_80_RECORDS = (
    "qc-rank-80-v5",
    "qc-rank-80-v6",
    "qc-rank-80-v7",
    "qc-rank-80-v8",
    "qc-rank-80-v9",
    "qc-rank-80-v10",
    "qc-rank-80-v11",
    "qc-rank-80-v12",
)


def qc_rank_per_photo(records=QC_RANK_80_RECORDS) -> str:
    """The per-photo rows of several qc_rank.py records side by side (one model each):
    how well each photo score orders a collection's photos by their true IoU."""
    loaded = [load(name) for name in records]
    first = loaded[0]["results"]["collections"]
    photo = list(next(iter(first.values()))["per_photo"])
    n = loaded[0]["args"]["n_images"] - loaded[0]["args"]["n_templates"]
    lines = [
        f"Spearman correlation of each photo's score with the mean true IoU of its parts, "
        f"zero-shot from one template, {n} targets per collection (quality.py's "
        f"collections, more photos drawn):",
        "",
        "| collection | model | " + " | ".join(photo) + " |",
        "|---|---|" + "---|" * len(photo),
    ]
    for name in first:
        for i, record in enumerate(loaded):
            model = record_model(record)
            entry = record["results"]["collections"][name]["per_photo"]
            cells = " | ".join(f"{entry[p]:.3f}" for p in photo)
            lines.append(f"| {name if i == 0 else ''} | {model} | {cells} |")
    return "\n".join(lines) + "\n\n" + source(*records)


TRAIN_FIT_RECORD = "train-fit"


def train_fit() -> str:
    """Per-structure IoU on fresh episodes of the model's own training recipe beside
    the held-out curve's episodes (benchmarks/train_fit.py)."""
    record = load(TRAIN_FIT_RECORD)
    res = record["results"]
    parts = QUALITY_STRUCTURES[1:]
    model = record_model(record)
    lines = [
        f"Zero-shot IoU of the tracker's masks from one template ({model}), per structure: "
        f"{record['args']['episodes']} fresh episodes of each kind drawn from its training "
        f"recipe (seed {res['seed']}, which no training run used), and "
        f"{record['args']['heldout']} targets per held-out collection (the held-out curve's "
        "episodes: 384 x 288, not toned):",
        "",
        "| episodes | " + " | ".join(parts) + " |",
        "|---|" + "---|" * len(parts),
    ]
    rows = [(f"training recipe: {k}", v) for k, v in res["kinds"].items()]
    rows += [(f"held out: {k}", v) for k, v in res["held_out"].items()]
    for label, entry in rows:
        cells = [f"{entry[s]['iou']:.3f}" if s in entry else "-" for s in parts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + source(TRAIN_FIT_RECORD)


def mask_grid() -> str:
    """What the model's output grid allows per structure, beside the goals and the
    shipped model's zero-shot IoU (the quality records)."""
    record = load(MASK_GRID_RECORD)
    res, args = record["results"], record["args"]
    sizes = [str(size) for size in res["input_sizes"]]
    goals = res["goals"]
    quality = _quality_results()["collections"]
    label = micro(QUALITY_RECORDS[0])
    lines = [
        f"| collection | structure | thickness (px) | goal | {label} zero-shot | "
        f"cells' shares, {sizes[0]} | " + " | ".join(f"fitted, {size}" for size in sizes) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(sizes),
    ]
    above, gaps = [], {}
    for cname, entry in res["collections"].items():
        zero = quality.get(cname, {}).get("methods", {}).get("zero-shot (1 template)", {})
        first = True
        for name, row in entry["structures"].items():
            goal, best = goals.get(name), row["ceiling"][sizes[0]]
            if goal is not None and goal > best:
                above.append(f"{cname} {name} ({goal:.2f} > {best:.3f})")
            if zero.get(name) is not None and not math.isnan(zero[name]):
                gaps.setdefault(name, []).append(zero[name] / best)
            lines.append(
                f"| {cname if first else ''} | {name} | {row['width_px']:.1f} | "
                f"{f'{goal:.2f}' if goal is not None else '-'} | {_iou(zero.get(name))} | "
                f"{row['coverage'][sizes[0]]:.3f} | "
                + " | ".join(f"{row['ceiling'][size]:.3f}" for size in sizes)
                + " |"
            )
            first = False
    lowest = min(
        (row["ceiling"][sizes[0]], cname, name)
        for cname, entry in res["collections"].items()
        for name, row in entry["structures"].items()
    )
    photo = next(iter(res["collections"].values()))["photo"]
    text = [
        f"Each true mask of the held-out collections' {args['n_images'] - args['n_templates']} "
        f"targets ({photo[1]} x {photo[0]} photos) drawn on the output grid of each input "
        "size (a quarter of it, the photo stretched to the square; resized bilinearly and "
        "thresholded as the engine does), mean IoU per structure; its thickness is its "
        "area over half its outline (a line's width, half a disc's diameter):",
        "",
        *lines,
        "",
        (
            f"Goals above what the {sizes[0]} px grid allows: " + "; ".join(above) + "."
            if above
            else f"No goal lies above what the {sizes[0]} px grid allows (the lowest fitted "
            f"value: {lowest[0]:.3f}, {lowest[2]} on {lowest[1]})."
        ),
        f"{label}'s zero-shot IoU as a share of the fitted {sizes[0]} px value, mean over "
        "the collections: "
        + ", ".join(f"{name} {100 * sum(v) / len(v):.0f}%" for name, v in gaps.items())
        + ".",
    ]
    return "\n".join(text) + "\n\n" + source(MASK_GRID_RECORD, *QUALITY_RECORDS)


REVIEW_TEMPLATES_RECORD = "review-templates-sam2pal-micro-v2"


def review_templates() -> str:
    """Corrections as templates: IoU of the images not reviewed, for K reviewed worst."""
    res = load(REVIEW_TEMPLATES_RECORD)["results"]
    rows = res["rows"]
    structures = [s for s in next(iter(rows.values())) if s != "mean of structures"]
    lines = [
        f"Measured with `benchmarks/review_templates.py` ({micro(REVIEW_TEMPLATES_RECORD)}; held-out collection "
        f"`{res['collection']}`, {res['description']}; {res['images']} photos segmented "
        f"from one template, the K worst by QC reviewed, IoU on the {res['evaluated']} "
        "photos that are neither the template nor among the 5 worst):",
        "",
        "| reviewed worst photos as templates (K) | "
        + " | ".join(structures)
        + " | mean of structures |",
        "|---|" + "---|" * (len(structures) + 1),
    ]
    for k, row in rows.items():
        cells = [f"{row[s]:.3f}" for s in structures] + [f"{row['mean of structures']:.3f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + source(REVIEW_TEMPLATES_RECORD)


HOLDOUT_TEMPLATE_RECORDS = (
    "palindrome-sam2pal-micro-v2-holdout-template",
    "palindrome-sam2pal-micro-v2-holdout-template-b",
)
STRUCTURE_CHOICE_RECORDS = (
    "palindrome-sam2pal-micro-v2-structures",
    "palindrome-sam2pal-micro-v2-structures-b",
)
THREE_TEMPLATE_RECORDS = (
    "palindrome-sam2pal-micro-v2-three-templates",
    "palindrome-sam2pal-micro-v2-three-templates-b",
)
# (g) with template views (template_views: 8), the same method name
VIEWS_RECORDS = (
    "palindrome-sam2pal-micro-v2-structures-views",
    "palindrome-sam2pal-micro-v2-structures-views-b",
)
# (i): three templates, one trains, two judge (holdout_templates: 2)
TWO_JUDGES_RECORDS = (
    "palindrome-sam2pal-micro-v2-two-judges",
    "palindrome-sam2pal-micro-v2-two-judges-b",
)
HOLDOUT_EPOCH = "palindrome (second template picks the epoch)"
HOLDOUT_METHOD = "palindrome (defaults, second template picks the epoch and each structure's model)"
THREE_TEMPLATE_METHOD = (
    "palindrome (defaults, two templates train, the third picks the epoch and each "
    "structure's model)"
)
TWO_JUDGES_METHOD = (
    "palindrome (defaults, one template trains, the other two pick the epoch and each "
    "structure's model)"
)


def _runs(records, method: str) -> dict:
    """{collection: the run of `method`} over the palindrome `records`."""
    return {
        name: entry["methods"][method]
        for record in records
        for name, entry in load(record)["results"]["collections"].items()
    }


def holdout_template() -> str:
    """Palindrome LoRA with its epoch picked by the cycle IoU (the quality records), by
    a second template held out of the training, by it with the per-structure choice,
    with three templates, two training and the third held out, with template views, and
    with three templates, one training and two held out (mean IoU of the parts)."""
    quality_runs = _quality_results(QUALITY_RECORDS_FIRST)["collections"]
    epoch_runs = _runs(HOLDOUT_TEMPLATE_RECORDS, HOLDOUT_EPOCH)
    three_runs = _runs(THREE_TEMPLATE_RECORDS, THREE_TEMPLATE_METHOD)
    views_runs = _runs(VIEWS_RECORDS, HOLDOUT_METHOD)
    judges_runs = _runs(TWO_JUDGES_RECORDS, TWO_JUDGES_METHOD)
    text = [
        f"Mean IoU of the parts on the held-out collections ({micro(QUALITY_RECORDS_FIRST[0])}, 20 "
        "targets segmented from one template; the palindrome with the default settings of "
        "2026-12-03: no template views, no anchor term):",
        "",
        "| collection | zero-shot | epoch picked by the cycle IoU | epoch picked by a second "
        "template | and per structure, adapter or untouched model | structures left to the "
        "untouched model | antenna: zero-shot / per structure | two templates train, the "
        "third picks (structures left) | per structure, with 8 template views | one "
        "template trains, two pick (structures left) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in STRUCTURE_CHOICE_RECORDS:
        for name, entry in load(record)["results"]["collections"].items():
            run = entry["methods"][HOLDOUT_METHOD]
            zero = entry["methods"]["zero-shot"]["table"]
            cycle = quality_runs[name]["methods"]["palindrome LoRA (1 template)"]
            epoch = epoch_runs[name]
            left = ", ".join(run["untouched_structures"]) or "none"
            three = three_runs[name]
            left_three = ", ".join(three["untouched_structures"]) or "none"
            views = views_runs[name]
            judges = judges_runs[name]
            left_judges = ", ".join(judges["untouched_structures"]) or "none"
            text.append(
                f"| {name} | {zero['mean']:.3f} | {cycle['mean']:.3f} "
                f"| {epoch['table']['mean']:.3f} (epoch {epoch['best_epoch']}) "
                f"| {run['table']['mean']:.3f} (epoch {run['best_epoch']}) | {left} "
                f"| {zero['antenna']:.3f} / {run['table']['antenna']:.3f} "
                f"| {three['table']['mean']:.3f} (epoch {three['best_epoch']}; {left_three}) "
                f"| {views['table']['mean']:.3f} (epoch {views['best_epoch']}) "
                f"| {judges['table']['mean']:.3f} (epoch {judges['best_epoch']}; {left_judges}) |"
            )
    records = (
        *QUALITY_RECORDS_FIRST,
        *HOLDOUT_TEMPLATE_RECORDS,
        *STRUCTURE_CHOICE_RECORDS,
        *THREE_TEMPLATE_RECORDS,
        *VIEWS_RECORDS,
        *TWO_JUDGES_RECORDS,
    )
    return "\n".join(text) + "\n\n" + source(*records)


# (g) and (i) with eight template views and the anchor term (anchor_weight: 1), the
# defaults since 2026-12-04
ANCHOR_RECORDS = tuple(
    f"palindrome-sam2pal-micro-v2-anchor-{name}"
    for name in ("bronze_aligned", "small_mixed", "pale_on_dark", "procedural_eyes")
)
ANCHOR_JUDGES_RECORDS = (
    "palindrome-sam2pal-micro-v2-anchor-two-judges-a",
    "palindrome-sam2pal-micro-v2-anchor-two-judges-b",
)


def _with_without_head(record: str, pairs: dict, term: str, note: str = "") -> list[str]:
    """The caption and header of a table of the parts' mean IoU without and with `term`,
    one column pair per key of `pairs`."""
    return [
        f"Mean IoU of the parts ({micro(record)}, 20 targets from one template; in "
        f"brackets the gain over zero-shot, points{note}):",
        "",
        "| collection | zero-shot | "
        + " | ".join(f"{k}: without / with {term}" for k in pairs)
        + " |",
        "|---|---|" + "---|" * len(pairs),
    ]


def anchor_term() -> str:
    """Mean IoU of the parts with and without the anchor term (and its template views),
    with two templates ((g)) and three ((i)), and each one's gain over zero-shot."""
    zero = {
        name: entry["methods"]["zero-shot"]["table"]["mean"]
        for record in STRUCTURE_CHOICE_RECORDS
        for name, entry in load(record)["results"]["collections"].items()
    }
    pairs = {
        "two templates": (
            _runs(STRUCTURE_CHOICE_RECORDS, HOLDOUT_METHOD),
            _runs(ANCHOR_RECORDS, HOLDOUT_METHOD),
        ),
        "three templates": (
            _runs(TWO_JUDGES_RECORDS, TWO_JUDGES_METHOD),
            _runs(ANCHOR_JUDGES_RECORDS, TWO_JUDGES_METHOD),
        ),
    }
    text = _with_without_head(ANCHOR_RECORDS[0], pairs, "the anchor term")
    gains = {k: ([], []) for k in pairs}
    for name, z in zero.items():
        cells = []
        for k, (without, with_) in pairs.items():
            a, b = without[name]["table"]["mean"], with_[name]["table"]["mean"]
            gains[k][0].append(100 * (a - z))
            gains[k][1].append(100 * (b - z))
            cells.append(f"{a:.3f} ({100 * (a - z):+.1f}) / {b:.3f} ({100 * (b - z):+.1f})")
        text.append(f"| {name} | {z:.3f} | " + " | ".join(cells) + " |")
    text.append(
        "| mean gain, points | | "
        + " | ".join(f"{sum(a) / len(a):+.1f} / {sum(b) / len(b):+.1f}" for a, b in gains.values())
        + " |"
    )
    records = (
        *STRUCTURE_CHOICE_RECORDS,
        *ANCHOR_RECORDS,
        *TWO_JUDGES_RECORDS,
        *ANCHOR_JUDGES_RECORDS,
    )
    return "\n".join(text) + "\n\n" + source(*records)


#: palindrome with the stay term (`stay_weight: 1`): from one template, and from three
STAY_ONE_RECORDS = tuple(
    f"palindrome-sam2pal-micro-v2-stay-one-template-{c}" for c in HELD_OUT_NAMES
)
STAY_JUDGES_RECORDS = (
    "palindrome-sam2pal-micro-v2-stay-blue_slate",
    "palindrome-sam2pal-micro-v2-stay-bronze_aligned",
    "palindrome-sam2pal-micro-v2-stay-small_mixed",
    "palindrome-sam2pal-micro-v2-stay-pale_on_dark",
)
ONE_TEMPLATE_ROW = "palindrome LoRA (1 template)"


def stay_term() -> str:
    """Mean IoU of the parts without and with the stay term: from one template (the
    epoch picked by the cycle IoU; without it: the quality records' row from before it
    was on by default) and from three (one trains, two judge), with each one's gain over
    zero-shot."""
    quality = _quality_results(QUALITY_RECORDS_STAY_OFF)["collections"]
    pairs = {
        "one template": (ONE_TEMPLATE_ROW, _runs(STAY_ONE_RECORDS, "palindrome (defaults)")),
        "three templates": (None, _runs(STAY_JUDGES_RECORDS, TWO_JUDGES_METHOD)),
    }
    text = _with_without_head(STAY_ONE_RECORDS[0], pairs, "the stay term", "; - not measured")
    for name, entry in quality.items():
        z = entry["methods"]["zero-shot (1 template)"]["mean"]
        cells = []
        for row, runs in pairs.values():
            before = entry["methods"][row] if row else _judged(entry["methods"])
            a = before["mean"]
            b = runs[name]["table"]["mean"] if name in runs else None
            cells.append(
                f"{a:.3f} ({100 * (a - z):+.1f}) / "
                + ("-" if b is None else f"{b:.3f} ({100 * (b - z):+.1f})")
            )
        text.append(f"| {name} | {z:.3f} | " + " | ".join(cells) + " |")
    return (
        "\n".join(text)
        + "\n\n"
        + source(*QUALITY_RECORDS_STAY_OFF, *STAY_ONE_RECORDS, *STAY_JUDGES_RECORDS)
    )


CYCLE_REWARD_RECORD = "cycle-reward-sam2pal-micro"


def cycle_reward() -> str:
    """What the untouched model's return half rewards: per collection and structure,
    phase 1's IoU onto the template itself and onto the photos, phase 2's IoU back to
    the template from the photos' true masks, and the palindrome loss from the true
    masks against the lowest over the masks grown or shrunk."""
    res = load(CYCLE_REWARD_RECORD)["results"]
    text = [
        f"The untouched model (sam2pal-micro, sha256 {str(res['model']['checkpoint_sha256'])[:12]}; "
        "20 photos per collection, one template; "
        "IoU of the masks, and the palindrome loss, cross-entropy + Dice, of the return to "
        "the template):",
        "",
        "| collection | structure | onto the template itself | onto the photos | back from "
        "the photos' true masks | loss back from the true masks | lowest loss, true masks "
        "grown by |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, table in res["collections"].items():
        for i, structure in enumerate(s for s in QUALITY_STRUCTURES if s in table):
            row = table[structure]
            grown = {r: row[f"r={r}"]["loss"] for r in res["radii"]}
            best = min(grown, key=grown.get)
            text.append(
                f"| {name if i == 0 else ''} | {structure} | {row['self']['iou']:.2f} | "
                f"{row['forward']['iou']:.2f} | {row['r=0']['iou']:.2f} | "
                f"{row['r=0']['loss']:.3f} | {grown[best]:.3f} ({best:+d} px) |"
            )
    return "\n".join(text) + "\n\n" + source(CYCLE_REWARD_RECORD)


EPOCH_RECORDS = (
    "palindrome-sam2pal-micro-v2-epochs",
    "palindrome-sam2pal-micro-v2-epochs-b",
)
JUDGES = {HOLDOUT_METHOD: "one", TWO_JUDGES_METHOD: "two"}


def selection_rules() -> str:
    """The per-structure margins scored on runs recorded with every epoch's targets
    (`benchmarks/selection.py`): the targets' mean IoU of the parts per rule, and the
    ceiling of any such rule."""
    from selection import MARGINS, score_rules

    def label(margin):
        return "adapter for all" if margin is None else f"margin {margin:+g}"

    text = [
        f"Targets' mean IoU of the parts ({micro(EPOCH_RECORDS[0])}, 20 targets from one "
        "template) with the epoch and the structures each rule picks; in brackets the "
        "default rule's value with the epoch picked in hindsight:",
        "",
        "| collection | held-out templates | zero-shot | "
        + " | ".join(label(m) for m in MARGINS)
        + " | default, best epoch in hindsight | ceiling: each part at its best epoch |",
        "|---|---|---|" + "---|" * (len(MARGINS) + 2),
    ]
    scored = score_rules(list(EPOCH_RECORDS))
    totals = {m: [] for m in (*MARGINS, "ceiling")}
    for (name, method), runs in scored.items():
        rules = runs["rules"]
        default = rules[MARGINS[0]]
        for m in MARGINS:
            totals[m].append(rules[m]["mean"] - runs["zero_shot"])
        totals["ceiling"].append(runs["ceiling"] - runs["zero_shot"])
        text.append(
            f"| {name} | {JUDGES[method]} | {runs['zero_shot']:.3f} | "
            + " | ".join(f"{rules[m]['mean']:.3f} (epoch {rules[m]['epoch']})" for m in MARGINS)
            + f" | {default['hindsight_mean']:.3f} (epoch {default['hindsight_epoch']}) "
            f"| {runs['ceiling']:.3f} |"
        )
    gains = {m: f"{100 * sum(v) / len(v):+.1f}" for m, v in totals.items()}
    text.append(
        "| mean gain over zero-shot, points | | | "
        + " | ".join(gains[m] for m in MARGINS)
        + f" | | {gains['ceiling']} |"
    )
    return "\n".join(text) + "\n\n" + source(*EPOCH_RECORDS)


#: benchmarks/tone.py: zero-shot with and without the lift, on the held-out collections and
#: four more dark-on-dark looks
TONE_RECORD = "tone-sam2pal-micro"
#: quality.py on blue_slate with `--tone auto` (every row), against the headline
#: record measured with the photos as they are
TONE_QUALITY = (QUALITY_RECORDS_V2[0], QUALITY_RECORDS_TONE_NONE[0])


def tone() -> str:
    """Zero-shot with the photos as they are and with `tone: auto`; blue_slate's
    fine-tuned rows either way."""
    record = load(TONE_RECORD)["results"]
    res = record["collections"]
    first = next(iter(res.values()))
    measured = load(TONE_QUALITY[0])["results"]["model"]["checkpoint_sha256"]
    model = (
        micro(TONE_QUALITY[0])
        if record["model"]["checkpoint_sha256"] == measured
        else record["model"]["checkpoint"]
    )
    lines = [
        f"Measured with `benchmarks/tone.py` ({model}; zero-shot from one "
        f"template, {first['targets']} targets per collection; the first five are "
        "*Segmentation quality*'s, the other four dark-on-dark looks no other benchmark "
        "uses; IoU of the body, and the mean of the parts):",
        "",
        "| collection | lift? | photos lifted (gamma) | body, `none` | body, `auto` "
        "| parts, `none` | parts, `auto` |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in res.items():
        none, auto = e["tables"]["none"], e["tables"]["auto"]
        gamma = (
            f"{e['photos_lifted']} ({e['gamma_range'][0]:.2f}-{e['gamma_range'][1]:.2f})"
            if e["photos_lifted"]
            else "0"
        )
        lines.append(
            f"| {name} ({e['description']}) | {'yes' if e['lifts'] else 'no'} | {gamma} "
            f"| {none['body']:.3f} | {auto['body']:.3f} | {none['mean']:.3f} | {auto['mean']:.3f} |"
        )
    anyway = [
        f"{name} body {e['tables']['lifted anyway']['body']:.3f}, parts "
        f"{e['tables']['lifted anyway']['mean']:.3f}"
        for name, e in res.items()
        if "lifted anyway" in e["tables"]
    ]
    if anyway:
        lines += [
            "",
            "Where the templates call for no lift, every photo lifted anyway: "
            + "; ".join(anyway)
            + ".",
        ]
    names = [TONE_RECORD]
    if (RESULTS / f"{TONE_QUALITY[0]}.json").exists():
        toned = load(TONE_QUALITY[0])["results"]["collections"]["blue_slate"]["methods"]
        plain = load(TONE_QUALITY[1])["results"]["collections"]["blue_slate"]["methods"]
        lines += [
            "",
            "blue_slate with every row of *Segmentation quality* (mean of the parts, the body "
            "in brackets):",
            "",
            "| method | `tone: none` | `tone: auto` |",
            "|---|---|---|",
        ]
        for method, table in toned.items():
            label = QUALITY_LABELS.get(method, method.replace(" (1 template)", ""))
            if method.startswith(JUDGED_ROW):
                label = "palindrome LoRA, 3 templates (one trains, two judge)"
            cells = [
                "-" if t is None else f"{t['mean']:.3f} ({_iou(t.get('body'))})"
                for t in (plain.get(method), table)
            ]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
        names += list(TONE_QUALITY)
    return "\n".join(lines) + "\n\n" + source(*names)


BLOCKS = {
    "tone": tone,
    "holdout-template": holdout_template,
    "selection-rules": selection_rules,
    "anchor-term": anchor_term,
    "stay-term": stay_term,
    "cycle-reward": cycle_reward,
    "review-templates": review_templates,
    "quality": quality,
    "quality-card": quality_card,
    "quality-card-v11": lambda: quality_card(QUALITY_RECORDS_V11),
    "quality-card-v10": lambda: quality_card(QUALITY_RECORDS_V10),
    "quality-card-v9": lambda: quality_card(QUALITY_RECORDS_V9),
    "quality-card-v8": lambda: quality_card(QUALITY_RECORDS_V8),
    "quality-card-v7": lambda: quality_card(QUALITY_RECORDS_V7),
    "quality-card-v6": lambda: quality_card(QUALITY_RECORDS_V6),
    "quality-card-v5": lambda: quality_card(QUALITY_RECORDS_V5),
    "quality-card-v4": lambda: quality_card(QUALITY_RECORDS_V4),
    "quality-card-v3": lambda: quality_card(QUALITY_RECORDS_V3),
    "quality-card-v2": lambda: quality_card(QUALITY_RECORDS_V2),
    "quality-card-v1": lambda: quality_card(QUALITY_RECORDS_V1),
    "quality-card-v3-tried": lambda: quality_card(QUALITY_RECORDS_V3_TRIED),
    "quality-card-v3-cpu-tried": lambda: quality_card(QUALITY_RECORDS_V3_CPU_TRIED),
    "palindrome": palindrome,
    "palindrome-v1": lambda: palindrome(PALINDROME_RECORD_V1),
    "rotation": rotation,
    "orientation": orientation,
    "zoom": zoom,
    "zoom-v2": lambda: zoom(ZOOM_RECORD_V2),
    "quality-size": quality_size,
    "quality-size-v12": lambda: quality_size(QUALITY_SIZE_RECORDS_V12),
    "palindrome-zoom": palindrome_zoom,
    "judge-memory": judge_memory,
    "cycle-memory": cycle_memory,
    "cycle-memory-1000": lambda: cycle_memory(
        CYCLE_MEMORY_RECORDS_1000,
        CYCLE_MEMORY_QUALITY_1000,
        OTHER_PHOTOS,
    ),
    "four-templates": four_templates,
    "four-templates-1000": lambda: four_templates(FOUR_TEMPLATE_RECORDS_1000, OTHER_PHOTOS),
    "readout": readout,
    "quality-rule": quality_rule,
    "mask-grid": mask_grid,
    "qc-rank": qc_rank,
    "qc-rank-other-photos": lambda: qc_rank("qc-rank-other-photos"),
    "qc-rank-v3": lambda: qc_rank("qc-rank-sam2pal-micro-v3"),
    "qc-rank-v5": lambda: qc_rank("qc-rank-sam2pal-micro-v5"),
    "qc-rank-v6": lambda: qc_rank("qc-rank-sam2pal-micro-v6"),
    "qc-rank-v7": lambda: qc_rank("qc-rank-sam2pal-micro-v7"),
    "qc-rank-v8": lambda: qc_rank("qc-rank-sam2pal-micro-v8"),
    "qc-rank-v9": lambda: qc_rank("qc-rank-sam2pal-micro-v9"),
    "qc-rank-v10": lambda: qc_rank("qc-rank-sam2pal-micro-v10"),
    "qc-rank-v11": lambda: qc_rank("qc-rank-sam2pal-micro-v11"),
    "qc-rank-v12": lambda: qc_rank("qc-rank-sam2pal-micro-v12"),
    "qc-rank-80": qc_rank_per_photo,
    "train-fit": train_fit,
    "propagate": propagate,
    "finetune": finetune,
    "finetune-step": finetune_step,
    "video": video,
    "merge-measure": merge_measure,
    "collection": collection,
    "collection-random": lambda: collection("collection-cpu-random"),
    "measure-speed": measure_speed,
}


def render(text: str) -> str:
    def replace(match):
        name = match.group("name")
        if name not in BLOCKS:
            raise SystemExit(
                f"README.md: unknown figures block {name!r} (known: {', '.join(BLOCKS)})"
            )
        body = BLOCKS[name]()
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--check", action="store_true", help="exit 1 if a document differs from the records"
    )
    args = ap.parse_args(argv)
    status = 0
    for path, root_link in DOCUMENTS.items():
        _ROOT_LINK[0] = root_link
        name = path.relative_to(ROOT)
        text = path.read_text()
        new = render(text)
        if args.check:
            if new != text:
                sys.stdout.writelines(
                    difflib.unified_diff(
                        text.splitlines(True),
                        new.splitlines(True),
                        str(name),
                        f"{name} (from benchmarks/results)",
                    )
                )
                print(
                    f"{name}: figures differ from benchmarks/results: run benchmarks/readme_figures.py"
                )
                status = 1
            else:
                print(
                    f"{name}: {len(BLOCK.findall(text))} figure blocks agree with benchmarks/results"
                )
        elif new != text:
            path.write_text(new)
            print(f"{name}: figures rewritten")
    return status


if __name__ == "__main__":
    sys.exit(main())
