"""Orientation search, mirror pairs and aspect-true framing on turned, mirrored and
differently framed specimens (known truth).

One template (a held-out NEON beetle, head up but tilted by `--tilt` degrees, so that a
mirror image is not the same picture turned), then `--targets` other held-out beetles
rendered in the template's pose and look (a training palette on paper: only the pose
and the framing differ). Three experiments:

* orientation: every target shown in the eight orientations (`np.rot90` of the photo
  and its masks, after `np.fliplr` for the mirrored ones: the true orientation is
  known). The fraction of correctly chosen orientations with `orientation: rot4` (the
  unmirrored targets) and `rot4_mirror` (all), IoU per structure against the same
  targets upright with `orientation: none`, and the cost (seconds per target) of each
  mode, `none` on the turned targets included (what the search repairs).
* mirror pairs: the template's elytra, antennae and legs split by side of the body
  axis (the elytra along the suture), as `left_elytra`/`right_elytra`,
  `left_antenna`/`right_antenna`, `left_legs`/`right_legs` ("names", paired by name),
  or as instances 1 (left) and 2 (right) of `elytra`, `antenna` and `legs`
  ("instances", paired by side). A mirrored target is taken to show the specimen's
  other side (as a mirrored lateral view does), so its true names swap: with
  `orientation: rot4_mirror`, the fraction of paired structures named correctly (the
  predicted mask overlaps its own truth more than its partner's) with `mirror_swap`
  on (all eight orientations) and off (the mirrored ones), overall and on the images
  whose orientation was found.
* framing: templates of 4:3 and 3:4 photos, targets rendered as 4:3, 1:1 and 3:4
  photos (the beetle the same share of the shorter side): IoU per structure and target
  aspect with `framing: stretch` and `letterbox`, and their cost.

    .venv/bin/python -u benchmarks/orientation.py --checkpoint sam2pal-micro

Writes benchmarks/results/orientation-<checkpoint>.json (`--record NAME`: NAME.json;
the environment variable SAM2PAL_BENCHMARK_RESULTS: another folder). A quick look:
`--targets 1 --pair_variants names --template_aspects 4:3`.
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

from poses import benchmark_model, heading_style, pose_template  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.inference.engine import Propagator  # noqa: E402
from sam2pal.inference.orientation import (  # noqa: E402
    Candidate,
    candidates,
    transform_image,
    transform_masks,
)
from sam2pal.io.coco import category_masks, load_coco  # noqa: E402
from sam2pal.io.images import read_image  # noqa: E402
from sam2pal.io.masks import mask_iou  # noqa: E402
from sam2pal.io.templates import (  # noqa: E402
    TemplateImage,
    TemplateInstance,
    TemplateSet,
)
from sam2pal.synth.quality import STRUCTURES, _with_body, held_out_masks  # noqa: E402
from sam2pal.synth.specimens import make_collection  # noqa: E402

SHOWN = STRUCTURES[:6]  # body, head, pronotum, elytra, antenna, legs
ASPECTS = {"4:3": (480, 360), "1:1": (360, 360), "3:4": (360, 480)}  # (width, height)
EXPERIMENTS = ("orientation", "pairs", "framing")
SIDED = ("elytra", "antenna", "legs")  # split by side of the body axis


def pose_label(c: Candidate) -> str:
    return f"{c.rotation}" + (" mirrored" if c.mirrored else "")


# -- targets and truth ---------------------------------------------------------------


def render(folder: Path, n: int, n_templates: int, seed: int, names, size, tilt: float):
    """A collection in the template's pose: [(file name, RGB, {structure: mask})]."""
    make_collection(
        folder,
        n_images=n,
        n_templates=n_templates,
        seed=seed,
        size=size,
        mask_names=names,
        style=heading_style(90.0 + tilt),
    )
    gt_path = folder / "ground_truth.json"
    _, truth = category_masks(load_coco(gt_path), gt_path)
    out = []
    for file_name in sorted(truth):
        image = read_image(folder / "images" / file_name)
        out.append((file_name, image, _with_body(truth[file_name], image.shape[:2])))
    return out


