"""What the palindrome's return half rewards: a thin mask or a swollen one?

Palindrome training segments a photo from the template (phase 1), then the template
back from the photo and its predicted masks alone (phase 2), and takes the loss on the
template's known masks. Its gradient favours whatever phase-1 masks make phase 2 easier.
On the held-out collections of `benchmarks/quality.py`, with the untouched model, this
measures phase 2 when the photo is remembered with its *true* masks grown or shrunk by
a few pixels (at the model's input), and with the model's own phase-1 prediction: per
structure, the return IoU on the template and the palindrome loss (cross-entropy +
Dice against the template's masks, no object term). Where the loss falls as a mask
grows past the truth, the cycle rewards swelling it: the collapse of the thin parts
into a blob (README, *Adapting SAM2 to a collection*). Beside it, phase 1 on the photos
against their truth (forward), and phase 1 from the template onto the template photo
itself (self: what any tracker should get nearly right).

    .venv/bin/python -u benchmarks/cycle_reward.py --threads 1

Writes benchmarks/results/cycle-reward-<checkpoint>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from poses import benchmark_model  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.io.coco import category_masks, load_coco  # noqa: E402
from sam2pal.io.templates import load_coco_templates  # noqa: E402
from sam2pal.synth.quality import HELD_OUT, STRUCTURES, make_held_out  # noqa: E402
from sam2pal.training.palindrome import FinetuneSettings, Trainer  # noqa: E402

#: how far the true masks are grown (> 0) or shrunk (< 0), pixels at the model's input
RADII = (-1, 0, 1, 2, 4, 8, 16)


def grown(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 1, S, S) binary masks grown by `radius` pixels (a square structuring
    element), or shrunk by -radius."""
    if radius == 0:
        return masks
    k = 2 * abs(radius) + 1
    if radius > 0:
        return F.max_pool2d(masks, k, stride=1, padding=abs(radius))
    return 1 - F.max_pool2d(1 - masks, k, stride=1, padding=abs(radius))


def scores(trainer: Trainer, truth: torch.Tensor, logits: torch.Tensor):
    """Per object: (IoU of the low-res `logits`' mask with the (B, 1, S, S) `truth`,
    the trainer's palindrome loss against it without the object term: cross-entropy +
    Dice)."""
    size = (trainer.image_size, trainer.image_size)
    high = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    truth = truth.float()
    none = logits.new_zeros(())
    losses = [
        trainer._mask_loss(logits[i : i + 1].float(), truth[i : i + 1], none, None)[0].item()
        for i in range(len(logits))
    ]
    pred, flat = high.flatten(1) > 0, truth.flatten(1) > 0
    inter = (pred & flat).sum(1).float()
    union = (pred | flat).sum(1).float().clamp_min(1)
    return (inter / union).tolist(), losses


def measure(model, coll: Path, n_templates: int) -> dict:
    """{structure: {mask: {"iou", "loss", "photos"}}} on one collection, the masks being
    "r=<radius>" (the true mask grown or shrunk) and "predicted" (phase 1's own); and
    under "forward", phase 1's own IoU and loss on the photo against its truth; under
    "self", phase 1 from the template onto the template photo itself."""
    templates = load_coco_templates(coll / "templates.json", coll / "images").select(
        max_templates=1
    )
    gt_path = coll / "ground_truth.json"
    _, truth = category_masks(load_coco(gt_path), gt_path)
    names = sorted(p.name for p in (coll / "images").iterdir())
    targets = names[n_templates:]
    settings = FinetuneSettings(
        template_views=0, anchor_weight=0.0, stay_weight=0.0, holdout_fraction=0.0, max_holdout=0
    )
    trainer = Trainer(
        model,
        templates,
        {n: coll / "images" / n for n in targets},
        settings,
        ground_truth=truth,
        log=lambda *_: None,
    )
    template = trainer.templates[0]
    structures = [trainer.categories.get(cid) for cid, _ in template.objects]
    sums: dict[str, dict[str, list]] = {}
    template_backbone = trainer._backbone(template.key)
    with torch.no_grad():
        logits, _, _, _ = trainer.phase1(template, template_backbone, template_backbone)
        for i, (iou, loss) in enumerate(zip(*scores(trainer, template.mask_input, logits))):
            sums.setdefault(structures[i], {})["self"] = [(iou, loss)]
        for key in targets:
            logits1, _, _, target_feats = trainer.phase1(
                template, template_backbone, trainer._backbone(key)
            )
            true = trainer.truth_input(template, key)
            present = true.flatten(1).sum(1) > 0
            ious, losses = scores(trainer, true, logits1)
            for i, name in enumerate(structures):
                if present[i]:
                    sums.setdefault(name, {}).setdefault("forward", []).append((ious[i], losses[i]))
            masks = {f"r={r}": grown(true, r) for r in RADII}
            masks["predicted"] = trainer.soft_mask(logits1)
            for label, mask in masks.items():
                logits0, _ = trainer.phase2(template, template_backbone, target_feats, mask)
                ious, losses = scores(trainer, template.mask_input, logits0)
                for i, name in enumerate(structures):
                    if present[i]:
                        cell = sums.setdefault(name, {}).setdefault(label, [])
                        cell.append((ious[i], losses[i]))
    return {
        name: {
            label: {
                "iou": round(float(np.mean([v[0] for v in vals])), 4),
                "loss": round(float(np.mean([v[1] for v in vals])), 4),
                "photos": len(vals),
            }
            for label, vals in by_mask.items()
        }
        for name, by_mask in sums.items()
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
    ap.add_argument("--n-templates", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "cycle_reward"))
    ap.add_argument("--record", default=None)
    args = ap.parse_args(argv)
    recorder = Recorder(
        args.record or f"cycle-reward-{Path(args.checkpoint).stem}", args, args.device
    )
    specs = {h.name: h for h in HELD_OUT}
    results = {"radii": list(RADII), "collections": {}}
    for name in args.collections:
        coll = Path(args.out) / name
        make_held_out(coll, specs[name], args.n_images, args.n_templates)
        model, info = benchmark_model(args)  # afresh: the trainer adds LoRA to it
        results["model"] = info
        table = measure(model, coll, args.n_templates)
        results["collections"][name] = table
        labels = ["self", "forward"] + [f"r={r}" for r in RADII] + ["predicted"]
        print(
            f"\n### {name}: loss (IoU) per structure: phase 1 from the template onto itself "
            "(self) and onto the photos (forward), then "
            "phase 2 back to the template from the photo's true masks grown by r px, and from "
            "phase 1's prediction\n"
        )
        print("| structure | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for structure in (s for s in STRUCTURES if s in table):
            row = table[structure]
            print(
                f"| {structure} | "
                + " | ".join(f"{row[m]['loss']:.3f} ({row[m]['iou']:.2f})" for m in labels)
                + " |"
            )
    recorder.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
