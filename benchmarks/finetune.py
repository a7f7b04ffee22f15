"""Palindrome training step time and memory: cached features vs. re-encoding.

Same model (seeded random weights), same synthetic specimens, one run; each variant
in its own process so that its peak memory is its own:

  cached      the trainer's default: the frozen image encoder's output for every image
              is computed once; a step is two memory passes, two mask-decoder passes
              and their backward pass (LoRA on memory attention, decoder, memory encoder)
  re-encode   the same step, but both images go through the (frozen) encoder each step
  official    SAM2's own training style: both images re-encoded each step with gradients
              through the image encoder (LoRA on it too), as when the encoder is trained
  cached+dropout        `cached` with SAM2's attention dropout (0.1) on, as SAM2 trains
                        (`finetune.attention_dropout`)
  cached+checkpointing  `cached` with gradient checkpointing of the memory attention
                        (`finetune.gradient_checkpointing`)

Prints seconds per step, the ratios and peak memory; writes
benchmarks/results/finetune-<cpu|cuda>-<image size>.json (`--record`).

    .venv/bin/python benchmarks/finetune.py                     # 512 px, hiera-t, CPU
    .venv/bin/python benchmarks/finetune.py --image-size 1024 --device cuda
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import Recorder  # noqa: E402

VARIANTS = {
    "cached": {"cache_features": True},
    "re-encode": {"cache_features": False},
    "official": {
        "cache_features": False,
        "targets": ["image_encoder", "memory_attention", "sam_mask_decoder", "memory_encoder"],
    },
    "cached+dropout": {"cache_features": True, "attention_dropout": 0.1},
    "cached+checkpointing": {"cache_features": True, "gradient_checkpointing": True},
}


def worker(args) -> dict:
    import torch

    from sam2pal.io.images import list_images
    from sam2pal.io.templates import load_coco_templates
    from sam2pal.models.build import build_model
    from sam2pal.training.palindrome import FinetuneSettings, Trainer

    folder = Path(args.data)
    templates = load_coco_templates(folder / "templates.json", folder / "images")
    templates.images[0].instances = templates.images[0].instances[: args.structures]
    pool = {n: folder / "images" / n for n in list_images(folder / "images")}
    settings = FinetuneSettings(holdout_fraction=0, accumulation_steps=1, **VARIANTS[args.worker])
    model = build_model(args.config, "random", image_size=args.image_size, device=args.device)
    trainer = Trainer(model, templates, pool, settings, log=lambda *_: None)
    optimizer = torch.optim.AdamW(trainer.params, lr=settings.lr)
    trainer.sam.train()
    template = trainer.templates[0]

    def step(key):
        loss, _ = trainer.palindrome_loss(template, key)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    keys = trainer.train_keys
    step(keys[0])  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        step(keys[(i + 1) % len(keys)])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    result = {
        "s_per_step": (time.perf_counter() - start) / args.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "trainable_params": sum(p.numel() for p in trainer.params),
    }
    if args.device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--config", default="sam2.1_hiera_t")
    parser.add_argument("--structures", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--worker", choices=sorted(VARIANTS))
    parser.add_argument("--data")
    parser.add_argument(
        "--record", default=None, help="result name (default finetune-<cpu|cuda>-<image size>)"
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from sam2pal.synth.specimens import make_collection

    recorder = Recorder(
        args.record or f"finetune-{args.device.split(':')[0]}-{args.image_size}", args, args.device
    )
    scratch = Path(tempfile.mkdtemp(prefix="sam2pal_ftbench_"))
    try:
        make_collection(scratch, n_images=args.steps + 3, n_templates=1, seed=0, size=(480, 360))
        print(
            f"palindrome step benchmark: {args.config} at {args.image_size} px, {args.structures} structures, "
            f"{args.steps} timed steps after a warm-up, device {args.device}",
            flush=True,
        )
        results = {}
        for name in args.variants:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--data",
                str(scratch),
                "--image-size",
                str(args.image_size),
                "--config",
                args.config,
                "--structures",
                str(args.structures),
                "--steps",
                str(args.steps),
                "--device",
                args.device,
            ]
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode == 0:
                results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            elif done.returncode == -9:
                results[name] = {"failed": "killed (out of memory)"}
            else:
                lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
                results[name] = {"failed": lines[-1]}
            print(f"{name}: {results[name]}", flush=True)
        base = results.get("cached", {}).get("s_per_step")
        print(
            f"\n{'variant':<22}{'s/step':>9}{'vs cached':>11}{'peak RSS MB':>13}{'trainable':>12}"
        )
        for name, r in results.items():
            if "failed" in r:
                print(f"{name:<22}  failed: {r['failed']}")
                continue
            ratio = f"{r['s_per_step'] / base:>10.2f}x" if base else f"{'':>11}"
            extra = f"{r['peak_gpu_mb']:>10.0f} GPU MB" if "peak_gpu_mb" in r else ""
            print(
                f"{name:<22}{r['s_per_step']:>9.3f}{ratio}{r['peak_rss_mb']:>13.0f}"
                f"{r['trainable_params']:>12,}{extra}"
            )
        recorder.write({"variants": results})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