def turned(image: np.ndarray, truth: dict, c: Candidate):
    """The photo and its truth as the candidate orientation shows them."""
    names = list(truth)
    masks = transform_masks(np.stack([truth[s] for s in names]), c) if names else []
    return transform_image(image, c), {s: m for s, m in zip(names, masks)}


def split_by_side(truth: dict) -> dict | None:
    """{"left_elytra", "right_elytra", "left_antenna", ...: mask}: the pixels of SIDED on
    the viewer's left and right of the body axis (body centroid towards the head's, the
    head up), or None when the photo shows no head or no body."""
    body, head = truth.get("body"), truth.get("head")
    if body is None or head is None or not body.any() or not head.any():
        return None
    ys, xs = np.nonzero(body)
    centre = np.array([xs.mean(), ys.mean()])
    hy, hx = np.nonzero(head)
    axis = np.array([hx.mean(), hy.mean()]) - centre
    if not np.hypot(*axis):
        return None
    rows, cols = np.indices(body.shape)
    # cross product of the axis with (pixel - centre): negative on the viewer's left
    # when the head points up (y grows downwards)
    left = axis[0] * (rows - centre[1]) - axis[1] * (cols - centre[0]) < 0
    out = {}
    for part in SIDED:
        mask = truth.get(part, np.zeros(body.shape, bool))
        out[f"left_{part}"] = mask & left
        out[f"right_{part}"] = mask & ~left
    return out


def paired_truth(sides: dict, variant: str) -> dict:
    """{(category name, instance): mask} of the sided structures in one naming variant."""
    if variant == "names":
        return {(name, 1): mask for name, mask in sides.items()}
    return {
        (part, 1 if side == "left" else 2): sides[f"{side}_{part}"]
        for part in SIDED
        for side in ("left", "right")
    }


def pair_partners(variant: str) -> dict:
    """{key: the other side's key} of `paired_truth`'s keys."""
    if variant == "names":
        pairs = [((f"left_{part}", 1), (f"right_{part}", 1)) for part in SIDED]
    else:
        pairs = [((part, 1), (part, 2)) for part in SIDED]
    return {a: b for pair in pairs for a, b in (pair, pair[::-1])}


def sided_templates(templates: TemplateSet, variant: str) -> TemplateSet:
    """The template with its elytra, antennae and legs split by side (`split_by_side`)."""
    image = templates.images[0]
    masks = {templates.categories[i.category_id]: i.mask for i in image.instances}
    masks = _with_body(masks, (image.height, image.width))
    sides = split_by_side(masks)
    if sides is None:
        raise SystemExit("the template shows no head: it cannot be split by side")
    structures = {(name, 1): masks[name] for name in ("head", "pronotum") if name in masks}
    structures.update(paired_truth(sides, variant))
    structures = {k: m for k, m in structures.items() if m.any()}
    ids = {name: i + 1 for i, name in enumerate(dict.fromkeys(n for n, _ in structures))}
    instances = [
        TemplateInstance(annotation_id=n + 1, category_id=ids[name], instance=inst, mask=mask)
        for n, ((name, inst), mask) in enumerate(structures.items())
    ]
    one = TemplateImage(
        image.file_name, image.path, image.width, image.height, image.image_id, instances
    )
    return TemplateSet({i: name for name, i in ids.items()}, [one])


# -- running and scoring -------------------------------------------------------------


def predict_all(engine: Propagator, images: list[np.ndarray]):
    """Predictions per image and the seconds per image (after one untimed warm-up)."""
    engine.predict(images[0])
    start = time.perf_counter()
    preds = [engine.predict(image) for image in images]
    return preds, (time.perf_counter() - start) / len(images)


def named(engine: Propagator, predictions) -> dict:
    """{(category name, instance): mask} of one image's predictions."""
    return {(engine.categories[p.category_id], p.instance): p.mask for p in predictions}


