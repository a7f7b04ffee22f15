# Segment every image of a collection from the template memory (GPU when there is
# one). Results are written image by image; an interrupted photo run resumes where
# it stopped. A video is tracked through time from its keyframes (video.mode: video)
# or frame by frame from them (independent).


rule propagate:
    input:
        templates="results/{collection}/templates.json",
        images=image_paths,
        frames=manifest_input,
        checkpoint=checkpoint_input,
        adapter=adapter_input,
    output:
        records="results/{collection}/propagate/predictions.jsonl",
        run="results/{collection}/propagate/run.json",
        skipped="results/{collection}/skipped.csv",
    params:
        image_dir=lambda wc: image_dir(wc.collection),
        video_mode=lambda wc: video_settings(wc)["mode"] if is_video(wc.collection) else None,
        model=lambda wc: settings(wc.collection, "model"),
        checkpoint_dir=config["model"]["checkpoint_dir"],
        propagate=propagate_params,
        adapter=lambda wc: adapter_folder(wc.collection),
    log:
        "logs/{collection}/propagate.log",
    benchmark:
        "logs/{collection}/propagate.benchmark.tsv"
    conda:
        "../../envs/propagate.yaml"
    threads: lambda wc: settings(wc.collection, "propagate")["threads"]
    resources:
        gpu=uses_gpu,
        mem_mb=lambda wc: settings(wc.collection, "propagate")["mem_mb"],
        runtime=lambda wc: settings(wc.collection, "propagate")["runtime"],
    script:
        "../scripts/propagate.py"
