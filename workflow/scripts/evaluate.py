"""Rule evaluate: IoU and Dice against the collection's ground truth; templates,
keyframes and images whose true masks the fine-tuning saw are scored apart."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.outputs.evaluate import evaluate  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    finetune = snakemake.input.finetune
    means = evaluate(
        snakemake.input.ground_truth,
        snakemake.input.predictions,
        snakemake.output[0],
        templates=snakemake.input.templates,
        finetune_record=finetune[0] if finetune else None,
        log=print,
    )
    print(f"mean IoU per structure (targets): {means}")
