"""Rule finetune: palindrome fine-tuning on the collection's unlabelled images."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.inference import pipeline  # noqa: E402
from sam2pal.models.registry import choose_config  # noqa: E402
from sam2pal.smk import collection_settings, logged  # noqa: E402

with logged(snakemake):
    model = snakemake.params.model
    pool_dir = snakemake.params.pool_dir
    extra = snakemake.input.training_templates
    image_dir = snakemake.params.training_template_images
    result = pipeline.finetune(
        snakemake.input.templates,
        pool_dir,
        pipeline.relative_names(snakemake.input.pool, pool_dir),
        snakemake.output[0],
        config=choose_config(model["config"], model["checkpoint"]),
        checkpoint=model["checkpoint"],
        image_size=model["image_size"],
        seed=model["seed"],
        # read here, not a rule param: changing the device does not retrain
        device=collection_settings(snakemake, "propagate")["device"],
        threads=snakemake.threads,
        settings=snakemake.params.training,
        ground_truth=snakemake.input.ground_truth or None,
        extra_templates=[(path, image_dir or Path(path).parent) for path in extra],
        checkpoint_dir=snakemake.params.checkpoint_dir,
        # propagate.framing, framing_fill and zoom...: the images are framed, and the
        # zoom pass's windows cut, as for segmentation
        **snakemake.params.propagate,
    )
    print(f"best epoch: {result['best_epoch']}")
