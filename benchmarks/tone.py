"""What `propagate.tone: auto` does on dark specimens on dark grounds, and that it leaves
the other collections alone.

Zero-shot from one template (20 targets each), with the photos as they are (`tone:
none`) and with their dark tones lifted (`tone: auto`, `sam2pal.inference.tone`), on
the five held-out collections of `quality.py` and on four more dark-on-dark looks that
no benchmark used before and training never drew (a training palette or a held-out one
on slate, on a dark card, on dark foam). Per collection: whether the templates call for
a lift, how many photos were lifted and how strongly (the gammas), and the IoU per
structure either way; where the templates call for none (a specimen lighter than its
ground), also with every photo lifted anyway, which is what the rule avoids.

    .venv/bin/python -u benchmarks/tone.py --threads 1     # ~10 minutes on one thread

Writes benchmarks/results/tone-<checkpoint>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from poses import benchmark_model  # noqa: E402
from record import Recorder  # noqa: E402

from sam2pal.inference.tone import Tone, photo_gamma  # noqa: E402
from sam2pal.io.images import read_image  # noqa: E402
from sam2pal.io.templates import load_coco_templates  # noqa: E402
from sam2pal.synth.quality import HELD_OUT, HeldOut, make_held_out, score_collection  # noqa: E402

#: dark specimens on dark grounds beside blue_slate: seeds and looks no other benchmark uses
DARK = (
    HeldOut(
        "bronze_slate", {"palettes": ("bronze",), "backgrounds": ("slate",)}, 201, "bronze on slate"
    ),
    HeldOut(
        "black_slate", {"palettes": ("black",), "backgrounds": ("slate",)}, 202, "black on slate"
    ),
    HeldOut(
        "green_dark_foam",
        {
            "palettes": ("metallic_green",),
            "backgrounds": ("foam",),
            "background_color": (40, 42, 46),
        },
        203,
        "metallic green on dark grey foam",
    ),
    HeldOut(
        "brown_dark_card",
        {"palettes": ("dark_brown",), "backgrounds": ("card",), "background_color": (70, 60, 50)},
        204,
        "dark brown on dark brown card",
    ),
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    ap.add_argument("--config", default=None)
    ap.add_argument("--n-images", type=int, default=23, help="photos per collection")
    ap.add_argument("--n-templates", type=int, default=3, help="the first ones; one is used")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "tone"))
    ap.add_argument("--record", default=None)
    args = ap.parse_args(argv)
    recorder = Recorder(args.record or f"tone-{Path(args.checkpoint).stem}", args, args.device)
    model, info = benchmark_model(args)
    results = {"model": info, "collections": {}}
    print("| collection | lift | photos lifted | gamma | tone | body | mean of parts |")
    print("|---|---|---|---|---|---|---|")
    for spec in (*HELD_OUT, *DARK):
        coll = Path(args.out) / spec.name
        make_held_out(coll, spec, args.n_images, args.n_templates)
        template = load_coco_templates(coll / "templates.json", coll / "images").select(
            max_templates=1
        )
        tone = Tone.resolve(
            "auto",
            lambda: ((read_image(t.path), [i.mask for i in t.instances]) for t in template.images),
        )
        targets = sorted((coll / "images").iterdir())[args.n_templates :]
        gammas = [photo_gamma(read_image(p)) for p in targets] if tone.lifts else []
        lifted = [g for g in gammas if g < 1.0]
        entry = {
            "description": spec.description,
            "targets": len(targets),
            "lifts": tone.lifts,
            "photos_lifted": len(lifted),
            "gamma_range": [round(min(lifted), 3), round(max(lifted), 3)] if lifted else None,
            "tables": {},
        }
        # where the templates say no lift, also what a lift would have done (the rule's check)
        modes = {"none": "none", "auto": "auto"}
        if not tone.lifts:
            modes["lifted anyway"] = Tone("auto", True)
        for mode, setting in modes.items():
            table = score_collection(model, coll, 1, args.n_templates, tone=setting).table()
            entry["tables"][mode] = table
            gamma = "-" if not lifted else f"{min(lifted):.2f}-{max(lifted):.2f}"
            print(
                f"| {spec.name} | {'yes' if tone.lifts else 'no'} | {len(lifted)} | {gamma} "
                f"| {mode} | {table['body']:.3f} | {table['mean']:.3f} |",
                flush=True,
            )
        results["collections"][spec.name] = entry
    recorder.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
