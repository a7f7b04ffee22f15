"""What production runs rely on, checked in CI: the conda envs agree with the pins of
constraints.txt and with pyproject.toml; every rule runs in one of them, the GPU rules in
the one with PyTorch; the Snakemake files are formatted (snakefmt --check); and the SLURM
profile, dry-run with the real slurm executor plugin, gives the GPU rules a GPU through
the `gpu` resource on the GPU partition and the others none."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import tomllib
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

# packages of the envs that pyproject.toml does not list itself: sam2 (installed apart,
# see the Makefile) and what sam2 and peft need with it, pinned in constraints.txt
NOT_IN_PYPROJECT = {"sam2", "torchvision", "transformers", "accelerate", "huggingface-hub"}
GPU_RULES = {"propagate", "finetune"}


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _env(path) -> tuple[str, dict[str, str]]:
    spec = yaml.safe_load(path.read_text())
    python, pip = None, []
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            pip += dep.get("pip", [])
        elif dep.startswith("python="):
            python = dep.split("=", 1)[1]
    assert spec["channels"] == ["conda-forge", "nodefaults"], path
    return python, _pins(pip)


def _rule_envs() -> dict[str, str]:
    """{rule: its conda env file name} of every rule of the workflow."""
    envs = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=(?:rule|checkpoint) )", smk.read_text())[1:]:
            name = block.split()[1].rstrip(":")
            found = re.search(r'conda:\s*\n\s*"\.\./\.\./envs/([\w.-]+)"', block)
            envs[name] = found.group(1) if found else None
    return envs


def test_conda_envs_agree_with_constraints_and_pyproject():
    constraints = _pins((REPO / "constraints.txt").read_text().splitlines())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        canonicalize_name(Requirement(r).name): Requirement(r).specifier
        for r in project["dependencies"]
    }
    requires_python = SpecifierSet(project["requires-python"])
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert [e.name for e in envs] == ["download.yaml", "propagate.yaml", "tables.yaml"]
    for path in envs:
        python, pins = _env(path)
        assert python and f"{python}.0" in requires_python, path
        for name, version in pins.items():
            if name == "pip":
                continue
            assert constraints.get(name) == version, (
                f"{path.name}: {name}=={version}, constraints.txt has {constraints.get(name)}"
            )
            if name not in NOT_IN_PYPROJECT:
                assert name in declared, (
                    f"{path.name}: {name} is not a dependency in pyproject.toml"
                )
                assert version in declared[name], (
                    f"{path.name}: {name}=={version} is outside pyproject's {declared[name]}"
                )
    # the GPU env has PyTorch and SAM2; the CPU envs do without PyTorch
    _, gpu = _env(REPO / "envs" / "propagate.yaml")
    assert {"torch", "sam2", "peft", "pycocotools"} <= set(gpu)
    _, tables = _env(REPO / "envs" / "tables.yaml")
    assert "torch" not in tables and {
        "ijson",
        "scikit-image",
        "matplotlib",
        "imageio-ffmpeg",
    } <= set(tables)
    # the PyPI wheel of torch is the CUDA build on Linux: no "+cpu" local version
    assert "+cpu" not in gpu["torch"]


def test_every_rule_runs_in_a_pinned_env_and_gpu_rules_in_the_torch_one():
    envs = _rule_envs()
    assert set(envs) >= GPU_RULES and "measure" in envs
    for rule, env in envs.items():
        if rule == "all":
            continue
        assert env is not None, f"rule {rule} has no conda env"
        assert (REPO / "envs" / env).is_file(), f"rule {rule}: envs/{env} does not exist"
        assert (env == "propagate.yaml") == (rule in GPU_RULES), rule


# the module each pinned package is imported as
IMPORT_NAMES = {
    "pillow": "PIL",
    "opencv-python-headless": "cv2",
    "scikit-image": "skimage",
    "pyyaml": "yaml",
    "imageio-ffmpeg": "imageio_ffmpeg",
    "ffmpeg-python": "ffmpeg",
    "hydra-core": "hydra",
    "huggingface-hub": "huggingface_hub",
}
# the sam2pal modules each env's rules import (through their scripts)
ENV_MODULES = {
    "download.yaml": ["models.download", "models.registry", "smk"],
    "tables.yaml": [
        "inference.pipeline",
        "io.coco",
        "outputs.qc",
        "outputs.measure",
        "io.templates",
        "io.video",
        "outputs.evaluate",
        "outputs.visualize",
        "outputs.report",
        "outputs.review",
        "inference.shards",
        "smk",
    ],
    "propagate.yaml": [
        "inference.pipeline",
        "inference.engine",
        "models.build",
        "models.adapters",
        "training.palindrome",
        "inference.temporal",
        "models.gpu",
        "models.registry",
        "smk",
    ],
}
GUARD = r"""
import importlib.abc, sys
allowed = set(sys.argv[1].split(",")) - {""}

