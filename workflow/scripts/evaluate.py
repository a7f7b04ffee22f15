"""Rule evaluate: IoU and Dice against the collection's ground truth."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.evaluate import evaluate  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    means = evaluate(snakemake.input.ground_truth, snakemake.input.predictions, snakemake.output[0])
    print(f"mean IoU per structure: {means}")