def iou_table(pairs) -> tuple[dict, dict]:
    """Mean IoU per structure of SHOWN (and "mean", of the parts) over (pred, truth)
    pairs of {structure: mask}; also the IoU lists."""
    ious: dict[str, list[float]] = {}
    for pred, gt in pairs:
        for s in SHOWN:
            if s in gt and gt[s].any() and s in pred:
                ious.setdefault(s, []).append(float(mask_iou(pred[s], gt[s])))
    table = {s: round(float(np.mean(v)), 3) for s, v in ious.items()}
    parts = [np.mean(v) for s, v in ious.items() if s != "body"]
    table["mean"] = round(float(np.mean(parts)), 3) if parts else None
    return table, ious


def by_structure(engine, predictions, shape) -> dict:
    masks = {name: mask for (name, inst), mask in named(engine, predictions).items() if inst == 1}
    return _with_body(masks, shape)


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def row(label: str, table: dict, extra: str = "") -> str:
    cells = " | ".join(fmt(table.get(s)) for s in SHOWN)
    return f"| {label} | {cells} | {fmt(table['mean'])} |{extra}"


def header(first: str, extra: str = "") -> str:
    cols = len(SHOWN) + 2 + extra.count("|")
    return (
        f"| {first} | "
        + " | ".join(SHOWN)
        + " | mean of parts |"
        + extra
        + "\n"
        + ("|---" * cols + "|")
    )


def candidate_scores(predictions) -> list[float] | None:
    """The confidence of each candidate orientation (the engine's order), or None."""
    found = getattr(predictions, "orientation", None)
    return None if found is None else [round(c["score"], 4) for c in found["candidates"]]


def chosen(predictions) -> tuple[int, bool] | None:
    found = getattr(predictions, "orientation", None)
    return None if found is None else (int(found["rotation"]), bool(found["mirrored"]))


# -- the experiments -----------------------------------------------------------------


def orientation_experiment(model, templates, targets, args) -> dict:
    poses = candidates("rot4_mirror")
    shown = {c: [turned(image, truth, c) for _, image, truth in targets] for c in poses}
    upright = [(Candidate(0, False), image, truth) for _, image, truth in targets]
    runs = {
        "upright, none": ("none", upright),
        "turned and mirrored, none": ("none", poses),
        "turned, rot4": ("rot4", [c for c in poses if not c.mirrored]),
        "turned and mirrored, rot4_mirror": ("rot4_mirror", poses),
    }
    results = {"modes": {}}
    extra = " correct orientation | correct rotation | s / target |"
    print("\norientation search: IoU per structure, chosen orientations, cost")
    print(header("targets, orientation", extra))
    baseline = None
    for label, (mode, subset) in runs.items():
        engine = Propagator(model, templates, orientation=mode, framing=args.framing)
        if subset is upright:
            items = upright
        else:
            items = [(c, image, truth) for c in subset for image, truth in shown[c]]
        preds, seconds = predict_all(engine, [image for _, image, _ in items])
        table, _ = iou_table(
            (by_structure(engine, p, image.shape[:2]), truth)
            for p, (_, image, truth) in zip(preds, items)
        )
        entry = {"orientation": mode, "images": len(items), "seconds_per_target": seconds}
        entry["iou"] = table
        tail = " - | - |"
        if mode != "none":
            entry.update(orientation_scores([chosen(p) for p in preds], items, len(targets)))
            entry["candidate_scores"] = {
                key: candidate_scores(p) for key, p in zip(entry["chosen"], preds)
            }
            tail = f" {entry['correct_orientation']:.3f} | {entry['correct_rotation']:.3f} |"
        if baseline is None:
            baseline = table
        else:
            entry["iou_points_below_upright"] = {
                s: round(100 * (baseline[s] - table[s]), 1)
                for s in table
                if baseline.get(s) is not None and table[s] is not None
            }
        results["modes"][label] = entry
        print(row(label, table, f"{tail} {seconds:.3f} |"))
    return results


