"""Rule report_gallery: overlays of the worst and of randomly picked images."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.report import write_gallery  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    count = write_gallery(
        snakemake.input.predictions,
        snakemake.input.qc,
        snakemake.params.image_dir,
        snakemake.output[0],
        size=snakemake.params.size,
        seed=snakemake.params.seed,
    )
    print(f"{count} overlays")
