"""Rule overlay_video: a video collection's frames with their structures drawn on, as mp4."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.visualize import write_overlay_video  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    n = write_overlay_video(
        snakemake.input.predictions,
        snakemake.params.image_dir,
        snakemake.output[0],
        fps=snakemake.params.fps,
        max_side=snakemake.params.max_side,
        manifest_csv=snakemake.input.frames[0],
    )
    print(f"{n} frames written")
