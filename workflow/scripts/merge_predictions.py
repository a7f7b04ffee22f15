"""Rule merge_predictions: COCO predictions file with provenance in its info."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal import pipeline  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    counts = pipeline.merge(
        [snakemake.input.records],
        snakemake.input.templates,
        [snakemake.input.run],
        snakemake.output[0],
        polygons=snakemake.params.polygons,
    )
    print(f"done: {counts}")
