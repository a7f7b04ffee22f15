# Publishing: a Darwin Core Archive of the measurements (Occurrence core and
# MeasurementOrFact extension) and one ImageJ/Fiji ROI set per image. Built by
# `snakemake` when outputs.publish is true; any time by asking for
# results/<collection>/publish/dwca.zip.


rule publish:
    input:
        predictions="results/{collection}/predictions.json",
        provenance="results/{collection}/provenance.json",
        measurements="results/{collection}/measurements.csv",
        qc="results/{collection}/qc.csv",
        sample_sheet=setting("collection", "sample_sheet", empty=[]),
    output:
        dwca="results/{collection}/publish/dwca.zip",
        roi=directory("results/{collection}/publish/roi"),
    log:
        "logs/{collection}/publish.log",
    conda:
        "../../envs/tables.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    script:
        "../scripts/publish.py"
