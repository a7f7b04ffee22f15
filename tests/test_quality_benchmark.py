"""Helpers of the quality benchmarks: quality.py's reuse of an earlier record's rows,
cycle_reward.py's grown masks, mask_grid.py's fitted grids."""

from __future__ import annotations

import argparse
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import quality  # noqa: E402


def test_a_kept_oracle_is_taken_when_it_trained_as_many_steps(tmp_path):
    """`--keep oracle`: the earlier oracle row is taken (nothing trains) when its steps
    are those of the one-template palindrome's training log, and the shares of its gain
    that the palindrome rows reach are computed from it."""
    (tmp_path / "c-adapter").mkdir()
    (tmp_path / "c-adapter" / "training_log.csv").write_text("epoch,optimizer_steps\n1,30\n2,60\n")
    entry = {
        "methods": {
            "zero-shot (1 template)": {"mean": 0.2},
            quality.PALINDROME: {"mean": 0.25},
        },
        "palindrome_gain": 0.05,
    }
    kept = {"methods": {quality.ORACLE: {"mean": 0.3}}, "oracle_steps": 60}
    args = argparse.Namespace(lora_rank=8, lr=None)
    out = quality._oracle(args, None, tmp_path / "c", tmp_path, "c", entry, kept)
    assert out["methods"][quality.ORACLE] == {"mean": 0.3}
    assert out["oracle_steps"] == 60
    assert out["gap_closed"] == 0.5
    assert list(out["methods"])[-1] == quality.ORACLE


def test_cycle_reward_grows_and_shrinks_masks_by_whole_pixels():
    """benchmarks/cycle_reward.py: a mask grown by r pixels gains a border r pixels
    wide (a square), and shrinking undoes it."""
    import torch
    from cycle_reward import grown

    mask = torch.zeros(1, 1, 9, 9)
    mask[0, 0, 4, 4] = 1
    assert grown(mask, 0) is mask
    assert grown(mask, 1).sum() == 9 and grown(mask, 2).sum() == 25
    assert grown(mask, 2)[0, 0, 2:7, 2:7].all()
    assert torch.equal(grown(grown(mask, 2), -2), mask)
    assert grown(mask, -1).sum() == 0


def test_the_mask_grid_keeps_wide_structures_and_thin_ones_only_when_sharpened():
    """benchmarks/mask_grid.py: on a grid of 4-pixel cells, a plate many cells wide
    survives the cells' shares of it; a line one pixel wide fades from them (no cell is
    half covered), yet logits fitted to it bring back a band on the line; an empty mask
    scores 0."""
    import numpy as np
    from mask_grid import grid_ceiling

    masks = np.zeros((3, 96, 128), bool)
    masks[0, 20:70, 30:100] = True
    masks[1, 40, 10:120] = True
    best, coverage = grid_ceiling(masks, grid=24, steps=60)
    assert coverage[0] > 0.95 and best[0] >= coverage[0]
    assert coverage[1] == 0.0 and best[1] > 0.25
    assert best[2] == 0.0 and coverage[2] == 0.0
    assert (best <= 1.0).all()
