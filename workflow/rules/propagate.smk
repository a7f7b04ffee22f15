# Segment every image of a collection from the template memory (GPU when there is
# one), one job per shard of images (propagate.shard_size; see sam2pal.inference.shards): adding
# images reruns only the shards they land in, and a finished collection keeps its
# shards when shard_size changes. Each job loads the model once, takes the finished
# results of its images from earlier shard files instead of segmenting them again,
# and writes its results image by image; an interrupted photo shard resumes where it
# stopped. The device is read from the config inside the job (changing it reruns
# nothing). A video is one shard, tracked through time from its keyframes
# (video.mode: video) or frame by frame from them (independent).


rule propagate:
    input:
        templates="results/{collection}/templates.json",
        images=shard_image_paths,
        frames=manifest_input,
        checkpoint=checkpoint_input,
        adapter=adapter_input,
    output:
        records="results/{collection}/propagate/shard-{shard}.jsonl",
        run="results/{collection}/propagate/shard-{shard}.run.json",
    log:
        "logs/{collection}/propagate/shard-{shard}.log",
    benchmark:
        "logs/{collection}/propagate/shard-{shard}.benchmark.tsv"
    conda:
        "../../envs/propagate.yaml"
    threads: setting("propagate", "threads")
    resources:
        gpu=uses_gpu,
        mem_mb=setting("propagate", "mem_mb"),
        runtime=setting("propagate", "runtime"),
    params:
        image_dir=of_collection(image_dir),
        video_mode=of_collection(video_mode),
        model=section("model"),
        checkpoint_dir=config["model"]["checkpoint_dir"],
        propagate=propagate_params,
        adapter=of_collection(adapter_folder),
    script:
        "../scripts/propagate.py"
