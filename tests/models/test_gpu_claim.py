"""Several jobs on one server each take a free GPU (lock files, CUDA_VISIBLE_DEVICES
respected), and a GPU step asked to use CUDA where none is visible stops at once with
a clear message. The claims are made by real separate processes; the GPUs are named
the way a server shows them, so this runs without one."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO
from test_workflow import DEMO, snakemake

from sam2pal.errors import InputError
from sam2pal.models import gpu
from sam2pal.models.build import resolve_device

CLAIMER = """
import sys, time
from pathlib import Path
from sam2pal.models import gpu
keys = sys.argv[1].split(",")
index = gpu.claim(keys, folder=sys.argv[2], poll_s=0.1, log=lambda m: print(m, file=sys.stderr, flush=True))
print(keys[index], flush=True)
while not Path(sys.argv[3]).exists():
    time.sleep(0.05)
"""


def _claimer(keys, folder, stop):
    return subprocess.Popen(
        [sys.executable, "-c", CLAIMER, ",".join(keys), str(folder), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def test_each_job_takes_a_free_gpu_and_waits_when_all_are_taken(tmp_path):
    keys = gpu.gpu_keys(3, visible="GPU-aaaa,GPU-bbbb,GPU-cccc")
    assert keys == ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
    folder, stop = tmp_path / "locks", tmp_path / "stop"
    jobs = [_claimer(keys, folder, stop) for _ in range(3)]
    taken = [job.stdout.readline().strip() for job in jobs]
    assert sorted(taken) == keys  # three jobs, three different GPUs

    with pytest.raises(InputError, match="all 3 visible GPU"):
        gpu.claim(keys, folder=folder, wait=False)
    fourth = _claimer(keys, folder, tmp_path / "stop4")
    time.sleep(1.0)
    assert fourth.poll() is None  # waits for a GPU ...
    jobs[1].kill()  # ... and gets the one a (crashed) job held
    jobs[1].wait()
    assert fourth.stdout.readline().strip() == taken[1]
    assert "waiting for one" in fourth.stderr.readline()
    stop.touch()
    (tmp_path / "stop4").touch()
    for job in jobs + [fourth]:
        job.wait(timeout=30)

    # with every job gone, all GPUs are free again
    assert gpu.claim(keys, folder=folder, wait=False) == 0
    gpu.release()


def test_gpu_names():
    # CUDA_VISIBLE_DEVICES as a cluster or a user sets it: torch numbers only those
    assert gpu.gpu_keys(2, visible="2,3") == ["2", "3"]
    assert gpu.gpu_keys(2, visible=None) == ["0", "1"]
    # UUIDs, where torch tells them, name the physical GPU whatever the numbering
    assert gpu.gpu_keys(2, visible="0,1", uuids=["GPU-x", "GPU-y"]) == ["GPU-x", "GPU-y"]
    assert gpu.gpu_keys(1, visible="MIG-abc/1/2") == ["MIG-abc/1/2"]
    assert gpu._lock_file("MIG-abc/1/2", gpu.lock_dir()).name == "gpu-MIG-abc_1_2.lock"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_asked_without_a_gpu_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(InputError, match="no CUDA GPU is visible.*CUDA_VISIBLE_DEVICES=''"):
            resolve_device(spec)
    assert resolve_device("auto").type == "cpu"

    # in the workflow: the propagate job stops with that one line, before any model work
    config = {
        "collections": {
            "c": {"images": str(DEMO / "images"), "templates": str(DEMO / "templates.json")}
        },
        "model": {"checkpoint": "sam2pal-micro", "image_size": 64},
        "propagate": {"device": "cuda"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--configfile", "config.yaml", "--until", "propagate", check=False)
    assert result.returncode != 0
    assert (
        "sam2pal: error in rule propagate: device 'cuda' asked for, but no CUDA GPU is visible"
        in result.stderr
    )
    assert not list((tmp_path / "results" / "c" / "propagate").glob("*.jsonl"))
    log = (tmp_path / "logs" / "c" / "propagate" / "shard-0-of-1.log").read_text()
    assert "Traceback" not in log  # the one-line error, not a traceback
