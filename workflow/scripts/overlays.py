"""Rule overlays: the photos with their predicted structures drawn on."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.visualize import write_overlays  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    n = write_overlays(
        snakemake.input[0],
        snakemake.params.image_dir,
        snakemake.output[0],
        max_side=snakemake.params.max_side,
    )
    print(f"{n} overlays written")
