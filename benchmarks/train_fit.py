"""Does the model segment the parts of specimens like those it was trained on? Zero-shot,
one template, per structure, on fresh episodes drawn from the model's own training
recipe (its NAME.training.json: appearance, body plans, contrast; from a seed no
training run used) beside the held-out episodes of its training record's held-out
curve (`pretrain.heldout_episodes`: the palettes, grounds and shapes of
`benchmarks/quality.py`, never trained on).

A structure missed on both is one the model has not learnt (train longer, weight the
loss towards it); one read on the training episodes and missed on the held-out ones is
a domain gap (widen the episodes). Four kinds of training episode: NEON beetle masks of
the training split and procedural insects, each as whole specimens and as zoomed crops
(a part filling 20-80 % of the frame, as `--zoom_fraction` draws them).

    .venv/bin/python -u benchmarks/train_fit.py --threads 1   # about 2 minutes

Writes benchmarks/results/train-fit.json (`--record`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import Recorder  # noqa: E402

#: the kinds of training episode: (procedural_fraction, zoom_fraction)
KINDS = {
    "beetles": (0.0, 0.0),
    "beetles, zoomed": (0.0, 1.0),
    "procedural": (1.0, 0.0),
    "procedural, zoomed": (1.0, 1.0),
}
#: the episodes' seed: no training run of the model used it
SEED = 1_000_003


def recipe(checkpoint: Path, problem) -> dict:
    """The training settings recorded beside `checkpoint` (NAME.training.json)."""
    record = checkpoint.with_name(checkpoint.name.removesuffix(".pt") + ".training.json")
    try:
        return json.loads(record.read_text())["settings"]
    except (OSError, ValueError, KeyError) as e:
        problem(f"{record}: no training record with the model's settings ({e})")


def per_structure(model, episodes) -> dict[str, dict]:
    """Mean IoU and count per structure over `episodes`, each tracked alone."""
    from sam2pal.training.pretrain import structure_ious

    ious: dict[str, list[float]] = {}
    for episode in episodes:
        for name, values in structure_ious(model, [episode]).items():
            ious.setdefault(name, []).extend(values)
    return {k: {"iou": round(float(np.mean(v)), 4), "n": len(v)} for k, v in sorted(ious.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="sam2pal-micro")
    ap.add_argument("--episodes", type=int, default=40, help="training episodes of each kind")
    ap.add_argument("--heldout", type=int, default=12, help="held-out targets per collection")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    ap.add_argument("--record", default="train-fit")
    args = ap.parse_args(argv)
    import torch

    from sam2pal.errors import InputError
    from sam2pal.models.build import build_model
    from sam2pal.models.download import resolve_checkpoint_digest
    from sam2pal.models.registry import config_for_checkpoint
    from sam2pal.training.pretrain import (
        PretrainSettings,
        draw_episode,
        heldout_episodes,
        split_masks,
    )

    try:
        checkpoint, digest = resolve_checkpoint_digest(args.checkpoint)
    except InputError as e:
        ap.error(str(e))
    settings = recipe(Path(checkpoint), ap.error)
    if args.threads:
        torch.set_num_threads(args.threads)
    recorder = Recorder(args.record, args)
    model = build_model(config_for_checkpoint(args.checkpoint), checkpoint)
    model.eval()
    known = {f.name for f in dataclasses.fields(PretrainSettings)}
    base = PretrainSettings(**{k: v for k, v in settings.items() if k in known})
    shapes = [m for _, m in split_masks()[0]]
    results = {"checkpoint_sha256": digest, "recipe": settings, "seed": SEED, "kinds": {}}
    with torch.no_grad():
        for kind, (procedural, zoom) in KINDS.items():
            s = dataclasses.replace(
                base, seed=SEED, procedural_fraction=procedural, zoom_fraction=zoom
            )
            episodes = (
                draw_episode(i, s, shapes, n_templates=1, second_target=False)
                for i in range(args.episodes)
            )
            results["kinds"][kind] = per_structure(model, episodes)
            print(kind, results["kinds"][kind], flush=True)
        results["held_out"] = {}
        for name, episodes in heldout_episodes(per_collection=args.heldout).items():
            results["held_out"][name] = per_structure(model, episodes)
            print(name, results["held_out"][name], flush=True)
    recorder.write(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