def orientation_scores(picks, items, n_targets: int) -> dict:
    """Fractions of exactly right orientations and of right rotations, per pose too, and
    every pick."""
    truths = [(c.rotation, c.mirrored) for c, _, _ in items]
    exact = [pick == truth for pick, truth in zip(picks, truths)]
    rotation = [pick is not None and pick[0] == truth[0] for pick, truth in zip(picks, truths)]
    poses = list(dict.fromkeys(c for c, _, _ in items))
    return {
        "correct_orientation": round(float(np.mean(exact)), 3),
        "correct_rotation": round(float(np.mean(rotation)), 3),
        "per_pose": {
            pose_label(c): round(
                float(np.mean([e for e, (cc, _, _) in zip(exact, items) if cc == c])), 3
            )
            for c in poses
        },
        "chosen": {
            f"target {i % n_targets}, {pose_label(c)}": None if pick is None else list(pick)
            for i, (pick, (c, _, _)) in enumerate(zip(picks, items))
        },
    }


def pairs_experiment(model, templates, targets, args) -> dict:
    poses = candidates("rot4_mirror")
    results = {}
    print("\nmirror pairs (rot4_mirror): paired structures named correctly")
    print(
        "| naming | mirror_swap | targets | named correctly | swapped | undecided "
        "| named correctly, orientation right | s / target |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant in args.pair_variants:
        sided = sided_templates(templates, variant)
        partners = pair_partners(variant)
        items = []
        for file_name, image, truth in targets:
            sides = split_by_side(truth)
            if sides is None:
                continue
            keyed = paired_truth(sides, variant)
            for c in poses:
                photo, gt = turned(image, keyed, c)
                if c.mirrored:  # the other side of the specimen: the names swap
                    gt = {partners[k]: m for k, m in gt.items()}
                items.append((file_name, c, photo, gt))
        results[variant] = {}
        for swap in (True, False):
            subset = [it for it in items if swap or it[1].mirrored]
            engine = Propagator(
                model, sided, orientation="rot4_mirror", mirror_swap=swap, framing=args.framing
            )
            preds, seconds = predict_all(engine, [photo for _, _, photo, _ in subset])
            outcomes = {"mirrored": [], "unmirrored": []}  # (orientation right, outcome)
            for p, (_, c, _, gt) in zip(preds, subset):
                right = chosen(p) == (c.rotation, c.mirrored)
                found = naming(named(engine, p), gt, partners)
                outcomes["mirrored" if c.mirrored else "unmirrored"] += [(right, o) for o in found]
            entry = {"images": len(subset), "seconds_per_target": seconds}
            for kind, found in outcomes.items():
                if not found:
                    continue
                entry[kind] = summary = naming_summary(found)
                print(
                    f"| {variant} | {'on' if swap else 'off'} | {kind} "
                    f"| {summary['named_correctly']:.3f} | {summary['swapped']:.3f} "
                    f"| {summary['undecided']:.3f} "
                    f"| {fmt(summary['named_correctly_when_orientation_right'])} "
                    f"| {seconds:.3f} |"
                )
            results[variant]["swap on" if swap else "swap off"] = entry
    return results


def naming(pred: dict, gt: dict, partners: dict) -> list[str]:
    """Per paired structure the truth shows: "right" when its predicted mask overlaps
    its own truth more than its partner's, "swapped" when less, "undecided" on a tie."""
    out = []
    for key, partner in partners.items():
        if key not in pred or key not in gt or not gt[key].any():
            continue
        own = mask_iou(pred[key], gt[key])
        other = mask_iou(pred[key], gt[partner]) if gt[partner].any() else 0.0
        out.append("right" if own > other else "swapped" if other > own else "undecided")
    return out


def naming_summary(found: list[tuple[bool, str]]) -> dict:
    """Fractions of the outcomes, also among the images whose orientation was right."""
    outcomes = [o for _, o in found]
    when_right = [o for right, o in found if right]
    return {
        "structures": len(found),
        "named_correctly": round(outcomes.count("right") / len(found), 3),
        "swapped": round(outcomes.count("swapped") / len(found), 3),
        "undecided": round(outcomes.count("undecided") / len(found), 3),
        "orientation_right": round(float(np.mean([right for right, _ in found])), 3),
        "named_correctly_when_orientation_right": round(
            when_right.count("right") / len(when_right), 3
        )
        if when_right
        else None,
    }


def framing_experiment(model, names, args) -> dict:
    out = Path(args.out)
    targets = {
        aspect: render(
            out / f"aspect_{aspect.replace(':', 'x')}",
            args.targets,
            0,
            8,
            names[1 : 1 + args.targets],
            size,
            args.tilt,
        )
        for aspect, size in ASPECTS.items()
    }
    results = {}
    print("\nframing: IoU per structure by target aspect")
    print(header("template, framing, targets", " s / target |"))
    for template_aspect in args.template_aspects:
        folder = out / f"template_{template_aspect.replace(':', 'x')}"
        templates = pose_template(folder, names[0], 90.0 + args.tilt, ASPECTS[template_aspect])
        results[f"template {template_aspect}"] = per_template = {}
        for framing in ("stretch", "letterbox"):
            engine = Propagator(model, templates, framing=framing, framing_fill=args.framing_fill)
            entry = per_template[framing] = {"targets": {}}
            everything = []
            total_seconds = 0.0
            for aspect, items in targets.items():
                preds, seconds = predict_all(engine, [image for _, image, _ in items])
                pairs = [
                    (by_structure(engine, p, image.shape[:2]), truth)
                    for p, (_, image, truth) in zip(preds, items)
                ]
                everything += pairs
                table, _ = iou_table(pairs)
                entry["targets"][aspect] = {"iou": table, "seconds_per_target": seconds}
                total_seconds += seconds
                print(row(f"{template_aspect}, {framing}, {aspect}", table, f" {seconds:.3f} |"))
            entry["all"], _ = iou_table(everything)
            entry["seconds_per_target"] = total_seconds / len(targets)
            print(
                row(
                    f"{template_aspect}, {framing}, all",
                    entry["all"],
                    f" {entry['seconds_per_target']:.3f} |",
                )
            )
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    ap.add_argument("--config", default=None)
    ap.add_argument("--targets", type=int, default=8, help="held-out beetles per experiment")
    ap.add_argument(
        "--tilt", type=float, default=20.0, help="degrees the template and targets lean off head-up"
    )
    ap.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    ap.add_argument(
        "--pair_variants", nargs="+", choices=("names", "instances"), default=["names", "instances"]
    )
    ap.add_argument("--template_aspects", nargs="+", choices=tuple(ASPECTS), default=["4:3", "3:4"])
    ap.add_argument(
        "--framing",
        default="stretch",
        choices=("stretch", "letterbox"),
        help="framing of the orientation and pair experiments",
    )
    ap.add_argument("--framing_fill", default="border")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "orientation"))
    ap.add_argument("--record", default=None)
    args = ap.parse_args(argv)
    if args.targets < 1:
        ap.error("--targets must be at least 1")
    recorder = Recorder(
        args.record or f"orientation-{Path(args.checkpoint).stem}", args, args.device
    )
    out = Path(args.out)
    model, info = benchmark_model(args)
    names = held_out_masks()
    templates = pose_template(out / "template", names[0], 90.0 + args.tilt)
    results = {"model": info, "targets": args.targets, "tilt": args.tilt}
    if {"orientation", "pairs"} & set(args.experiments):
        targets = render(
            out / "targets", args.targets, 0, 8, names[1 : 1 + args.targets], (480, 360), args.tilt
        )
        if "orientation" in args.experiments:
            results["orientation"] = orientation_experiment(model, templates, targets, args)
        if "pairs" in args.experiments:
            results["pairs"] = pairs_experiment(model, templates, targets, args)
    if "framing" in args.experiments:
        results["framing"] = framing_experiment(model, names, args)
    recorder.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
