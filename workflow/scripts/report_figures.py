"""Rule report_figures: QC score distribution, head of the QC ranking, measurement
distributions per structure."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.report import write_measurement_plot, write_qc_summary  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    write_qc_summary(snakemake.input.qc, snakemake.output.qc_plot, snakemake.output.qc_head)
    counts = write_measurement_plot(snakemake.input.measurements, snakemake.output.measurements)
    print(f"measurements per structure: {counts}")
