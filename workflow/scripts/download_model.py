"""Rule download_model: fetch an official checkpoint and check its SHA-256."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.models.download import download_model  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    path = download_model(snakemake.wildcards.model_file, Path(snakemake.output[0]).parent)
    print(f"{path}: ok")
