"""The package's layout keeps its one hard boundary: the modules that read and write
files (`sam2pal.io`) and make the tables and pictures (`sam2pal.outputs`) import no torch,
so the workflow's light `tables` environment and the Snakemake process itself can use
them."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import sam2pal.io
import sam2pal.outputs

LIGHT_MODULES = [
    f"{package.__name__}.{info.name}"
    for package in (sam2pal.io, sam2pal.outputs)
    for info in pkgutil.iter_modules(package.__path__)
] + ["sam2pal.settings"]  # read by the Snakemake process (workflow/rules/common.smk)


def test_the_light_packages_are_not_empty():
    assert "sam2pal.io.coco" in LIGHT_MODULES
    assert "sam2pal.outputs.measure" in LIGHT_MODULES


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_module_imports_no_torch(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(name for name in ('torch', 'sam2', 'peft') if name in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"{module} imports {result.stdout.strip()}"
