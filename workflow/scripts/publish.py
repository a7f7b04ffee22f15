"""Rule publish: the collection's Darwin Core Archive and ImageJ/Fiji ROI sets."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.publish import write_dwca, write_roi_sets  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    counts = write_dwca(
        Path(snakemake.input.predictions).parent,
        snakemake.output.dwca,
        sample_sheet=snakemake.input.sample_sheet or None,
    )
    rois = write_roi_sets(snakemake.input.predictions, snakemake.output.roi)
    print(f"done: {counts}, {rois} ROIs")
