"""Rule review_export: the review sample for Label Studio and/or CVAT."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.review import export_review  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    results = Path(snakemake.input.qc).parent
    export_review(
        results,
        snakemake.params.image_dir,
        snakemake.output[0],
        top=snakemake.params.top,
        n_random=snakemake.params.random,
        seed=snakemake.params.seed,
        formats=snakemake.params.formats,
    )
