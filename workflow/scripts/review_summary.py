"""Rule review_summary: the accuracy of the predictions against the corrections, from
the random sample of the review (the worst images apart, marked biased)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.corrections import review_summary  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    rows = review_summary(
        snakemake.input.records,
        snakemake.input.reviewed,
        snakemake.input.templates,
        snakemake.input.sample,
        snakemake.output[0],
        log=print,
    )
    print(f"{len(rows)} rows")
