"""Per-structure mask PNGs and overlay images from a COCO predictions file.

Mask PNGs are named ``{image_stem}__{category}__{annotation_id}.png`` (8-bit, 0 and
255), or ``{category}__{image_stem}__{annotation_id}.png`` with `category_prefix`, so
that instances never collide. Overlays are JPEGs named ``{image_stem}.jpg``: the
photo with each structure tinted in its category's colour, outlined, and labelled.

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
from sam2pal.progress import progress

# Colour-blind-safe palette (Okabe-Ito), RGB.
PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (120, 120, 120),
]


def category_colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


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


def draw_overlay(
    image: np.ndarray,
    masks: list[tuple[np.ndarray, str, tuple[int, int, int]]],
    alpha: float = 0.45,
) -> np.ndarray:
    """RGB image with each (mask, label, colour) tinted, outlined and labelled."""
    out = image.astype(np.float32)
    height, width = image.shape[:2]
    thickness = max(1, round(min(height, width) / 300))
    for mask, _, colour in masks:
        out[mask] = (1 - alpha) * out[mask] + alpha * np.array(colour, np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    font_scale = max(0.35, min(height, width) / 900)
    for mask, label, colour in masks:
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(out, contours, -1, colour, thickness)
        ys, xs = np.nonzero(mask)
        if len(xs):
            org = (int(xs.min()), max(int(ys.min()) - 4, 12))
            cv2.putText(
                out,
                label,
                org,
                cv2.FONT_HERSHEY_SIMPLEX,
                font_scale,
                (0, 0, 0),
                thickness + 2,
                cv2.LINE_AA,
            )
            cv2.putText(
                out,
                label,
                org,
                cv2.FONT_HERSHEY_SIMPLEX,
                font_scale,
                colour,
                thickness,
                cv2.LINE_AA,
            )
    return out


def _overlays(categories, groups, image_dir, max_side: int):
    """(image entry, overlay RGB) for each (image, annotations) of `groups`."""
    from sam2pal.io.images import read_image

    order = {c["id"]: i for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}
    names = {c["id"]: c["name"] for c in categories}
    for image_info, anns in groups:
        image = read_image(Path(image_dir) / image_info["file_name"])
        masks = []
        for ann in sorted(anns, key=lambda a: (a["category_id"], a["id"])):
            mask = decode_segmentation(
                ann["segmentation"], image_info["height"], image_info["width"]
            )
            label = names[ann["category_id"]]
            if ann.get("keyframe"):
                label += " (keyframe)"
            elif ann.get("cycle_iou") is not None:
                label += f" {ann['cycle_iou']:.2f}"
            masks.append((mask, label, category_colour(order[ann["category_id"]])))
        scale = min(1.0, max_side / max(image.shape[:2]))
        if scale < 1.0:
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            masks = [
                (
                    cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(
                        bool
                    ),
                    lab,
                    c,
                )
                for m, lab, c in masks
            ]
        yield image_info, draw_overlay(image, masks)


def write_overlays(pred_json, image_dir, out_dir, max_side: int = 1600, quality: int = 90) -> int:
    """Write one overlay JPEG per image; returns the number written."""
    from sam2pal.io.images import unique_stems

    categories, images, groups = image_groups(pred_json)
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
        (overlay for _, overlay in _overlays(coco["categories"], groups, image_dir, max_side)),
        out_mp4,
        fps,
    )
