# Palindrome fine-tuning of SAM2 on a collection's unlabelled images (when
# finetune.enabled): the adapter it writes is what `propagate` segments with. Editing
# propagation (propagate.device included: the job reads it from the config),
# measurement or output settings does not retrain.


rule finetune:
    input:
        templates="results/{collection}/templates.json",
        pool=pool_paths,
        checkpoint=checkpoint_input,
        ground_truth=lambda wc: COLLECTIONS[wc.collection]["ground_truth"] or [],
        training_templates=training_template_files,
    output:
        directory("results/{collection}/finetune"),
    log:
        "logs/{collection}/finetune.log",
    benchmark:
        "logs/{collection}/finetune.benchmark.tsv"
    conda:
        "../../envs/propagate.yaml"
    threads: lambda wc: settings(wc.collection, "finetune")["threads"]
    resources:
        gpu=uses_gpu,
        mem_mb=lambda wc: settings(wc.collection, "finetune")["mem_mb"],
        runtime=lambda wc: settings(wc.collection, "finetune")["runtime"],
    params:
        pool_dir=lambda wc: pool_folder(wc.collection),
        model=lambda wc: settings(wc.collection, "model"),
        checkpoint_dir=config["model"]["checkpoint_dir"],
        training=finetune_settings,
        training_template_images=lambda wc: settings(wc.collection, "finetune")[
            "training_template_images"
        ],
    script:
        "../scripts/finetune.py"
