"""A whole collection run in one process: the chain of steps that the workflow runs as
rules (workflow/scripts/*.py), for `sam2pal segment` and `sam2pal video`.

    segment (segment_video) -> skipped images checked -> merge -> qc -> measure
        -> masks / overlays (overlay video)

Each step is the function its rule calls; the templates are prepared before
(`pipeline.prepare_templates`, and any training on them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sam2pal.inference import pipeline


@dataclass
class RunOutputs:
    """What a run writes from its predictions, besides the fixed files of `out_dir`
    (predictions.jsonl, run.json, skipped.csv, provenance.json, qc.csv,
    measurements.csv, measurements_wide.csv).

    predictions: the COCO predictions file (None: `out_dir`/predictions.json).
    polygons: segmentations as polygons instead of RLE.
    px_per_mm, calibration_csv: the scale of the measurements.
    save_masks: one PNG per structure in `out_dir`/masks (`category_prefix`: file
        names start with the category, `sam2pal.outputs.visualize.export_masks`).
    overlays: overlay images in `out_dir`/overlays (a video: `out_dir`/overlay.mp4).
    """

    predictions: str | os.PathLike | None = None
    polygons: bool = False
    px_per_mm: float | None = None
    calibration_csv: str | os.PathLike | None = None
    save_masks: bool = False
    category_prefix: bool = False
    overlays: bool = False


def check_collection_skipped(records, max_fraction, image_dir, skipped_csv) -> None:
    """propagate.max_skipped_fraction on a whole collection.

    Args:
        records: the result file.
        max_fraction: the largest share of bad image files allowed (None: any).
        image_dir: the folder of the images, named in the error.
        skipped_csv: the list of skipped images, pointed to in the error.

    Returns:
        None; raises `propagate.TooManySkipped` when too many images are bad files.
    """
    from sam2pal.inference.propagate import TooManySkipped, check_skipped

    try:
        check_skipped([records], max_fraction, image_dir)
    except TooManySkipped as exc:
        raise TooManySkipped(f"{exc} (all of them in {skipped_csv})", exc.skipped) from None


def run_photos(
    templates_json, image_dir, file_names, out_dir, outputs: RunOutputs, **options
) -> dict:
    """Segment a folder of photos and write every output of the collection.

    Args:
        templates_json: the prepared templates (`pipeline.prepare_templates`).
        image_dir: the folder of the photos.
        file_names: the photos, relative to `image_dir`.
        out_dir: the folder of the outputs.
        outputs: what to write from the predictions.
        **options: how to segment (`pipeline.SegmentOptions`).

    Returns:
        The counts of `pipeline.segment`.
    """
    out_dir = Path(out_dir)
    records = out_dir / "predictions.jsonl"
    counts = pipeline.segment(
        templates_json,
        image_dir,
        file_names,
        records,
        out_dir / "run.json",
        out_dir / "skipped.csv",
        **options,
    )
    max_fraction = pipeline.SegmentOptions(**options).max_skipped_fraction
    check_collection_skipped(records, max_fraction, image_dir, out_dir / "skipped.csv")
    predictions = _outputs(templates_json, records, out_dir, outputs)
    if outputs.overlays:
        from sam2pal.outputs.visualize import write_overlays

        write_overlays(predictions, image_dir, out_dir / "overlays")
    return counts


def run_video(
    templates_json, frames_dir, manifest_csv, out_dir, outputs: RunOutputs, mode="video", **options
) -> dict:
    """Segment the frames of a video and write every output of the collection.

    Args:
        templates_json: the prepared keyframes (`pipeline.prepare_templates`).
        frames_dir, manifest_csv: the frames and their manifest (`sam2pal.io.video`).
        out_dir: the folder of the outputs.
        outputs: what to write from the predictions (`overlays`: an overlay video).
        mode: "video" or "independent" (`pipeline.segment_video`).
        **options: how to segment (`pipeline.SegmentOptions`).

    Returns:
        The counts of `pipeline.segment_video`.
    """
    out_dir = Path(out_dir)
    records = out_dir / "predictions.jsonl"
    counts = pipeline.segment_video(
        templates_json,
        frames_dir,
        manifest_csv,
        records,
        out_dir / "run.json",
        out_dir / "skipped.csv",
        mode=mode,
        **options,
    )
    max_fraction = pipeline.SegmentOptions(**options).max_skipped_fraction
    check_collection_skipped(records, max_fraction, frames_dir, out_dir / "skipped.csv")
    predictions = _outputs(templates_json, records, out_dir, outputs)
    if outputs.overlays:
        from sam2pal.outputs.visualize import write_overlay_video

        write_overlay_video(
            predictions, frames_dir, out_dir / "overlay.mp4", fps=None, manifest_csv=manifest_csv
        )
    return counts


def _outputs(templates_json, records: Path, out_dir: Path, outputs: RunOutputs) -> Path:
    """Merge the results into the predictions file (and provenance.json), rank them in
    qc.csv, measure them and write the masks when asked; returns the predictions file."""
    from sam2pal.outputs.measure import measure_coco
    from sam2pal.outputs.visualize import export_masks

    predictions = Path(outputs.predictions or "predictions.json")
    if not predictions.is_absolute():
        predictions = out_dir / predictions
    pipeline.merge(
        [records],
        templates_json,
        [out_dir / "run.json"],
        predictions,
        polygons=outputs.polygons,
        provenance_json=out_dir / "provenance.json",
    )
    pipeline.qc([records], templates_json, out_dir / "qc.csv")
    measure_coco(
        predictions,
        out_dir / "measurements.csv",
        px_per_mm=outputs.px_per_mm,
        calibration_csv=outputs.calibration_csv,
        wide_csv=out_dir / "measurements_wide.csv",
    )
    if outputs.save_masks:
        export_masks(predictions, out_dir / "masks", category_prefix=outputs.category_prefix)
    return predictions
