"""The workflow run through SLURM with profiles/slurm: a single-node SLURM cluster on
this machine (tests/slurm_cluster.py), the real snakemake-executor-plugin-slurm
submitting every job with sbatch, and the results compared with a local run of the
same config.

The profile is used as shipped except for its CHANGE-ME placeholders (filled in a copy:
a `cpu` and a `gpu` partition, both on this node, and an account) and three settings on
the command line: conda off (`--sdm env-modules`, which no rule uses: the jobs run in
this .venv); job states read with squeue (`--slurm-status-command squeue`), because
this cluster has no accounting database: the plugin's default, sacct, only answers
"Slurm accounting storage is disabled" here, and the plugin would wait for ever; and
status checks 2 s apart instead of the plugin's 40 s
(`--slurm-init-seconds-before-status-checks`), which only shortens the waits between
the workflow's five levels of jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import slurm_cluster
import yaml
from conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DEMO = REPO / "resources" / "demo"
PARTITIONS = {"CHANGE-ME-cpu-partition": "cpu", "CHANGE-ME-gpu-partition": "gpu"}
ACCOUNT = "sam2pal-test"
GPU_RULES = {"propagate", "finetune"}
# outputs with the run's times, the repository's state then (a commit made between the
# two runs) and the run's own folder in them: compared as JSON without those
PROVENANCE = ("predictions.json", "provenance.json", ".run.json")
RUN_STATE = {"started", "finished", "date_created", "git_commit", "git_dirty"}


@pytest.fixture(scope="session")
def slurm():
    reason = slurm_cluster.ensure_installed()
    if reason:
        pytest.skip(reason)
    if slurm_cluster.memory_mb() < 4500:
        pytest.skip("the workflow's jobs ask SLURM for up to 4000 MB, more than this machine has")
    cluster = slurm_cluster.SlurmCluster(partitions=list(PARTITIONS.values()))
    try:
        try:
            cluster.start()
        except slurm_cluster.ClusterUnavailable as error:
            pytest.skip(str(error))
        yield cluster
    finally:
        cluster.stop()


def slurm_profile(folder: Path) -> Path:
    """profiles/slurm with its CHANGE-ME values replaced, nothing else changed."""
    text = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    filled = text.replace("CHANGE-ME-account", ACCOUNT)
    for placeholder, partition in PARTITIONS.items():
        filled = filled.replace(placeholder, partition)
    values = [line for line in filled.splitlines() if "CHANGE-ME" in line.split("#", 1)[0]]
    assert not values, f"placeholders the test does not know: {values}"
    profile = folder / "slurm"
    profile.mkdir(parents=True)
    (profile / "config.yaml").write_text(filled)
    return profile


def snakemake(workdir: Path, *args: str, env=None, cluster=None, timeout: float = 600) -> str:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir, env=env
        )
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(
            errors="replace"
        )
        queue = cluster.jobs() if cluster else ""
        logs = cluster.logs() if cluster else ""
        raise AssertionError(
            f"snakemake ran more than {timeout} s:\n{output[-6000:]}\n{queue}\n{logs}"
        ) from None
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"snakemake failed ({result.returncode}):\n{output[-8000:]}"
    return output


def planned_rules(output: str) -> set[str]:
    table = output.split("Job stats:")[1].split("total")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip()} - {"all"}


def normalised(value, workdir: str):
    """A JSON value without RUN_STATE, with the run's folder as <workdir>."""
    if isinstance(value, dict):
        return {k: normalised(v, workdir) for k, v in value.items() if k not in RUN_STATE}
    if isinstance(value, list):
        return [normalised(v, workdir) for v in value]
    if isinstance(value, str):
        return value.replace(workdir, "<workdir>")
    return value


