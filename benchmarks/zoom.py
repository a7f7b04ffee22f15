"""The zoom-in pass on high-resolution specimens with small structures (known truth).

Synthetic specimens rendered at `--size` (3000 x 2250 by default: the issue's 2,000 to
4,000 px), drawn from shapes that training never saw: held-out procedural insects
(`sam2pal.synth.quality.held_out_procedural`: compound eyes, scapes, antennae and legs)
and held-out NEON beetles (`held_out_masks`), heads up, on paper, the specimen 0.3 to
0.5 of the photo's shorter side (`--scale`). Each kind of shape is one collection: its
first image (another individual of the same generator) is the template, the next
`--targets` images (8) the targets. The eyes, scapes, antennae and legs are then about
ten to a few tens of pixels wide (the tables give the true masks' mean width).

Each target is segmented with `zoom: off` (the single whole-photo pass), `auto` (the
structures under `--zoom_below` of the photo zoomed), `on` (every structure zoomed) and
`best` (every structure zoomed, the mask with the higher cycle IoU kept). Per structure
and mode:

* IoU with the true mask;
* the relative error of the area, |predicted - true| / true;
* the relative error of the curve length (`sam2pal.outputs.measure.curve_length`: the
  midline of a thin part, the long axis of a compact one), summed over the pieces of
  the mask (two antennae, six legs) of at least `MIN_PIECE` of its area, so specks do
  not count; an empty prediction has length 0 (error 1);
* the share of targets the zoom pass produced the mask for (and placed its window from
  the template where the first pass found nothing);

and the cost per target: reading the photo as the engine does (`read_target`: reduced
without zoom, full with it) plus `predict`, after one untimed warm-up; the template
memory (`setup_seconds`) apart. Checks the issue's goals: each zoomed structure gains
at least 10 IoU points, antenna and leg curve lengths within 5 % of the truth, and at
most 2.5 x the per-target time of the single pass.

    .venv/bin/python -u benchmarks/zoom.py --checkpoint sam2pal-micro --threads 1   # ~6 min

Writes benchmarks/results/zoom-<checkpoint>.json (`--record NAME`: NAME.json; the
environment variable SAM2PAL_BENCHMARK_RESULTS: another folder); the collections go
to benchmarks/out/zoom/. A quick look: `--targets 1 --size 2000 1500 --shapes procedural`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from poses import benchmark_model  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.inference.engine import Propagator  # noqa: E402
from sam2pal.io.coco import category_masks, load_coco  # noqa: E402
from sam2pal.io.masks import mask_iou  # noqa: E402
from sam2pal.io.templates import load_coco_templates  # noqa: E402
from sam2pal.outputs.measure import curve_length  # noqa: E402
from sam2pal.settings import ZOOMS  # noqa: E402
from sam2pal.synth.quality import (  # noqa: E402
    STRUCTURES,
    _with_body,
    held_out_masks,
    held_out_procedural,
)
from sam2pal.synth.specimens import make_collection  # noqa: E402

SHAPES = ("procedural", "neon")
#: heads up (within 10 degrees), one palette on paper, no clutter: only the specimen's
#: scale (`--scale`: its share of the photo's shorter side) and shape differ between
#: template and targets
STYLE = {
    "palettes": ("dark_brown",),
    "backgrounds": ("paper",),
    "heading": True,
    "rotation_range": (80.0, 100.0),
    "flip_prob": 0.0,
    "scale_range": (0.3, 0.5),
    "clutter_prob": 0.0,
}
#: a piece of a mask under this share of its area is left out of its curve length
MIN_PIECE = 0.02
MEASURES = {
    "iou": "IoU",
    "area_error": "relative error of the area",
    "length_error": "relative error of the curve length",
}
#: the issue's goals
GAIN_GOAL = 0.10  # IoU points gained by each zoomed structure
LENGTH_GOAL = 0.05  # relative error of antenna and leg curve lengths
LENGTH_GOAL_PARTS = ("antenna", "legs")
COST_GOAL = 2.5  # per-target time over the single pass's


# -- collections and truth -----------------------------------------------------------


def render(folder: Path, kind: str, n_targets: int, size, seed: int, scale) -> dict:
    """One collection of `kind` shapes (template first): its templates, and per target
    (path, {structure: true mask})."""
    n_images = n_targets + 1
    style = {**STYLE, "scale_range": tuple(scale)}
    if kind == "procedural":
        shapes = held_out_procedural(seed, n_images)
        make_collection(folder, n_images, 1, seed, size=tuple(size), shapes=shapes, style=style)
    else:
        names = held_out_masks()[:n_images]
        make_collection(folder, n_images, 1, seed, size=tuple(size), mask_names=names, style=style)
    gt_path = folder / "ground_truth.json"
    _, truth = category_masks(load_coco(gt_path), gt_path)
    files = sorted(truth)[1:]
    shape = (int(size[1]), int(size[0]))
    return {
        "templates": load_coco_templates(folder / "templates.json", folder / "images"),
        "targets": [(folder / "images" / name, _with_body(truth[name], shape)) for name in files],
    }


def pieces_length(mask: np.ndarray) -> float:
    """The curve length of a mask summed over its 8-connected pieces of at least
    `MIN_PIECE` of its area; 0 when empty."""
    import cv2

    area = int(np.count_nonzero(mask))
    if not area:
        return 0.0
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    total = 0.0
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] >= MIN_PIECE * area:
            x, y, w, h = stats[i, :4]
            total += curve_length(labels[y : y + h, x : x + w] == i)
    return float(total)


def relative_error(predicted: float, true: float) -> float | None:
    return abs(predicted - true) / true if true > 0 else None


# -- running and scoring -------------------------------------------------------------


def run_mode(model, collection: dict, mode: str, args) -> dict:
    """Segment a collection's targets in one zoom mode: per target its scores and the
    seconds it took."""
    start = time.perf_counter()
    engine = Propagator(
        model,
        collection["templates"],
        zoom=mode,
        zoom_below=args.zoom_below,
        zoom_margin=args.zoom_margin,
    )
    setup = time.perf_counter() - start
    names = engine.categories
    rows, seconds = [], []
    for path, truth in collection["targets"]:
        start = time.perf_counter()
        image, size = engine.read_target(path)
        predictions = engine.predict(image, size=size)
        seconds.append(time.perf_counter() - start)
        masks = {names[p.category_id]: p.mask for p in predictions if p.instance == 1}
        pred = _with_body(masks, truth["body"].shape)
        flags = {
            names[p.category_id]: (bool(p.zoomed), bool(p.zoom_placed))
            for p in predictions
            if p.instance == 1
        }
        row = {"image": path.name, "structures": {}}
        for s in STRUCTURES:
            gt = truth.get(s)
            if gt is None or not gt.any() or s not in pred:
                continue
            true_area = float(np.count_nonzero(gt))
            area = float(np.count_nonzero(pred[s]))
            true_length, length = pieces_length(gt), pieces_length(pred[s])
            zoomed, placed = flags.get(s, (False, False))
            row["structures"][s] = {
                "iou": round(float(mask_iou(pred[s], gt)), 4),
                "area_px": area,
                "true_area_px": true_area,
                "area_error": round(relative_error(area, true_area), 4),
                "length_px": round(length, 1),
                "true_length_px": round(true_length, 1),
                "length_error": _round(relative_error(length, true_length)),
                "zoomed": zoomed,
                "zoom_placed": placed,
            }
        row["seconds"] = round(seconds[-1], 3)
        rows.append(row)
    return {"setup_seconds": setup, "seconds": seconds, "rows": rows}


def _round(value, digits: int = 4):
    return None if value is None else round(float(value), digits)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def summarise(rows: list[dict], seconds: list[float], setup: float) -> dict:
    """Per measure {structure: mean over targets}, the zoomed shares and the cost."""
    structures = [s for s in STRUCTURES if any(s in r["structures"] for r in rows)]

    def per(key):
        return {
            s: _mean(r["structures"][s][key] for r in rows if s in r["structures"])
            for s in structures
        }

    out = {measure: per(measure) for measure in MEASURES}
    parts = [v for s, v in out["iou"].items() if s != "body" and v is not None]
    out["iou"]["mean"] = _round(np.mean(parts)) if parts else None
    out["true_width_px"] = {  # the mean width of the true masks: area over curve length
        s: _mean(
            r["structures"][s]["true_area_px"] / r["structures"][s]["true_length_px"]
            for r in rows
            if s in r["structures"] and r["structures"][s]["true_length_px"] > 0
        )
        for s in structures
    }
    out["zoomed"] = per("zoomed")
    out["zoom_placed"] = per("zoom_placed")
    out["seconds_per_target"] = round(float(np.mean(seconds)), 3)
    out["setup_seconds"] = round(setup, 3)
    return out


def goals(modes: dict) -> dict:
    """The issue's goals for each zoom mode against `off`: {"met": {goal: {"value",
    "met"}}, "lines": the printed summary}."""
    met, lines = {}, ["\nGoals:"]
    off = modes["off"]

    def check(goal: str, value: float, ok: bool, shown: str) -> None:
        met[goal] = {"value": round(float(value), 4), "met": bool(ok)}
        lines.append(f"  {'met ' if ok else 'MISSED'} {goal} ({shown})")

    for mode in ZOOMS[1:]:
        if mode not in modes:
            continue
        entry = modes[mode]
        for s, share in entry["zoomed"].items():
            if not share or s == "body":
                continue
            if entry["iou"].get(s) is None or off["iou"].get(s) is None:
                continue
            gain = entry["iou"][s] - off["iou"][s]
            goal = f"{mode}: {s} gains >= {100 * GAIN_GOAL:.0f} IoU points"
            check(goal, gain, gain >= GAIN_GOAL, f"{100 * gain:+.1f}")
        for s in LENGTH_GOAL_PARTS:
            error = entry["length_error"].get(s)
            if error is not None:
                goal = f"{mode}: {s} curve length within {100 * LENGTH_GOAL:.0f} %"
                check(goal, error, error <= LENGTH_GOAL, f"{100 * error:.1f} %")
        ratio = entry["seconds_per_target"] / off["seconds_per_target"]
        goal = f"{mode}: <= {COST_GOAL} x the single pass's time per target"
        check(goal, ratio, ratio <= COST_GOAL, f"{ratio:.2f} x")
    return {"met": met, "lines": lines}


# -- printing ------------------------------------------------------------------------


def fmt(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f} %" if percent else f"{value:.3f}"


def fmt_width(value) -> str:
    return "-" if value is None or value != value else f"{value:.0f}"


def print_tables(title: str, modes: dict) -> None:
    structures = list(next(iter(modes.values()))["iou"])
    structures = [s for s in structures if s != "mean"]
    for measure, label in MEASURES.items():
        percent = measure != "iou"
        extra = " mean of parts |" if measure == "iou" else ""
        print(f"\n{title}: {label} per structure\n")
        print("| zoom | " + " | ".join(structures) + " |" + extra)
        print("|---" * (len(structures) + 1 + bool(extra)) + "|")
        for mode, entry in modes.items():
            cells = " | ".join(fmt(entry[measure].get(s), percent) for s in structures)
            tail = f" {fmt(entry['iou']['mean'])} |" if extra else ""
            print(f"| {mode} | {cells} |{tail}")
    print(f"\n{title}: share of targets zoomed (placed from the template), and cost\n")
    print("| zoom | " + " | ".join(structures) + " | s / target | x off | setup s |")
    print("|---" * (len(structures) + 4) + "|")
    base = modes["off"]["seconds_per_target"] if "off" in modes else None
    widths = next(iter(modes.values()))["true_width_px"]
    cells = " | ".join(fmt_width(widths.get(s)) for s in structures)
    print(f"| true width (px) | {cells} | - | - | - |")
    for mode, entry in modes.items():
        cells = " | ".join(
            "-"
            if entry["zoomed"].get(s) is None
            else f"{entry['zoomed'][s]:.2f} ({entry['zoom_placed'][s]:.2f})"
            for s in structures
        )
        ratio = f"{entry['seconds_per_target'] / base:.2f}" if base else "-"
        print(
            f"| {mode} | {cells} | {entry['seconds_per_target']:.2f} | {ratio} "
            f"| {entry['setup_seconds']:.2f} |"
        )


def collection_arguments(ap: argparse.ArgumentParser) -> None:
    """The model's and the collections' arguments (`render`), shared with tiles.py."""
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    ap.add_argument("--config", default=None)
    ap.add_argument("--targets", type=int, default=8, help="targets per kind of shape")
    ap.add_argument("--size", type=int, nargs=2, default=[3000, 2250], metavar=("WIDTH", "HEIGHT"))
    ap.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=list(STYLE["scale_range"]),
        metavar=("LOW", "HIGH"),
        help="the specimen's share of the photo's shorter side",
    )
    ap.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    ap.add_argument("--zoom_margin", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "zoom"))
    ap.add_argument("--record", default=None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    collection_arguments(ap)
    ap.add_argument("--modes", nargs="+", choices=ZOOMS, default=list(ZOOMS))
    ap.add_argument("--zoom_below", type=float, default=0.1)
    args = ap.parse_args(argv)
    if args.targets < 1:
        ap.error("--targets must be at least 1")
    if min(args.size) < 1:
        ap.error("--size must be positive")
    if "off" not in args.modes:
        args.modes = ["off", *args.modes]  # the baseline of the gains and the cost
    args.modes = [m for m in ZOOMS if m in args.modes]
    recorder = Recorder(args.record or f"zoom-{Path(args.checkpoint).stem}", args, args.device)
    t_start = time.time()
    model, info = benchmark_model(args)
    print(
        f"model {args.checkpoint}, input {info.get('image_size')} px; "
        f"{args.targets} targets per shape kind at {args.size[0]} x {args.size[1]} px"
    )
    results = {
        "model": info,
        "size": list(args.size),
        "scale": list(args.scale),
        "targets": args.targets,
        "zoom_below": args.zoom_below,
        "zoom_margin": args.zoom_margin,
        "min_piece": MIN_PIECE,
        "shapes": {},
    }
    collected = {mode: ([], []) for mode in args.modes}  # rows and seconds of all kinds
    warm = False
    for kind in args.shapes:
        t0 = time.time()
        collection = render(
            Path(args.out) / kind, kind, args.targets, args.size, args.seed, args.scale
        )
        render_seconds = time.time() - t0
        if not warm:  # one untimed prediction: the first call's overhead
            engine = Propagator(model, collection["templates"])
            engine.predict(*_read(engine, collection["targets"][0][0]))
            warm = True
        modes = {}
        for mode in args.modes:
            run = run_mode(model, collection, mode, args)
            modes[mode] = summarise(run["rows"], run["seconds"], run["setup_seconds"])
            modes[mode]["targets"] = run["rows"]
            collected[mode][0].extend(run["rows"])
            collected[mode][1].extend(run["seconds"])
        results["shapes"][kind] = {"render_seconds": round(render_seconds, 1), "modes": modes}
        print_tables(f"{kind} ({args.targets} targets)", modes)
    # every target of every kind together: the record's headline
    results["modes"] = {
        mode: summarise(
            rows,
            seconds,
            np.mean([results["shapes"][k]["modes"][mode]["setup_seconds"] for k in args.shapes]),
        )
        for mode, (rows, seconds) in collected.items()
    }
    if len(args.shapes) > 1:
        print_tables(f"all ({len(args.shapes) * args.targets} targets)", results["modes"])
    results["goals"] = goals(results["modes"])
    for line in results["goals"]["lines"]:
        print(line)
    results["seconds"] = round(time.time() - t_start, 1)
    print(f"\n{results['seconds']:.0f} s")
    recorder.write(results)
    return 0


def _read(engine: Propagator, path: Path):
    image, size = engine.read_target(path)
    return image, None, size


if __name__ == "__main__":
    sys.exit(main())
