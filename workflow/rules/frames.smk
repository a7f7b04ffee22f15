# Video collections: the frames a video is segmented on, and their manifest
# (frames.csv: index, file, time_s). Frames are named 00000.jpg, 00001.jpg ... (0-based,
# SAM2's convention) so that keyframes can be annotated on them; run
#   snakemake --cores 1 results/<collection>/frames.csv
# first to get the frames to annotate.


checkpoint extract_frames:
    input:
        setting("collection", "video"),
    output:
        frames=directory("results/{collection}/frames"),
        manifest="results/{collection}/frames.csv",
    log:
        "logs/{collection}/extract_frames.log",
    wildcard_constraints:
        collection=collections_of("video"),
    conda:
        "../../envs/tables.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        video=extraction_settings,
    script:
        "../scripts/extract_frames.py"


rule index_frames:
    input:
        image_paths,
    output:
        "results/{collection}/frames.csv",
    log:
        "logs/{collection}/index_frames.log",
    wildcard_constraints:
        collection=collections_of("frames"),
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        frames=of_collection(image_dir),
        fps=setting("video_options", "fps"),
    script:
        "../scripts/index_frames.py"
