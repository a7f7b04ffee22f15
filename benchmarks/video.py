"""Video propagation speed and memory: sam2pal's temporal tracker vs. the official
SAM2VideoPredictor, at N and 4N frames.

Same weights (seeded random weights: no checkpoint can be downloaded here, and speed
and memory do not depend on the weights), the same synthetic clip (one beetle that
turns, drifts and flexes; `sam2pal.synth.specimens.render_video_frames`), keyframe 0 with S
structures, tracked forwards through the whole clip:

  temporal   sam2pal.inference.temporal.VideoPropagator: frames streamed from disk, each
             encoded once, only SAM2's look-back window kept
  official   SAM2VideoPredictor.init_state + add_new_mask + propagate_in_video, its
             defaults (every frame loaded up front, every frame's memory kept)

Each run is its own process so that its peak RSS (and peak GPU memory) is its own.
Prints s/frame, the ratios, peak memory at N and 4N, and how many mask pixels differ
between the two at N; writes benchmarks/results/video-<cpu|cuda>.json (`--record`).

    .venv/bin/python benchmarks/video.py                       # N=40, 256 px, CPU
    .venv/bin/python benchmarks/video.py --n 200 --image-size 1024 --device cuda
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


def make_clip(folder: Path, n_frames: int, seed: int, size) -> dict:
    """JPEG frames 00000.jpg ... of the synthetic clip, and frame 0's part masks."""
    from PIL import Image

    from sam2pal.synth.specimens import render_video_frames

    folder.mkdir(parents=True)
    _, frames = render_video_frames(n_frames=n_frames, seed=seed, size=size)
    labels0 = None
    for i, (image, labels) in enumerate(frames):
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=92)
        if i == 0:
            labels0 = labels
    np.save(folder.parent / "labels0.npy", labels0)
    return {"frames": str(folder), "labels0": str(folder.parent / "labels0.npy"), "n": n_frames}


def _keyframe_masks(data, structures: int) -> dict:
    labels = np.load(data["labels0"])
    parts = [k for k in range(1, 6) if (labels == k).any()][:structures]
    return {(k, 1): labels == k for k in parts}


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker_temporal(args, data):
    from sam2pal.inference.temporal import VideoPropagator
    from sam2pal.io.images import read_image
    from sam2pal.models.build import build_model

    model = build_model(args.config, "random", image_size=args.image_size, device=args.device)
    frames = sorted(Path(data["frames"]).iterdir())[: args.n]
    masks = _keyframe_masks(data, args.structures)
    t0 = time.perf_counter()
    tracker = VideoPropagator(
        model,
        {0: masks},
        len(frames),
        lambda i: read_image(frames[i]),
        fill_hole_area=0,
        cycle_consistency=False,
    )
    out = []
    for result in tracker.run():
        if args.masks_out:
            out += [p.mask for p in result.predictions]
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    if args.masks_out:
        np.savez_compressed(args.masks_out, *out)
    return {
        "per_frame_s": elapsed / len(frames),
        "n": len(frames),
        "state_mb": tracker.peak_state_bytes / 2**20,
    }


def worker_official(args, data):
    from sam2.build_sam import build_sam2_video_predictor

    from sam2pal.models.build import build_model, resolve_config

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
    predictor.eval()
    video = Path(tempfile.mkdtemp(prefix="official_video_"))
    for path in sorted(Path(data["frames"]).iterdir())[: args.n]:
        os.symlink(path, video / path.name)
    masks = _keyframe_masks(data, args.structures)
    out = []
    t0 = time.perf_counter()
    state = predictor.init_state(str(video))
    for obj_id, key in enumerate(sorted(masks)):
        predictor.add_new_mask(state, 0, obj_id, masks[key])
    for frame, _, logits in predictor.propagate_in_video(state):
        if args.masks_out:
            if frame == 0:  # the keyframe: sam2pal outputs the annotation itself
                out += [masks[key] for key in sorted(masks)]
            else:
                out += [(logits[i, 0] > 0).cpu().numpy() for i in range(len(masks))]
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(video)
    if args.masks_out:
        np.savez_compressed(args.masks_out, *out)
    return {"per_frame_s": elapsed / args.n, "n": args.n}


WORKERS = {"temporal": worker_temporal, "official": worker_official}


def run_worker(args, kind: str, n: int, data_json: Path, masks_out: str = "") -> dict:
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
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40, help="frames (the memory check also runs 4N)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--frame-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--config", default="sam2.1_hiera_t")
    parser.add_argument("--structures", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--data")
    parser.add_argument("--masks-out", default="")
    parser.add_argument(
        "--record", default=None, help="result name (default video-cpu or video-cuda)"
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

    recorder = Recorder(args.record or f"video-{args.device.split(':')[0]}", args, args.device)
    scratch = Path(tempfile.mkdtemp(prefix="sam2pal_video_bench_"))
    try:
        data = make_clip(scratch / "frames", 4 * args.n, args.seed, tuple(args.frame_size))
        data_json = scratch / "data.json"
        data_json.write_text(json.dumps(data))
        print(
            f"video benchmark: {args.config} at {args.image_size} px, {args.structures} structures, "
            f"{args.n} and {4 * args.n} frames of {args.frame_size[0]}x{args.frame_size[1]}, "
            f"device {args.device}",
            flush=True,
        )
        results = {
            "temporal": run_worker(args, "temporal", args.n, data_json, str(scratch / "ours.npz")),
            "official": run_worker(
                args, "official", args.n, data_json, str(scratch / "theirs.npz")
            ),
            "temporal@4N": run_worker(args, "temporal", 4 * args.n, data_json),
            "official@4N": run_worker(args, "official", 4 * args.n, data_json),
        }
        ours, theirs = np.load(scratch / "ours.npz"), np.load(scratch / "theirs.npz")
        differing = sum(int((ours[k] != theirs[k]).sum()) for k in ours.files)
        pixels = sum(ours[k].size for k in ours.files)
        base = results["temporal"]["per_frame_s"]
        gpu = args.device.startswith("cuda")
        print(
            f"\n{'method':<14}{'frames':>8}{'s/frame':>10}{'vs ours':>9}{'peak RSS MB':>13}"
            + (f"{'peak GPU MB':>13}" if gpu else "")
        )
        for name, r in results.items():
            print(
                f"{name:<14}{r['n']:>8}{r['per_frame_s']:>10.3f}{r['per_frame_s'] / base:>8.2f}x"
                f"{r['peak_rss_mb']:>13.0f}" + (f"{r['peak_gpu_mb']:>13.0f}" if gpu else "")
            )
        for key, label in (("peak_rss_mb", "peak RSS"), ("peak_gpu_mb", "peak GPU memory")):
            if key in results["temporal"]:
                print(
                    f"{label} from {args.n} to {4 * args.n} frames: ours "
                    f"{results['temporal@4N'][key] / results['temporal'][key]:.2f}x, official "
                    f"{results['official@4N'][key] / results['official'][key]:.2f}x"
                )
        print(
            f"state held by ours: {results['temporal']['state_mb']:.1f} MB at {args.n} frames, "
            f"{results['temporal@4N']['state_mb']:.1f} MB at {4 * args.n}"
        )
        print(
            f"ours vs official masks at {args.n} frames: {differing} differing pixels of {pixels}"
        )
        recorder.write({"methods": results, "differing_pixels": differing, "pixels": pixels})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
