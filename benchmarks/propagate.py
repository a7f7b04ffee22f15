"""Propagation speed and memory: our engine vs. the official SAM2VideoPredictor.

Same weights (seeded random weights: no checkpoint can be downloaded here, and speed
does not depend on the weights), same synthetic specimen images, one run. Three ways to
segment N targets from one template with S structures:

  engine       sam2pal's Propagator: template memory once, one encoder pass per target
  per-image    the official predictor on a 2-frame video [template, target] per target
  long-video   the official predictor on one video [template, target_1 .. target_N]
               (what the tool our users come from does; targets then depend on each
               other, and every frame stays in memory)

Each runs in its own process so that its peak RSS is its own; the engine and the long
video also run at 4N targets to show how memory grows with N. Prints per-target times,
the ratios, and peak RSS; writes benchmarks/results/propagate-<cpu|cuda>.json (`--record`).

    .venv/bin/python benchmarks/propagate.py                 # N=12, 512 px, hiera-t
    .venv/bin/python benchmarks/propagate.py --n 16 --image-size 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import Recorder  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_data(folder: Path, n_targets: int, seed: int) -> dict:
    from sam2pal.synth.specimens import make_collection

    info = make_collection(
        folder, n_images=n_targets + 1, n_templates=1, seed=seed, size=(480, 360)
    )
    return {"images": [str(p) for p in info["images"]], "templates": str(info["templates"])}


def _templates(data: dict, structures: int):
    from sam2pal.io.templates import load_coco_templates

    templates = load_coco_templates(data["templates"], Path(data["images"][0]).parent)
    image = templates.images[0]
    image.instances = image.instances[:structures]
    return templates


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker_engine(args, data):
    from sam2pal.inference.engine import Propagator
    from sam2pal.io.images import read_image
    from sam2pal.models.build import build_model

    model = build_model(args.config, "random", image_size=args.image_size, device=args.device)
    templates = _templates(data, args.structures)
    targets = data["images"][1 : args.n + 1]
    t0 = time.perf_counter()
    engine = Propagator(model, templates, fill_hole_area=0, cycle_consistency=args.cycle)
    _sync(args.device)
    setup = time.perf_counter() - t0
    masks = []
    t0 = time.perf_counter()
    for path in targets:
        preds = engine.predict(read_image(path))
        masks.append([p.mask for p in preds])
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    if args.masks_out:
        np.savez_compressed(args.masks_out, *[m for ms in masks for m in ms])
    return {"setup_s": setup, "per_target_s": elapsed / len(targets), "n": len(targets)}


def _official(args):
    from sam2.build_sam import build_sam2_video_predictor

    from sam2pal.models.build import build_model, resolve_config

    # our builder gives the seeded random weights; the official builder the architecture
    weights = build_model(
        args.config, "random", image_size=args.image_size, device="cpu"
    ).state_dict()
    config = str(resolve_config(args.config).relative_to(Path(__import__("sam2").__file__).parent))
    predictor = build_sam2_video_predictor(
        config,
        None,
        device=args.device,
        hydra_overrides_extra=[f"++model.image_size={args.image_size}"],
    )
    predictor.load_state_dict(weights)
    predictor.fill_hole_area = 0
    return predictor.eval()


def _official_setup(args, data):
    """The official predictor, the template's masks, and the target paths."""
    templates = _templates(data, args.structures)
    masks = [inst.mask for inst in templates.images[0].instances]
    return _official(args), masks, data["images"][1 : args.n + 1]


def worker_per_image(args, data):
    predictor, masks, targets = _official_setup(args, data)
    workdir = Path(tempfile.mkdtemp(prefix="per_image_"))
    out_masks = []
    t0 = time.perf_counter()
    for path in targets:
        video = workdir / Path(path).stem
        video.mkdir()
        os.symlink(data["images"][0], video / "00000.jpg")
        os.symlink(path, video / "00001.jpg")
        state = predictor.init_state(str(video))
        for obj_id, mask in enumerate(masks):
            predictor.add_new_mask(state, 0, obj_id, mask)
        for frame, _, logits in predictor.propagate_in_video(state):
            if frame == 1:
                out_masks += [(logits[i, 0] > 0).cpu().numpy() for i in range(len(masks))]
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(workdir)
    if args.masks_out:
        np.savez_compressed(args.masks_out, *out_masks)
    return {"per_target_s": elapsed / len(targets), "n": len(targets)}


