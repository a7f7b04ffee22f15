"""Rule merge_predictions: COCO predictions file (provenance in its info),
provenance.json and skipped.csv, from the results of every shard."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal import pipeline  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    counts = pipeline.merge(
        snakemake.input.records,
        snakemake.input.templates,
        snakemake.input.runs,
        snakemake.output.predictions,
        polygons=snakemake.params.polygons,
        provenance_json=snakemake.output.provenance,
        config=snakemake.params.config,
        collection=snakemake.wildcards.collection,
        skipped_csv=snakemake.output.skipped,
    )
    print(f"done: {counts}")
