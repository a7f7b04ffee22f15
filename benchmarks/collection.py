"""A collection of real-sized photos, step by step and end to end, against the official
predictor.

Synthetic beetle specimens at 12 megapixels (4000 x 3000 JPEG; `--big` adds a few at 24
MP, 6000 x 4000), one template, 6 structures (head, pronotum, elytra, antenna, legs and
the whole specimen). Four parts, one run:

  steps     per photo, in one process: read (full decode vs. reduced), preprocess,
            model, masks (box vs. full-size resize), RLE (box vs. full), QC, measure,
            merge; and the pixels where the fast path's masks differ from the exact
            path's (`propagate.exact`), which reproduces the official predictor
  model     the model alone on photos already in memory (`--batch-size` per call):
            the ceiling of end-to-end throughput
  segment   `sam2pal segment` end to end (segmentation, merge, QC table, measurement
            tables), QC on and off, on N photos and on 1: the time per added photo
  official  SAM2's video predictor on the video [template, photo], photo by photo,
            masks at the photo's size (what our users ran before)

The model is sam2pal-micro by default, whose masks on these specimens are real ones (the
time of resizing, encoding and measuring masks depends on their shape); `--checkpoint
random` takes random weights for any config. Prints the ratios (official / ours, per
photo) and peak RSS of each process; writes benchmarks/results/collection-<device>.json
(collection-<device>-random.json with random weights) with `--record`.

    .venv/bin/python -u benchmarks/collection.py --record            # 2 CPU cores, sam2pal-micro
    .venv/bin/python -u benchmarks/collection.py --checkpoint random --config sam2.1_hiera_t \\
        --image-size 256 --record                                   # hiera-t at 256 px
    .venv/bin/python -u benchmarks/collection.py --device cuda --checkpoint random \\
        --config sam2.1_hiera_l --image-size 1024 --structures 3 --photos 64 --record   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import Recorder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- data -----------------------------------------------------------------------------


def make_data(photos: int, size: tuple[int, int], structures: int, seed: int) -> dict:
    """Synthetic specimens (cached under benchmarks/out/), the first one the template,
    with a 6th structure, the whole specimen, when asked for 6."""
    from pycocotools import mask as mask_utils

    from sam2pal.io.masks import decode_segmentation, encode_rle
    from sam2pal.synth.specimens import make_collection

    folder = OUT / f"collection-{size[0]}x{size[1]}-{photos}-s{seed}"
    info_file = folder / "info.json"
    if not info_file.exists():
        info = make_collection(
            folder / "data", n_images=photos + 1, n_templates=1, seed=seed, size=size
        )
        targets = folder / "targets"
        targets.mkdir(exist_ok=True)
        for path in info["images"][1:]:
            link = targets / Path(path).name
            if not link.exists():
                os.symlink(path, link)
        info_file.write_text(
            json.dumps(
                {
                    "images_dir": str(info["images_dir"]),
                    "templates": str(info["templates"]),
                    "targets": str(targets),
                }
            )
        )
    info = json.loads(info_file.read_text())
    coco = json.loads(Path(info["templates"]).read_text())
    annotations = coco["annotations"]
    if structures > len(annotations):
        image = coco["images"][0]
        union = np.zeros((image["height"], image["width"]), bool)
        for ann in annotations:
            union |= decode_segmentation(ann["segmentation"], image["height"], image["width"])
        coco["categories"].append({"id": 6, "name": "specimen"})
        annotations.append(
            {
                "id": max(a["id"] for a in annotations) + 1,
                "image_id": image["id"],
                "category_id": 6,
                "segmentation": encode_rle(union),
                "area": int(union.sum()),
                "bbox": [
                    float(v)
                    for v in mask_utils.toBbox(
                        mask_utils.encode(np.asfortranarray(union.astype(np.uint8)))
                    )
                ],
                "iscrowd": 0,
            }
        )
    else:
        keep = {a["category_id"] for a in annotations[:structures]}
        coco["annotations"] = [a for a in annotations if a["category_id"] in keep]
        coco["categories"] = [c for c in coco["categories"] if c["id"] in keep]
    templates = folder / f"templates-{structures}.json"
    templates.write_text(json.dumps(coco))
    return {
        "images_dir": info["images_dir"],
        "templates": str(templates),
        "targets": info["targets"],
        "photos": sorted(str(p) for p in Path(info["targets"]).iterdir()),
    }


# -- workers (each in its own process) ------------------------------------------------


def _model(args):
    from sam2pal.inference.pipeline import load_model

    model, _ = load_model(args.config, args.checkpoint, args.image_size, args.seed, args.device)
    return model


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker_steps(args, data) -> dict:
    """Per-photo time of each step, the fast path against the exact one."""
    import torch

    from sam2pal.inference.engine import Propagator, logits_to_masks, preprocess
    from sam2pal.inference.pipeline import categories_of
    from sam2pal.io.coco import merge_predictions
    from sam2pal.io.images import read_image
    from sam2pal.io.masks import decode_segmentation, encode_rle
    from sam2pal.io.records import StructureRecord
    from sam2pal.io.templates import load_coco_templates
    from sam2pal.outputs.measure import measure_mask

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _model(args)
    templates = load_coco_templates(data["templates"], data["images_dir"])
    fast_qc = Propagator(model, templates, cycle_consistency=True)
    fast = Propagator(model, templates, cycle_consistency=False)
    exact = Propagator(model, templates, cycle_consistency=False, exact=True)
    exact_qc = Propagator(model, templates, cycle_consistency=True, exact=True)
    steps: dict[str, list[float]] = {}
    differ, area = [], []

    def timed(name, fn, *a, **k):
        _sync(args.device)
        t0 = time.perf_counter()
        out = fn(*a, **k)
        _sync(args.device)
        steps.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    records = []
    photos = data["photos"][: args.photos]
    for i, path in enumerate(photos + photos[:1]):  # the first photo twice: warm-up
        warm = i == 0
        full_rgb = timed("read_full", read_image, path)
        rgb, size = timed("read", fast.read_target, path)
        timed("preprocess", preprocess, rgb, args.image_size, model.device)
        timed("preprocess_full", preprocess, full_rgb, args.image_size, model.device)
        pending = timed("model+preprocess", fast.start_batch, [rgb], sizes=[size])[0]
        pending_qc = timed("model+preprocess+qc", fast_qc.start_batch, [rgb], sizes=[size])[0]
        timed("exact_model+preprocess", exact.start_batch, [full_rgb])
        timed("exact_model+preprocess+qc", exact_qc.start_batch, [full_rgb])
        preds = timed("masks", pending.finish)
        structures = timed(
            "rle", lambda: [StructureRecord.from_prediction(p).to_json() for p in preds]
        )
        low = torch.stack([part[1] for part in pending.parts])
        full_masks = timed("masks_full", logits_to_masks, low, size)
        timed("rle_full", lambda: [encode_rle(m) for m in full_masks])

        def measure():
            for s in structures:
                measure_mask(decode_segmentation(s["segmentation"], *size))

        timed("measure", measure)
        exact_preds = exact.predict(full_rgb)
        for p, q in zip(preds, exact_preds):
            a, b = p.mask, q.mask
            differ.append(int((a != b).sum()))
            area.append(int(b.sum()))
        if warm:
            steps = {k: [] for k in steps}
            differ, area = [], []
            continue
        del pending_qc
        records.append(
            {
                "file_name": Path(path).name,
                "width": size[1],
                "height": size[0],
                "structures": structures,
            }
        )
    work = OUT / "collection-merge"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    jsonl = work / "records.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    categories, _ = categories_of(data["templates"])
    t0 = time.perf_counter()
    merge_predictions([jsonl], categories, work / "predictions.json", info={})
    merge_s = (time.perf_counter() - t0) / len(records)
    per = {k: float(np.median(v)) for k, v in steps.items()}
    per["model"] = per.pop("model+preprocess") - per["preprocess"]
    per["qc"] = per.pop("model+preprocess+qc") - per["model"] - per["preprocess"]
    per["qc_full"] = per.pop("exact_model+preprocess+qc") - per.pop("exact_model+preprocess")
    per["merge"] = merge_s
    return {
        "per_photo_s": per,
        "photos": len(records),
        "pixels_differ_fast_vs_exact": int(sum(differ)),
        "mask_pixels": int(sum(area)),
        "differ_fraction_of_mask_area": float(sum(differ) / max(sum(area), 1)),
        "max_differ_fraction_one_mask": float(
            max((d / max(a, 1) for d, a in zip(differ, area)), default=0.0)
        ),
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_model(args, data) -> dict:
    """The model alone: photos already decoded and in memory, `--batch-size` per call
    (auto: as `sam2pal segment` picks it), no QC, no masks: the ceiling of end-to-end
    throughput."""
    import torch

    from sam2pal.inference.engine import Propagator
    from sam2pal.inference.pipeline import batch_size_for
    from sam2pal.io.templates import load_coco_templates

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _model(args)
    batch = batch_size_for(args.batch_size, model.device)
    templates = load_coco_templates(data["templates"], data["images_dir"])
    engine = Propagator(model, templates, cycle_consistency=False, batch_size=batch)
    photos = [engine.read_target(p)[0] for p in data["photos"][: args.photos]]
    while len(photos) < 2 * batch:
        photos = photos + photos
    engine.start_batch(photos[:batch])  # warm-up
    _sync(args.device)
    t0 = time.perf_counter()
    done = 0
    for start in range(0, len(photos) - batch + 1, batch):
        engine.start_batch(photos[start : start + batch])
        done += batch
    _sync(args.device)
    return {
        "per_photo_s": (time.perf_counter() - t0) / done,
        "batch_size": batch,
        "photos": done,
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_official(args, data) -> dict:
    """The official video predictor, photo by photo on [template, photo]."""
    import tempfile

    import torch
    from hydra.utils import instantiate

    from sam2pal.io.templates import load_coco_templates
    from sam2pal.models.build import load_model_config

    if args.threads:
        torch.set_num_threads(args.threads)
    # the official video predictor (its class, its defaults) on our config and weights
    ours = _model(args)
    cfg = load_model_config(args.config, args.image_size)
    cfg.model._target_ = "sam2.sam2_video_predictor.SAM2VideoPredictor"
    predictor = instantiate(cfg.model, _recursive_=True)
    predictor.load_state_dict(ours.state_dict())
    predictor = predictor.to(ours.device).eval()
    del ours
    templates = load_coco_templates(data["templates"], data["images_dir"])
    template = templates.images[0]
    masks = [inst.mask for inst in template.instances]
    photos = data["photos"][: args.photos]
    workdir = Path(tempfile.mkdtemp(prefix="official_", dir=OUT))
    times = []
    for i, path in enumerate(photos + photos[:1]):
        video = workdir / f"v{i}"
        video.mkdir()
        os.symlink(template.path, video / "00000.jpg")
        os.symlink(path, video / "00001.jpg")
        _sync(args.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            state = predictor.init_state(str(video))
            for obj_id, mask in enumerate(masks):
                predictor.add_new_mask(state, 0, obj_id, mask)
            for frame, _, logits in predictor.propagate_in_video(state):
                if frame == 1:
                    out = [(logits[k, 0] > 0).cpu().numpy() for k in range(len(masks))]
        _sync(args.device)
        if i > 0:
            times.append(time.perf_counter() - t0)
        del out, state
    shutil.rmtree(workdir)
    return {
        "per_photo_s": float(np.median(times)),
        "photos": len(times),
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_segment(args, data) -> dict:
    """`sam2pal segment` end to end, in this process (for its peak RSS)."""
    from sam2pal.cli import main

    out = OUT / f"collection-segment-{args.qc}-{args.n}"
    shutil.rmtree(out, ignore_errors=True)
    folder = OUT / f"collection-targets-{args.n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in data["photos"][: args.n]:
        os.symlink(path, folder / Path(path).name)
    cmd = [
        "segment",
        "--template_json",
        data["templates"],
        "--template_dir",
        data["images_dir"],
        "--image_dir",
        str(folder),
        "--output_dir",
        str(out),
        "--sam2_checkpoint",
        args.checkpoint,
        "--sam2_config",
        args.config,
        "--image_size",
        str(args.image_size),
        "--device",
        args.device,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.qc == "off":
        cmd.append("--no_cycle_consistency")
    if args.batch_size:
        cmd += ["--batch_size", str(args.batch_size)]
    t0 = time.perf_counter()
    code = main(cmd)
    elapsed = time.perf_counter() - t0
    if code:
        raise SystemExit(f"sam2pal segment failed with {code}")
    return {"seconds": elapsed, "photos": args.n, "peak_rss_mb": peak_rss_mb()}


WORKERS = {
    "steps": worker_steps,
    "model": worker_model,
    "official": worker_official,
    "segment": worker_segment,
}


def run_worker(args, kind: str, data_json: Path, **extra) -> dict:
    cmd = [
        sys.executable,
        "-u",
        __file__,
        "--worker",
        kind,
        "--data",
        str(data_json),
        "--photos",
        str(args.photos),
        "--config",
        args.config,
        "--checkpoint",
        args.checkpoint,
        "--image-size",
        str(args.image_size),
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
    ]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"worker {kind} failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=8, help="12 MP photos (default 8)")
    parser.add_argument("--size", default="4000x3000")
    parser.add_argument(
        "--big", type=int, default=2, help="24 MP photos for the steps part (0: none)"
    )
    parser.add_argument(
        "--structures", type=int, default=6, help="5 parts, or 6 with the whole specimen"
    )
    parser.add_argument(
        "--checkpoint",
        default="sam2pal-micro",
        help="sam2pal-micro (real masks on these specimens), random, or a .pt file",
    )
    parser.add_argument("--config", default=None, help="default: the checkpoint's own")
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--data")
    parser.add_argument("--qc", default="on")
    parser.add_argument("--n", type=int, default=1)
    args = parser.parse_args()
    if args.config is None:
        from sam2pal.models.registry import choose_config

        args.config = choose_config(None, args.checkpoint)
    if args.image_size is None:
        from sam2pal.models.build import load_model_config

        args.image_size = int(load_model_config(args.config).model.image_size)
    if args.worker:
        data = json.loads(Path(args.data).read_text())
        print(json.dumps(WORKERS[args.worker](args, data)))
        return

    name = f"collection-{args.device.split(':')[0]}"
    if args.checkpoint != "sam2pal-micro":
        name += f"-{Path(args.checkpoint).stem}"
    recorder = Recorder(name, args, args.device) if args.record else None
    OUT.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.split("x"))
    t0 = time.perf_counter()
    data = make_data(args.photos, (width, height), args.structures, args.seed)
    data_json = OUT / "collection-data.json"
    data_json.write_text(json.dumps(data))
    print(
        f"data: {args.photos} photos of {width}x{height} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    results = {"photo_size": [width, height], "photos": args.photos, "structures": args.structures}
    results["steps"] = run_worker(args, "steps", data_json)
    print(
        "steps (s per photo):",
        json.dumps({k: round(v, 4) for k, v in results["steps"]["per_photo_s"].items()}),
        flush=True,
    )
    if args.big:
        big = make_data(args.big, (6000, 4000), args.structures, args.seed)
        big_json = OUT / "collection-data-big.json"
        big_json.write_text(json.dumps(big))
        saved, args.photos = args.photos, args.big
        results["steps_24mp"] = run_worker(args, "steps", big_json)
        args.photos = saved
        print(
            "steps 24 MP (s per photo):",
            json.dumps({k: round(v, 4) for k, v in results["steps_24mp"]["per_photo_s"].items()}),
            flush=True,
        )
    results["official"] = run_worker(args, "official", data_json)
    print(f"official: {results['official']['per_photo_s']:.3f} s per photo", flush=True)
    for qc in ("on", "off"):
        many = run_worker(args, "segment", data_json, qc=qc, n=args.photos)
        one = run_worker(args, "segment", data_json, qc=qc, n=1)
        per_photo = (many["seconds"] - one["seconds"]) / (args.photos - 1)
        results[f"segment_qc_{qc}"] = {
            "per_photo_s": per_photo,
            "run_s": many["seconds"],
            "one_photo_run_s": one["seconds"],
            "peak_rss_mb": many["peak_rss_mb"],
        }
        ratio = results["official"]["per_photo_s"] / per_photo
        results[f"speedup_qc_{qc}"] = ratio
        print(
            f"sam2pal segment, QC {qc}: {per_photo:.3f} s per added photo "
            f"({many['seconds']:.1f} s for {args.photos}); official / ours = {ratio:.2f}x",
            flush=True,
        )
    results["model_only"] = run_worker(args, "model", data_json)
    model_s = results["model_only"]["per_photo_s"]
    end_to_end = results["segment_qc_off"]["per_photo_s"]
    results["end_to_end_share_of_model_throughput"] = model_s / end_to_end
    print(
        f"model alone: {model_s:.3f} s per photo (batch {results['model_only']['batch_size']}); end to end "
        f"without QC reaches {model_s / end_to_end:.0%} of its throughput "
        f"({1 / end_to_end:.2f} vs {1 / model_s:.2f} photos per second)",
        flush=True,
    )
    if recorder is not None:
        recorder.write(results)


if __name__ == "__main__":
    main()
