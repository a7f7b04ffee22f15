"""Rule index_frames: the manifest (frames.csv) of a folder of extracted frames."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.io.video import frames_from_dir  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    rows = frames_from_dir(snakemake.params.frames, snakemake.output[0], fps=snakemake.params.fps)
    print(f"done: {len(rows)} frames")
