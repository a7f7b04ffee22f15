"""Every measured figure in the README comes from a committed benchmark record.

The README's figure blocks are written by `benchmarks/readme_figures.py` from
`benchmarks/results/*.json`; these tests check that the README agrees with the records,
that each record says what produced it, and that a benchmark really writes such a record.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import REPO

RESULTS = REPO / "benchmarks" / "results"


def test_readme_figures_agree_with_the_records():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "readme_figures.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    blocks = re.findall(r"<!-- figures:([\w-]+) -->", (REPO / "README.md").read_text())
    assert {"quality", "propagate", "finetune", "video", "merge-measure"} <= set(blocks)


def test_every_record_says_what_produced_it():
    records = sorted(RESULTS.glob("*.json"))
    assert records, "no benchmark records committed"
    for path in records:
        rec = json.loads(path.read_text())
        assert rec["command"].startswith(".venv/bin/python benchmarks/"), path
        for key in ("started", "finished", "machine", "versions", "sam2pal_git", "results"):
            assert rec.get(key), f"{path.name} lacks {key}"
        assert rec["machine"]["cpu_count"] >= 1 and rec["machine"]["cpu"], path
        assert rec["versions"]["torch"] and rec["versions"]["python"], path
        # every record is cited by the README
        assert f"benchmarks/results/{path.name}" in (REPO / "README.md").read_text(), (
            f"{path.name} is not used"
        )


def test_a_benchmark_writes_its_record(tmp_path):
    env = dict(os.environ, SAM2PAL_BENCHMARK_RESULTS=str(tmp_path / "results"))
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "merge_measure.py"),
            "--images",
            "40",
            "--shards",
            "2",
            "--threads",
            "1",
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads((tmp_path / "results" / "merge_measure.json").read_text())
    assert rec["command"] == (
        ".venv/bin/python benchmarks/merge_measure.py --images 40 --shards 2 "
        f"--threads 1 --work {tmp_path / 'work'}"
    )
    assert rec["args"]["images"] == 40
    steps = rec["results"]["steps"]
    assert set(steps) == {"merge", "qc", "measure", "json.load"}
    assert steps["merge"]["result"]["annotations"] == 40 * rec["results"]["structures"]
    assert all(step["seconds"] >= 0 and step["peak_mb"] > 0 for step in steps.values())
