"""The committed record of a benchmark run: `benchmarks/results/<name>.json`.

Every figure in the README comes from one of these files (`benchmarks/readme_figures.py`
writes the README's figure blocks from them, and a test checks that the README agrees).
A record holds the results and what is needed to judge and repeat them: the exact
command, when it ran, the machine (CPU model, cores, memory, GPU, load average at start
and end: other work on the machine slows a benchmark down), the package versions and
the sam2-pal commit.

    from record import Recorder
    rec = Recorder("propagate", args)        # at the start of the run
    ...
    path = rec.write(results)                # at the end
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the committed records; SAM2PAL_BENCHMARK_RESULTS redirects new ones (the tests use it)
RESULTS = ROOT / "benchmarks" / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine(device: str = "cpu") -> dict:
    """What the run ran on."""
    info = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gb": _memory_gb(),
    }
    if str(device).startswith("cuda"):
        try:
            import torch

            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        except Exception as exc:  # noqa: BLE001 - a record of a failed probe, not a result
            info["gpu"] = f"unknown ({type(exc).__name__})"
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    from importlib import metadata

    for dist in (
        "torch",
        "sam2",
        "sam2pal",
        "numpy",
        "opencv-python-headless",
        "scikit-image",
        "snakemake",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> dict:
    def git(*args):
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "local_edits": bool(status) if status is not None else None}


class Recorder:
    """Collects the run's context at the start, writes the record at the end."""

    def __init__(self, name: str, args=None, device: str = "cpu"):
        self.name = name
        self.args = (
            {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            if args
            else {}
        )
        script = Path(sys.argv[0])
        try:
            script = script.resolve().relative_to(ROOT)
        except ValueError:
            pass
        self.record = {
            "benchmark": name,
            "command": shlex.join([".venv/bin/python", str(script), *sys.argv[1:]]),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(device),
            "load_average_at_start": _loadavg(),
            "versions": versions(),
            "sam2pal_git": git_commit(),
            "args": self.args,
        }

    def write(self, results: dict, path: Path | None = None) -> Path:
        """Write `benchmarks/results/<name>.json` (or `path`) atomically and return it."""
        record = dict(self.record)
        record["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        record["load_average_at_end"] = _loadavg()
        record["results"] = results
        folder = Path(os.environ.get("SAM2PAL_BENCHMARK_RESULTS") or RESULTS)
        path = Path(path) if path else folder / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
        print(f"wrote {path}")
        return path


def load(name: str) -> dict:
    """A committed record by name (`benchmarks/results/<name>.json`)."""
    return json.loads((RESULTS / f"{name}.json").read_text())
