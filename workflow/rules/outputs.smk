# From per-shard results to the files users read: COCO predictions and their
# provenance, QC ranking,
# measurement tables, metrics against ground truth, mask PNGs, overlays and, for a
# video, an overlay video.


rule merge_predictions:
    input:
        # the shards' results, or reviewed.jsonl with a collection's corrections
        records=collection_records,
        runs=shard_results(".run.json"),
        templates="results/{collection}/templates.json",
    output:
        predictions="results/{collection}/predictions.json",
        provenance=report(
            "results/{collection}/provenance.json",
            caption="../report/provenance.rst",
            category="{collection}",
            subcategory="Provenance",
        ),
        skipped="results/{collection}/skipped.csv",
    log:
        "logs/{collection}/merge_predictions.log",
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        polygons=setting("outputs", "polygons"),
        config=provenance_config,
    script:
        "../scripts/merge_predictions.py"


rule qc:
    input:
        records=collection_records,
        templates="results/{collection}/templates.json",
    output:
        "results/{collection}/qc.csv",
    log:
        "logs/{collection}/qc.log",
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    script:
        "../scripts/qc.py"


rule measure:
    input:
        predictions="results/{collection}/predictions.json",
        calibration=setting("collection", "calibration_csv", empty=[]),
    output:
        long="results/{collection}/measurements.csv",
        wide="results/{collection}/measurements_wide.csv",
    log:
        "logs/{collection}/measure.log",
    conda:
        "../../envs/tables.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        px_per_mm=setting("collection", "px_per_mm"),
    script:
        "../scripts/measure.py"


rule evaluate:
    input:
        predictions="results/{collection}/predictions.json",
        ground_truth=setting("collection", "ground_truth"),
        # templates (keyframes) and the adapter's record of the true masks its
        # training saw: those rows are scored apart from the targets
        templates="results/{collection}/templates.json",
        finetune=adapter_input,
    output:
        report(
            "results/{collection}/metrics.csv",
            caption="../report/metrics.rst",
            category="{collection}",
            subcategory="Metrics",
        ),
    log:
        "logs/{collection}/evaluate.log",
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    script:
        "../scripts/evaluate.py"


rule export_masks:
    input:
        "results/{collection}/predictions.json",
    output:
        directory("results/{collection}/masks"),
    log:
        "logs/{collection}/export_masks.log",
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        category_prefix=setting("outputs", "mask_category_prefix"),
    script:
        "../scripts/export_masks.py"


rule overlays:
    input:
        "results/{collection}/predictions.json",
    output:
        directory("results/{collection}/overlays"),
    log:
        "logs/{collection}/overlays.log",
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        image_dir=of_collection(image_dir),
        max_side=setting("outputs", "overlay_max_side"),
    script:
        "../scripts/overlays.py"


rule overlay_video:
    input:
        predictions="results/{collection}/predictions.json",
        frames=manifest_input,
    output:
        "results/{collection}/overlay.mp4",
    log:
        "logs/{collection}/overlay_video.log",
    wildcard_constraints:
        collection=collections_of("video", "frames"),
    conda:
        "../../envs/tables.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        image_dir=of_collection(image_dir),
        fps=setting("outputs", "overlay_video_fps"),
        max_side=setting("outputs", "overlay_max_side"),
    script:
        "../scripts/overlay_video.py"
