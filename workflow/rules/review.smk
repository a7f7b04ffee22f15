# A sample of a collection's results to correct in Label Studio or CVAT: the worst
# images by QC and a seeded random sample (sam2pal.outputs.review). Made when asked for
# (`snakemake results/<collection>/review`) or in every run with review.enabled.


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
