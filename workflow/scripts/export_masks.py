"""Rule export_masks: one PNG per predicted structure."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.visualize import export_masks  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    n = export_masks(
        snakemake.input[0], snakemake.output[0], category_prefix=snakemake.params.category_prefix
    )
    print(f"{n} masks written")
