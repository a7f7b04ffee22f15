"""Rule report_training: the fine-tuning curves and log, for the report."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.report import copy_training_record  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    copy_training_record(snakemake.input[0], snakemake.output.curves, snakemake.output.log)
