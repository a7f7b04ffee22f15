"""Rule measure: long and wide measurement tables."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.measure import measure_coco  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    summary = measure_coco(
        snakemake.input.predictions,
        snakemake.output.long,
        px_per_mm=snakemake.params.px_per_mm,
        calibration_csv=snakemake.input.calibration or None,
        wide_csv=snakemake.output.wide,
        threads=snakemake.threads,
    )
    print(f"done: {summary}")
