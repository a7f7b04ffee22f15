"""Rule qc: rank the collection's images for review."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.inference import pipeline  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    rows = pipeline.qc(snakemake.input.records, snakemake.input.templates, snakemake.output[0])
    print(f"{rows} images ranked")
