# sam2-pal: segment morphological structures on specimen collections with SAM2,
# from one or a few annotated templates, and measure them.
#
#   snakemake --cores N                      # all collections in config/config.yaml
#   snakemake --cores N --configfile my.yaml
#
# See README.md and config/README.md.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/frames.smk"
include: "workflow/rules/templates.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/propagate.smk"
include: "workflow/rules/outputs.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/review.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
