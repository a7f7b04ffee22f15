"""Checkpoint extract_frames: a video's frames and their manifest (frames.csv)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.io.video import extract_frames  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    video = snakemake.params.video
    rows = extract_frames(
        snakemake.input[0],
        snakemake.output.frames,
        snakemake.output.manifest,
        fps=video["fps"],
        start=video["start"],
        end=video["end"],
        max_frames=video["max_frames"],
        max_size=video["max_size"],
        image_format=video["image_format"],
    )
    print(f"done: {len(rows)} frames")