class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in allowed or top in sys.stdlib_module_names or top == "sam2pal":
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
            frame = frame.f_back
        caller = frame.f_globals.get("__name__", "") if frame is not None else ""
        if caller.startswith("sam2pal"):
            raise ImportError(f"{caller} imports {name}, which its conda env does not have")
        return None

sys.meta_path.insert(0, Guard())
sys.path.insert(0, sys.argv[2])
for module in sys.argv[3].split(","):
    __import__("sam2pal." + module)
"""


@pytest.mark.parametrize("env", sorted(ENV_MODULES))
def test_env_has_what_its_rules_import(env):
    """Importing the modules of an env's rules, with every third-party package that
    the env lacks made unimportable for sam2pal's own code."""
    _, pins = _env(REPO / "envs" / env)
    allowed = {IMPORT_NAMES.get(name, name.replace("-", "_")) for name in pins}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            GUARD,
            ",".join(sorted(allowed)),
            str(REPO / "src"),
            ",".join(ENV_MODULES[env]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_snakemake_files_are_formatted():
    result = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize(
    "command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"]
)
def test_python_code_passes_ruff(command):
    """`ruff check .` and `ruff format --check .` (settings in pyproject.toml)."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def slurm_dry_run():
    """The repository's config dry-run with the SLURM profile. Conda is swapped for
    env-modules (which no rule uses) because CI has no conda binary, and Snakemake
    checks for one even in a dry-run; everything else is the profile as shipped."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--profile",
            "profiles/slurm",
            "--sdm",
            "env-modules",
            "-n",
            "--forceall",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_slurm_profile(slurm_dry_run):
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["software-deployment-method"] == "conda"
    assert profile["jobs"] >= 1 and "CHANGE-ME" in profile["default-resources"]["slurm_account"]
    assert "slurm_extra" not in str(profile)
    default = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    assert "software-deployment-method" not in default and "executor" not in default
    assert default["keep-going"] and default["retries"] >= 1 and default["printshellcmds"]

    assert "Using profiles profiles/slurm" in slurm_dry_run
    jobs = re.findall(r"\nrule (\w+):\n(.*?)\n(?=\S)", slurm_dry_run, flags=re.S)
    seen = set()
    for rule, block in jobs:
        resources = (
            dict(
                item.split("=", 1)
                for item in re.search(r"resources: (.*)", block).group(1).split(", ")
            )
            if "resources:" in block
            else {}
        )
        seen.add(rule)
        assert "slurm_extra" not in resources and "gres" not in resources, rule
        if rule in GPU_RULES:
            assert (
                resources["gpu"] == "1"
                and resources["slurm_partition"] == "CHANGE-ME-gpu-partition"
            ), block
            assert int(resources["mem_mb"]) >= 4000 and int(resources["runtime"]) >= 60
        elif rule not in ("all", "download_model"):
            assert resources.get("gpu", "0") == "0", rule
            assert resources["slurm_partition"] == "CHANGE-ME-cpu-partition", rule
        if rule != "all" and "slurm_account" in resources:
            assert resources["slurm_account"] == "CHANGE-ME-account"
    assert {"propagate", "measure", "merge_predictions", "report_figures"} <= seen
