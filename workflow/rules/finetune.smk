# Palindrome fine-tuning of SAM2 on a collection's unlabelled images (when
# finetune.enabled): the adapter it writes is what `propagate` segments with. Editing
# propagation (propagate.device included: the job reads it from the config),
# measurement or output settings does not retrain, except propagate.framing and
# framing_fill: the training frames its images as the segmentation does.


rule finetune:
    input:
        templates="results/{collection}/templates.json",
        pool=pool_paths,
        checkpoint=checkpoint_input,
        ground_truth=setting("collection", "ground_truth", empty=[]),
        training_templates=training_template_files,
    output:
        directory("results/{collection}/finetune"),
    log:
        "logs/{collection}/finetune.log",
    benchmark:
        "logs/{collection}/finetune.benchmark.tsv"
    conda:
        "../../envs/propagate.yaml"
    threads: setting("finetune", "threads")
    resources:
        gpu=uses_gpu,
        mem_mb=setting("finetune", "mem_mb"),
        runtime=setting("finetune", "runtime"),
    params:
        pool_dir=of_collection(pool_folder),
        model=section("model"),
        checkpoint_dir=config["model"]["checkpoint_dir"],
        training=finetune_settings,
        propagate=finetune_propagate,
        training_template_images=setting("finetune", "training_template_images"),
    script:
        "../scripts/finetune.py"
