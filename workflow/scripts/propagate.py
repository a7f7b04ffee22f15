"""Rule propagate: segment one shard of a collection's images from the template memory
(the model is loaded once per shard)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.inference import pipeline  # noqa: E402
from sam2pal.inference import shards as sharding  # noqa: E402
from sam2pal.models.registry import choose_config  # noqa: E402
from sam2pal.smk import collection_settings, logged  # noqa: E402

with logged(snakemake):
    model = snakemake.params.model
    prop = snakemake.params.propagate
    image_dir = snakemake.params.image_dir
    common = dict(
        config=choose_config(model["config"], model["checkpoint"]),
        checkpoint=model["checkpoint"],
        image_size=model["image_size"],
        seed=model["seed"],
        # read here, not a rule param: changing the device reruns nothing
        device=collection_settings(snakemake, "propagate")["device"],
        threads=snakemake.threads,
        on_bad_image=prop["on_bad_image"],
        # read here too: changing the limit re-segments nothing
        max_skipped_fraction=collection_settings(snakemake, "propagate")["max_skipped_fraction"],
        checkpoint_dir=snakemake.params.checkpoint_dir,
        adapter=snakemake.params.adapter,
        engine_settings={key: prop[key] for key in pipeline.DEFAULT_ENGINE_SETTINGS},
    )
    # read here too: the batch size changes no mask, so changing it reruns nothing
    batch_size = collection_settings(snakemake, "propagate")["batch_size"]
    outputs = (snakemake.output.records, snakemake.output.run)
    shard = {"shard": snakemake.wildcards.shard}
    if snakemake.params.video_mode:
        counts = pipeline.segment_video(
            snakemake.input.templates,
            image_dir,
            snakemake.input.frames[0],
            *outputs,
            mode=snakemake.params.video_mode,
            run_extra=shard,
            # video mode tracks one frame after the other: batches only for independent frames
            batch_size=batch_size if snakemake.params.video_mode == "independent" else 1,
            **common,
        )
    else:
        names = pipeline.relative_names(snakemake.input.images, image_dir)
        folder = Path(snakemake.output.records).parent
        counts = pipeline.segment(
            snakemake.input.templates,
            image_dir,
            names,
            *outputs,
            reuse=sharding.reusable_results(folder, snakemake.wildcards.shard),
            run_extra=dict(shard, images_sha256=sharding.names_digest(names)),
            batch_size=batch_size,
            **common,
        )
        sharding.keep_done(*outputs)
    print(f"done: {counts}")