def worker_long_video(args, data):
    predictor, masks, targets = _official_setup(args, data)
    video = Path(tempfile.mkdtemp(prefix="long_video_"))
    os.symlink(data["images"][0], video / "00000.jpg")
    for i, path in enumerate(targets, start=1):
        os.symlink(path, video / f"{i:05d}.jpg")
    t0 = time.perf_counter()
    state = predictor.init_state(str(video))
    for obj_id, mask in enumerate(masks):
        predictor.add_new_mask(state, 0, obj_id, mask)
    for _ in predictor.propagate_in_video(state):
        pass
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(video)
    return {"per_target_s": elapsed / len(targets), "n": len(targets)}


WORKERS = {"engine": worker_engine, "per-image": worker_per_image, "long-video": worker_long_video}


def run_worker(
    args, kind: str, n: int, data_json: Path, masks_out: str = "", cycle: bool = False
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--data",
        str(data_json),
        "--n",
        str(n),
        "--image-size",
        str(args.image_size),
        "--config",
        args.config,
        "--structures",
        str(args.structures),
        "--device",
        args.device,
        "--masks-out",
        masks_out,
    ] + (["--cycle"] if cycle else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=12, help="targets (the memory check also runs 4N)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--config", default="sam2.1_hiera_t")
    parser.add_argument("--structures", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--data")
    parser.add_argument("--masks-out", default="")
    parser.add_argument("--cycle", action="store_true")
    parser.add_argument(
        "--record", default=None, help="result name (default propagate-cpu or propagate-cuda)"
    )
    args = parser.parse_args()

    if args.worker:
        data = json.loads(Path(args.data).read_text())
        result = WORKERS[args.worker](args, data)
        result["peak_rss_mb"] = peak_rss_mb()
        if args.device.startswith("cuda"):
            import torch

            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps(result))
        return

    recorder = Recorder(args.record or f"propagate-{args.device.split(':')[0]}", args, args.device)
    scratch = Path(tempfile.mkdtemp(prefix="sam2pal_bench_"))
    try:
        data = make_data(scratch / "collection", 4 * args.n, args.seed)
        data_json = scratch / "data.json"
        data_json.write_text(json.dumps(data))
        print(
            f"propagation benchmark: {args.config} at {args.image_size} px, {args.structures} structures, "
            f"{args.n} targets of 480x360, device {args.device}, torch threads default",
            flush=True,
        )
        results = {}
        results["engine"] = run_worker(
            args, "engine", args.n, data_json, str(scratch / "engine.npz")
        )
        results["engine+cycle"] = run_worker(args, "engine", args.n, data_json, cycle=True)
        results["per-image"] = run_worker(
            args, "per-image", args.n, data_json, str(scratch / "official.npz")
        )
        results["long-video"] = run_worker(args, "long-video", args.n, data_json)
        results["engine@4N"] = run_worker(args, "engine", 4 * args.n, data_json)
        results["long-video@4N"] = run_worker(args, "long-video", 4 * args.n, data_json)

        ours = np.load(scratch / "engine.npz")
        theirs = np.load(scratch / "official.npz")
        differing = sum(int((ours[k] != theirs[k]).sum()) for k in ours.files)
        base = results["engine"]["per_target_s"]
        print(f"\n{'method':<16}{'targets':>8}{'s/target':>11}{'vs engine':>11}{'peak RSS MB':>13}")
        for name, r in results.items():
            print(
                f"{name:<16}{r['n']:>8}{r['per_target_s']:>11.3f}{r['per_target_s'] / base:>10.2f}x"
                f"{r['peak_rss_mb']:>13.0f}"
            )
        print(f"\nengine set-up (template memory, once): {results['engine']['setup_s']:.3f} s")
        print(
            f"speed-up of the engine: {results['per-image']['per_target_s'] / base:.2f}x over per-image videos, "
            f"{results['long-video']['per_target_s'] / base:.2f}x over one long video"
        )
        print(
            f"peak RSS from N={args.n} to 4N={4 * args.n}: engine "
            f"{results['engine@4N']['peak_rss_mb'] / results['engine']['peak_rss_mb']:.2f}x, long video "
            f"{results['long-video@4N']['peak_rss_mb'] / results['long-video']['peak_rss_mb']:.2f}x"
        )
        print(
            f"engine vs official per-image masks: {differing} differing pixels "
            f"over {len(ours.files)} masks"
        )
        pixels = sum(int(ours[k].size) for k in ours.files)
        recorder.write({"methods": results, "differing_pixels": differing, "pixels": pixels})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
