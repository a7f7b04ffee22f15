"""Per-structure mask PNGs and overlay images from a COCO predictions file.

Mask PNGs are named ``{image_stem}__{category}__{annotation_id}.png`` (8-bit, 0 and
255), or ``{category}__{image_stem}__{annotation_id}.png`` with `category_prefix`, so
that instances never collide. Overlays are JPEGs named ``{image_stem}.jpg``: the
photo with its structures drawn by `sam2pal.outputs.overlay` (one colour per structure
for the whole collection, labels, a legend with each structure's QC score).

Both write into a temporary folder renamed into place at the end, so an interrupted
run leaves no half-filled output folder. Both read the predictions file as a stream,
image by image (`image_groups`), so a collection of any size needs no more memory
than one image.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from sam2pal.io.atomic import atomic_dir
from sam2pal.io.coco import load_coco, scan_coco, stream_annotations
from sam2pal.io.masks import decode_segmentation
from sam2pal.outputs.overlay import (  # noqa: F401  (draw_overlay: this module's API too)
    Structure,
    draw_overlay,
    render_overlay,
    structure_colours,
    structure_style,
)
from sam2pal.outputs.qc import structure_score
from sam2pal.progress import progress


def safe_name(text: str) -> str:
    """A category name usable in a file name (spaces and separators become '_')."""
    keep = [c if (c.isalnum() or c in "-_.") else "_" for c in str(text)]
    return "".join(keep).strip("._") or "structure"


def _by_image(coco: dict):
    anns = defaultdict(list)
    for ann in coco["annotations"]:
        anns[ann["image_id"]].append(ann)
    return anns


def image_groups(pred_json):
    """The images of a COCO file with their annotations, read by `sam2pal.io.coco`.

    Args:
        pred_json: the COCO file (the project's predictions).

    Returns:
        (categories, images, iterator of (image, [its annotations])), in the order of
        its images. Streamed (`scan_coco`, `stream_annotations`) when the annotations
        come grouped by image in that order, as the project's predictions files have
        them; any other file is loaded whole (`load_coco`). InputError on a bad file.
    """
    images_by_id, categories_by_id = scan_coco(pred_json)
    position = {image_id: i for i, image_id in enumerate(images_by_id)}
    ordered, last = True, -1
    for ann in stream_annotations(pred_json, images_by_id, categories_by_id):
        at = position[ann["image_id"]]
        if at < last:
            ordered = False
            break
        last = at
    if not ordered:
        coco = load_coco(pred_json)
        anns = _by_image(coco)
        return (
            coco["categories"],
            coco["images"],
            ((im, anns.get(im["id"], [])) for im in coco["images"]),
        )
    images = list(images_by_id.values())

    def groups():
        index, group = 0, []
        for ann in stream_annotations(pred_json, images_by_id, categories_by_id):
            at = position[ann["image_id"]]
            while index < at:
                yield images[index], group
                index, group = index + 1, []
            group.append(ann)
        while index < len(images):
            yield images[index], group
            index, group = index + 1, []

    return list(categories_by_id.values()), images, groups()


def export_masks(pred_json, out_dir, category_prefix: bool = False) -> int:
    """Write one PNG per annotation; returns the number written."""
    from sam2pal.io.images import unique_stems

    categories, images, groups = image_groups(pred_json)
    names = {c["id"]: safe_name(c["name"]) for c in categories}
    stems = unique_stems([im["file_name"] for im in images])
    count = 0
    with atomic_dir(out_dir) as tmp:
        for image, anns in progress(groups, total=len(images), desc="masks", unit="img"):
            stem = stems[image["file_name"]]
            for ann in anns:
                mask = decode_segmentation(ann["segmentation"], image["height"], image["width"])
                category = names[ann["category_id"]]
                parts = [category, stem] if category_prefix else [stem, category]
                name = "__".join(parts + [str(ann["id"])]) + ".png"
                cv2.imwrite(str(tmp / name), mask.astype(np.uint8) * 255)
                count += 1
    return count


def structure_quality(ann: dict) -> tuple[float | None, str]:
    """The QC score of one annotation, as qc.csv scores structures
    (`sam2pal.outputs.qc.structure_score`): its cycle IoU when cycle consistency was
    computed, else SAM2's predicted IoU (clipped to 0..1), times its stability when
    recorded.

    Returns:
        (score, note): note "p" when the score is the predicted IoU, "keyframe" for a
        video keyframe's annotation (its mask is the annotation itself: no score).
    """
    if ann.get("keyframe"):
        return None, "keyframe"
    score = structure_score(ann.get("cycle_iou"), ann.get("predicted_iou"), ann.get("stability"))
    return score, ("p" if score is not None and ann.get("cycle_iou") is None else "")


def _shrink(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask resized to `size` (w, h) by area averaging, so thin parts stay whole."""
    small = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    out = small >= 0.5
    return out if out.any() or not mask.any() else small > 0


def overlay_structures(
    anns: list[dict],
    image_info: dict,
    categories: dict[int, str],
    size: tuple[int, int] | None = None,
) -> list[Structure]:
    """The `Structure`s of one image's annotations, ready for `draw_overlay`.

    Each structure takes its collection colour (`structure_colours` over all of
    `categories`), is named `{category}_{instance}` where its category has several
    instances (as in qc.csv), and carries its QC score (`structure_quality`).
    Categories without an annotation on the image are listed too, with an empty mask
    and the note "not found".

    Args:
        anns: the image's annotations (predictions.json entries).
        image_info: its COCO image entry (height, width).
        categories: {category id: name} of the whole collection.
        size: (width, height) to reduce the masks to; None: the image's size.

    Returns:
        [Structure], in category id, then instance order.
    """
    colours = structure_colours(categories)
    styles = structure_style(categories)
    height, width = image_info["height"], image_info["width"]
    per_category: dict[int, list[dict]] = defaultdict(list)
    for ann in anns:
        per_category[ann["category_id"]].append(ann)
    empty = np.zeros((height, width) if size is None else (size[1], size[0]), bool)
    structures = []
    for cid in sorted(categories):
        group = sorted(per_category.get(cid, []), key=lambda a: (a.get("instance") or 1, a["id"]))
        numbers = [a.get("instance") for a in group]
        if None in numbers or len(set(numbers)) < len(numbers):
            numbers = list(range(1, len(group) + 1))  # a file without (unique) instances
        multi = len(group) > 1 or any(n > 1 for n in numbers)
        name = categories[cid]
        if not group:
            structures.append(
                Structure(empty, name, colours[cid], note="not found", style=styles[cid])
            )
        for ann, number in zip(group, numbers):
            mask = decode_segmentation(ann["segmentation"], height, width)
            if size is not None and size != (width, height):
                mask = _shrink(mask, size)
            score, note = structure_quality(ann)
            label = f"{name}_{number}" if multi else name
            structures.append(Structure(mask, label, colours[cid], score, note, styles[cid]))
    return structures


def score_notes(structures: list[Structure], stability: bool = True) -> list[str]:
    """The lines under the legend that say what its scores are (`stability`: whether
    the predictions recorded their masks' stability; those written before it was
    recorded score by the IoU alone)."""
    times = " x mask stability" if stability else ""
    notes = []
    if any(s.score is not None and not s.note for s in structures):
        notes.append(f"QC score: cycle IoU{times} (as in qc.csv)")
    if any(s.note == "p" for s in structures):
        notes.append(f"p: SAM2's predicted IoU{times} (no cycle IoU)")
    return notes


def render_images(
    categories: list[dict], groups, image_dir, max_side: int = 1600, steady_legend: bool = False
):
    """The overlay of each image of a predictions file, as `write_overlays` draws it.

    Args:
        categories: the file's COCO categories (all of them: they fix the colours).
        groups: iterable of (image entry, [its annotations]), as `image_groups` gives.
        image_dir: the folder of the images.
        max_side: the overlays' longer side in pixels (photos are only reduced).
        steady_legend: keep the legend in the corner it took on the first image (a
            video's frames), instead of the least crowded corner of each image.

    Yields:
        (image entry, `Overlay`): the picture, and where its labels and legend went.
    """
    from sam2pal.io.images import read_image

    names = {c["id"]: c["name"] for c in categories}
    corner = None
    for image_info, anns in groups:
        image = read_image(Path(image_dir) / image_info["file_name"])
        scale = min(1.0, max_side / max(image.shape[:2]))
        if scale < 1.0:
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        structures = overlay_structures(anns, image_info, names, (image.shape[1], image.shape[0]))
        stability = any(a.get("stability") is not None for a in anns)
        drawn = render_overlay(
            image, structures, notes=score_notes(structures, stability), legend_corner=corner
        )
        if steady_legend and corner is None:
            corner = drawn.legend_corner
        yield image_info, drawn


def _overlays(categories, groups, image_dir, max_side: int, steady_legend: bool = False):
    """(image entry, overlay RGB) for each (image, annotations): `render_images`'
    pictures."""
    for image_info, drawn in render_images(categories, groups, image_dir, max_side, steady_legend):
        yield image_info, drawn.image


def write_overlays(
    pred_json, image_dir, out_dir, max_side: int = 1600, quality: int = 90, only=None
) -> int:
    """Write one overlay JPEG per image (of the file names in `only`, when given: the
    review export's sample); returns the number written."""
    from sam2pal.io.images import unique_stems

    categories, images, groups = image_groups(pred_json)
    if only is not None:
        only = set(only)
        images = [im for im in images if im["file_name"] in only]
        groups = ((im, anns) for im, anns in groups if im["file_name"] in only)
    stems = unique_stems([im["file_name"] for im in images])
    count = 0
    with atomic_dir(out_dir) as tmp:
        groups = progress(groups, total=len(images), desc="overlays", unit="img")
        for image_info, overlay in _overlays(categories, groups, image_dir, max_side):
            cv2.imwrite(
                str(tmp / f"{stems[image_info['file_name']]}.jpg"),
                cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, quality],
            )
            count += 1
    return count


