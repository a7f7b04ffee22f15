"""Rule apply_corrections: the collection's records with the reviewer's corrections in
place of the predictions (reviewed.jsonl), for merge_predictions and qc."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.corrections import apply_corrections  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    counts = apply_corrections(
        snakemake.input.records,
        snakemake.input.templates,
        snakemake.input.corrections,
        snakemake.output[0],
    )
    print(f"done: {counts}")
