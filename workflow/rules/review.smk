# A sample of a collection's results to correct in Label Studio or CVAT: the worst
# images by QC and a seeded random sample (sam2pal.outputs.review). Made when asked for
# (`snakemake results/<collection>/review`) or in every run with review.enabled.
#
# Corrections back (sam2pal.outputs.corrections): a collection's `corrections` (Label
# Studio JSON or COCO exports of reviewed images) replace its predictions after the
# segmentation. apply_corrections writes the records with the corrections applied
# (reviewed.jsonl), which merge_predictions and qc read instead of the shards' results,
# so adding or editing a corrections file reruns the tables and pictures only, never the
# segmentation or the fine-tuning. With `review_sample`, review_summary.csv estimates the
# collection's accuracy from the random sample of the review.


rule review_export:
    input:
        predictions="results/{collection}/predictions.json",
        qc="results/{collection}/qc.csv",
        templates="results/{collection}/templates.json",
    output:
        directory("results/{collection}/review"),
    log:
        "logs/{collection}/review_export.log",
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        image_dir=of_collection(image_dir),
        top=setting("review", "top"),
        random=setting("review", "random"),
        seed=setting("review", "seed"),
        formats=setting("review", "formats"),
    script:
        "../scripts/review_export.py"


rule apply_corrections:
    input:
        records=shard_results(".jsonl"),
        templates="results/{collection}/templates.json",
        corrections=of_collection(corrections_files),
    output:
        "results/{collection}/reviewed.jsonl",
    log:
        "logs/{collection}/apply_corrections.log",
    wildcard_constraints:
        collection=corrected_collections(),
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    script:
        "../scripts/apply_corrections.py"


rule review_summary:
    input:
        records=shard_results(".jsonl"),
        reviewed="results/{collection}/reviewed.jsonl",
        templates="results/{collection}/templates.json",
        sample=setting("collection", "review_sample"),
    output:
        report(
            "results/{collection}/review_summary.csv",
            caption="../report/review.rst",
            category="{collection}",
            subcategory="Review",
        ),
    log:
        "logs/{collection}/review_summary.log",
    wildcard_constraints:
        collection=corrected_collections(),
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    script:
        "../scripts/review_summary.py"


rule report_review:
    input:
        "results/{collection}/review_summary.csv",
    output:
        report(
            "results/{collection}/report/review.png",
            caption="../report/review.rst",
            category="{collection}",
            subcategory="Review",
        ),
    log:
        "logs/{collection}/report_review.log",
    wildcard_constraints:
        collection=corrected_collections(),
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    script:
        "../scripts/report_review.py"
