# Figures and tables of the HTML report: `snakemake --report report.html` after a run.
# Each collection gets its QC ranking and score distribution, a gallery of overlays (the
# worst images and a random sample), its measurement distributions per structure, its
# metrics against ground truth and its training curves where there are some, and its
# provenance. All read the collection's files as streams (sam2pal.outputs.report).


rule report_gallery:
    input:
        predictions="results/{collection}/predictions.json",
        qc="results/{collection}/qc.csv",
    output:
        report(
            directory("results/{collection}/report/gallery"),
            patterns=["{name}.jpg"],
            caption="../report/gallery.rst",
            category="{collection}",
            subcategory="Overlays: worst and random",
        ),
    log:
        "logs/{collection}/report_gallery.log",
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        image_dir=of_collection(image_dir),
        size=setting("outputs", "gallery_size"),
        seed=setting("model", "seed"),
    script:
        "../scripts/report_gallery.py"


rule report_figures:
    input:
        qc="results/{collection}/qc.csv",
        measurements="results/{collection}/measurements.csv",
    output:
        qc_plot=report(
            "results/{collection}/report/qc_scores.png",
            caption="../report/qc.rst",
            category="{collection}",
            subcategory="Quality control",
        ),
        qc_head=report(
            "results/{collection}/report/qc_worst.csv",
            caption="../report/qc_table.rst",
            category="{collection}",
            subcategory="Quality control",
        ),
        measurements=report(
            "results/{collection}/report/measurements.png",
            caption="../report/measurements.rst",
            category="{collection}",
            subcategory="Measurements",
        ),
    log:
        "logs/{collection}/report_figures.log",
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    script:
        "../scripts/report_figures.py"


rule report_training:
    input:
        "results/{collection}/finetune",
    output:
        curves=report(
            "results/{collection}/report/training_curves.png",
            caption="../report/training.rst",
            category="{collection}",
            subcategory="Fine-tuning",
        ),
        log=report(
            "results/{collection}/report/training_log.csv",
            caption="../report/training.rst",
            category="{collection}",
            subcategory="Fine-tuning",
        ),
    log:
        "logs/{collection}/report_training.log",
    localrule: True
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../scripts/report_training.py"
