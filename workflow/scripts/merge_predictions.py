"""Rule merge_predictions: COCO predictions file (provenance in its info),
provenance.json and skipped.csv, from the results of every shard; stops when more
of the collection's images were skipped than propagate.max_skipped_fraction allows."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.inference import pipeline  # noqa: E402
from sam2pal.smk import collection_settings, logged  # noqa: E402

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
        # read here, not a rule param: changing the limit redoes nothing that succeeded
        max_skipped_fraction=collection_settings(snakemake, "propagate")["max_skipped_fraction"],
        log=print,
    )
    print(f"done: {counts}")
