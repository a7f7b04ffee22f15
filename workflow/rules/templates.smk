# Load and validate a collection's templates (COCO or PNG masks), select those to
# use, and write the normalised template file the later steps read. For a video the
# templates are its keyframes, found among the frames by file name. With
# corrections.as_templates, the reviewed images of the corrections files join them.


rule prepare_templates:
    input:
        templates=template_files,
        frames=manifest_input,
        corrections=of_collection(correction_templates),
    output:
        "results/{collection}/templates.json",
    log:
        "logs/{collection}/prepare_templates.log",
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=setting("collection", "templates"),
        image_dir=of_collection(template_image_dir),
        collection_dir=of_collection(image_dir),
        template_files=setting("propagate", "template_files"),
        max_templates=setting("propagate", "max_templates"),
    script:
        "../scripts/prepare_templates.py"
