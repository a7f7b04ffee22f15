# Official SAM 2.1 checkpoints named in the config are downloaded (with a SHA-256
# check) into model.checkpoint_dir. On a machine without internet the rule stops and
# says where to put a copy fetched elsewhere.


rule download_model:
    output:
        os.path.join(config["model"]["checkpoint_dir"], "{model_file}"),
    log:
        "logs/download_model/{model_file}.log",
    wildcard_constraints:
        model_file="|".join(re.escape(m.file_name) for m in OFFICIAL_MODELS.values()),
    localrule: True
    conda:
        "../../envs/download.yaml"
    threads: 1
    resources:
        runtime=60,
    script:
        "../scripts/download_model.py"