def collection(tmp_path: Path) -> Path:
    """Four photos, one template photo (COCO), the random-weight model on the CPU."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("specimen_002.jpg", "specimen_003.jpg", "specimen_004.jpg", "specimen_005.jpg"):
        shutil.copy(DEMO / "images" / name, photos / name)
    templates = json.loads((DEMO / "templates.json").read_text())
    first = templates["images"][0]["id"]
    templates["images"] = templates["images"][:1]
    templates["annotations"] = [a for a in templates["annotations"] if a["image_id"] == first]
    (tmp_path / "templates.json").write_text(json.dumps(templates))
    config = {
        "collections": {
            "beetles": {
                "images": str(photos),
                "templates": str(tmp_path / "templates.json"),
                "template_images": str(DEMO / "images"),
            }
        },
        "model": {"checkpoint": "random", "image_size": 64},
        # memory and time that SLURM must be asked for (see the squeue check)
        "propagate": {"device": "cpu", "threads": 2, "mem_mb": 2000, "runtime": 20},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_workflow_through_slurm_matches_a_local_run(slurm, tmp_path):
    config = collection(tmp_path)
    local, remote = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    remote.mkdir()
    local_out = snakemake(local, "--cores", "2", "--configfile", str(config))
    rules = planned_rules(local_out)
    assert {"propagate", "merge_predictions", "measure", "qc"} <= rules

    env = dict(
        slurm.env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    env.pop("SNAKEMAKE_PROFILE", None)
    profile = slurm_profile(tmp_path / "profiles")
    out = snakemake(
        remote,
        "--profile",
        str(profile),
        "--sdm",
        "env-modules",
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--configfile",
        str(config),
        env=env,
        cluster=slurm,
    )
    assert f"Using profile {profile}" in out or f"Using profiles {profile}" in out, out[:2000]

    # every job of the workflow went through sbatch and finished as a SLURM job
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out))
    jobs = {job["id"]: job for job in slurm.jobs(run_id)}
    assert set(jobs) == set(submitted.values()) and len(jobs) == len(rules), (
        jobs,
        submitted,
        out[-4000:],
    )
    ran = {}
    for job_id, job in jobs.items():
        rule = re.match(r"rule_(\w+?)(?:_wildcards_|$)", job["comment"]).group(1)
        ran[rule] = job_id
        assert job["state"] == "COMPLETED", job
        assert job["account"] == ACCOUNT, job
        # the profile's GPU partition for the GPU rules, the CPU one for the others
        assert job["partition"] == ("gpu" if rule in GPU_RULES else "cpu"), job
        # run by this .venv's Python (snakemake's job step inside the job)
        assert f"{sys.executable} -m snakemake" in slurm.batch_script(job_id), job
    assert set(ran) == rules, (ran, rules)
    # propagate asks SLURM for the config's memory, time and threads
    assert (
        jobs[ran["propagate"]]["memory"] == "2000M"
        and jobs[ran["propagate"]]["time_limit"] == "20:00"
    )
    assert jobs[ran["propagate"]]["cpus"] == "2"
    completions = slurm.jobcomp.read_text()
    for job_id in jobs:
        assert re.search(
            rf"JobId={job_id} .*JobState=COMPLETED .*Account={ACCOUNT} ", completions
        ), job_id

    # the same results as the local run: every file byte for byte, the provenance
    # records without their run times and run folders
    local_files = sorted(
        p.relative_to(local) for p in (local / "results").rglob("*") if p.is_file()
    )
    remote_files = sorted(
        p.relative_to(remote) for p in (remote / "results").rglob("*") if p.is_file()
    )
    assert remote_files == local_files
    names = {p.name for p in local_files}
    assert {
        "predictions.json",
        "measurements.csv",
        "measurements_wide.csv",
        "qc.csv",
        "provenance.json",
    } <= names
    for path in local_files:
        if path.name.endswith(PROVENANCE):
            a = normalised(json.loads((local / path).read_text()), str(local))
            b = normalised(json.loads((remote / path).read_text()), str(remote))
            assert a == b, path
        else:
            assert (local / path).read_bytes() == (remote / path).read_bytes(), path
    predictions = json.loads((remote / "results" / "beetles" / "predictions.json").read_text())
    assert len(predictions["images"]) == 4 and predictions["annotations"]
