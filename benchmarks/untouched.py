"""What the per-structure choice costs at segmentation: an adapter for every structure
against the same adapter leaving structures to the untouched model
(`finetune.per_structure_choice`).

Both fold the LoRA weights into the model. With structures left to the untouched model,
the engine also holds a copy of the base weights (the image encoder shared: each target
is still encoded once) and tracks those structures with it, in a group of their own:
two smaller tracking calls per target instead of one. Same model, same adapter weights
(LoRA on memory attention, mask decoder and memory encoder, rank 8, random B weights),
same photos, one process, the variants taking turns after a first call each; the masks
of the structures the adapter keeps are checked to agree.

    .venv/bin/python benchmarks/untouched.py --threads 2          # ~3 min on 2 cores

Prints seconds per target and the ratio; writes benchmarks/results/untouched-<checkpoint>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from palindrome import model_arguments  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.inference.engine import Propagator  # noqa: E402
from sam2pal.inference.pipeline import _run_model  # noqa: E402
from sam2pal.io.images import read_image  # noqa: E402
from sam2pal.io.templates import load_coco_templates  # noqa: E402
from sam2pal.models.adapters import add_lora, save_adapter  # noqa: E402
from sam2pal.synth.quality import HELD_OUT, make_held_out  # noqa: E402


def make_adapters(model_args: dict, info: dict, folder: Path, untouched: list[str]) -> dict:
    """Two adapter folders with the same random LoRA weights: "every structure" (leaves
    nothing to the untouched model) and "with untouched structures" (leaves `untouched`)."""
    import torch

    model, _, _ = _run_model(**model_args, adapter=None)
    peft_model = add_lora(model, 8, 16, 0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    folders = {}
    for label, left in (("every structure", []), ("with untouched structures", untouched)):
        meta = {
            "base_id": info["base_id"],
            "image_size": info["image_size"],
            "model_config_sha256": info["config_sha256"],
            "selection": {"by": "template_iou", "untouched_structures": left},
        }
        folders[label] = save_adapter(peft_model, folder / label.replace(" ", "-"), meta, "lora")
    return folders


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    ap.add_argument("--config", default=None)
    ap.add_argument("--collection", default="bronze_aligned", choices=[h.name for h in HELD_OUT])
    ap.add_argument("--n-images", type=int, default=23)
    ap.add_argument("--untouched", nargs="+", default=["antenna", "legs"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "untouched"))
    ap.add_argument("--record", default=None, help="result name (default untouched-<checkpoint>)")
    args = ap.parse_args(argv)
    recorder = Recorder(args.record or f"untouched-{Path(args.checkpoint).stem}", args, "cpu")
    model_args = model_arguments(args, device="cpu")
    coll = Path(args.out) / args.collection
    spec = {h.name: h for h in HELD_OUT}[args.collection]
    make_held_out(coll, spec, args.n_images, 3)
    templates = load_coco_templates(coll / "templates.json", coll / "images").select(
        max_templates=1
    )
    names = sorted(p.name for p in (coll / "images").iterdir())[3:]
    images = [read_image(coll / "images" / name) for name in names]
    _, info, _ = _run_model(**model_args, adapter=None)
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(model_args, info, Path(tmp), args.untouched)
        engines = {}
        for label, folder in folders.items():
            model, _, _ = _run_model(**model_args, adapter=folder)
            engines[label] = Propagator(model, templates)
            engines[label].predict(images[0])  # the first call's one-off costs
    seconds: dict[str, list[float]] = {label: [] for label in engines}
    masks: dict[str, list] = {}
    for _ in range(args.rounds):
        for label, engine in engines.items():
            start = time.perf_counter()
            masks[label] = [engine.predict(image) for image in images]
            seconds[label].append((time.perf_counter() - start) / len(images))
    # the structures the adapter keeps: the same masks with or without the choice
    kept = [
        (a.mask != b.mask).mean()
        for every, chosen in zip(masks["every structure"], masks["with untouched structures"])
        for a, b in zip(every, chosen)
        if templates.categories[a.category_id] not in args.untouched
    ]
    results = {
        "collection": args.collection,
        "targets": len(images),
        "image_size": info["image_size"],
        "untouched_structures": args.untouched,
        "seconds_per_target": {
            label: {"min": round(min(v), 4), "median": round(sorted(v)[len(v) // 2], 4)}
            for label, v in seconds.items()
        },
        "ratio_min": round(
            min(seconds["with untouched structures"]) / min(seconds["every structure"]), 3
        ),
        "kept_structures_max_pixel_disagreement": round(float(max(kept)), 6),
    }
    print(json.dumps(results, indent=1))
    recorder.write(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
