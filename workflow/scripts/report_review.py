"""Rule report_review: the review's accuracy estimate as a figure, for the report."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.report import write_review_plot  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    shown = write_review_plot(snakemake.input[0], snakemake.output[0])
    print(f"structures shown: {shown}")