def video_fps(frames, default: float = 10.0) -> float:
    """Frame rate of a frame manifest, from its timestamps (`default` without them)."""
    times = [row.time_s for row in frames if row.time_s is not None]
    if len(times) >= 2 and times[-1] > times[0]:
        return (len(times) - 1) / (times[-1] - times[0])
    return float(default)


def write_overlay_video(
    pred_json, image_dir, out_mp4, fps: float | None = None, max_side: int = 1600, manifest_csv=None
) -> int:
    """An H.264 video of the overlays of a video collection's frames, in frame order
    (frames that could not be read are left out). `fps` defaults to the frame rate of
    the manifest's timestamps. Frames are drawn and encoded one at a time. Returns the
    number of frames written."""
    from sam2pal.io.video import read_manifest, write_video

    coco = load_coco(pred_json)
    anns = _by_image(coco)
    images = sorted(coco["images"], key=lambda im: (im.get("frame_index", 0), im["file_name"]))
    if fps is None:
        fps = video_fps(read_manifest(manifest_csv)) if manifest_csv else 10.0
    groups = progress(
        ((im, anns.get(im["id"], [])) for im in images),
        total=len(images),
        desc="video",
        unit="frame",
    )
    return write_video(
        (
            overlay
            for _, overlay in _overlays(
                coco["categories"], groups, image_dir, max_side, steady_legend=True
            )
        ),
        out_mp4,
        fps,
    )
