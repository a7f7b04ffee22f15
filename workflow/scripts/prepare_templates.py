"""Rule prepare_templates: validate the templates, write the normalised template file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from sam2pal.inference import pipeline  # noqa: E402
from sam2pal.smk import logged  # noqa: E402

with logged(snakemake):
    templates = pipeline.prepare_templates(
        snakemake.params.spec,
        snakemake.params.image_dir,
        snakemake.output[0],
        template_files=snakemake.params.template_files,
        max_templates=snakemake.params.max_templates,
        # corrections.as_templates: the reviewed images join the templates
        corrections=snakemake.input.corrections,
        collection_dir=snakemake.params.collection_dir,
    )
    print(f"{len(templates.images)} template image(s); categories: {templates.categories}")
