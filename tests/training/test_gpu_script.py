"""The prepared GPU training command (scripts/pretrain_gpu.sh with the wheels of `make
gpu-kit`), dry-run on the CPU: a bare Python gets the project's packages from the kit
alone, trains for its time budget and returns the model in parts that make the
recorded checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# slow: builds the wheels (about a minute) and trains for a few 16-episode steps
@pytest.mark.slow
def test_gpu_script_trains_from_the_kit_for_its_budget(tmp_path):
    kit = tmp_path / "kit"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run(
        ["make", "-s", "gpu-kit", f"GPU_PYTHON={version}", f"KIT={kit}"], cwd=ROOT, check=True
    )
    assert {w.name.split("-")[0] for w in kit.glob("*.whl")} >= {
        "sam2",
        "hydra_core",
        "pycocotools",
    }
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "PYTHON": sys.executable,
        "KIT": str(kit),
        "SITE": str(tmp_path / "site"),
    }
    subprocess.run(
        ["bash", "scripts/pretrain_gpu.sh", "0.2", str(out), "1", "--learning_rate", "1e-4"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    record = json.loads((out / "sam2pal-micro-v13.training.json").read_text())
    assert record["stopped_by"] == "time budget" and record["steps_done"] >= 1
    assert record["settings"]["appearance"] == "mixed" and record["settings"]["minutes"] == 0.2
    assert record["settings"]["low_contrast_fraction"] == 0.4  # v6's to v12's episodes
    assert record["settings"]["repose_fraction"] == 0.5  # v11's and v12's
    assert record["settings"]["zoom_fraction"] == 0.4
    assert record["settings"]["learning_rate"] == 1e-4  # the flags after WORKERS override
    parts = sorted(out.glob("sam2pal-micro-v13.pt.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 1024 * 1024 for p in parts)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    assert digest == record["checkpoint_sha256"]
    assert (out / "sam2pal-micro-v13.heldout.csv").read_text().startswith("step,size,seconds")
