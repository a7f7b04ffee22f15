"""Merge per-image results into one COCO predictions file.

* Images are sorted by file name; an image's id is a stable function of its file name
  (the first 48 bits of its SHA-1), so ids do not change when images are added to a
  collection or when it is split into shards. Two names with the same id would be an
  error (about one chance in 10^5 for a million images).
* Video frames are the exception: a frame's image id is its 0-based frame index, the
  number in its file name (`00012.jpg` is image 12), and its image entry also carries
  `frame_index` and `time_s` (seconds into the video).
* Annotation ids run 1..N in (file name, category id, instance) order.
* Structures predicted absent (empty masks) are left out of the annotations (qc.csv
  reports them); images that could not be read are left out of the images.
* Each annotation carries COCO's `segmentation` (compressed RLE, or polygons on
  request: polygons cannot carry holes), `area` (pixels), `bbox`, `score`, `iscrowd`
  0, and our QC fields `instance`, `predicted_iou`, `object_score`, `cycle_iou`,
  `clamped` (and `keyframe`: true where the mask is a video keyframe's annotation).

The file is written as a stream (two passes over the per-image files), so merging
does not hold a collection's masks in memory.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_write
from sam2pal.io.masks import decode_segmentation, mask_to_polygons
from sam2pal.io.records import ImageRecord, read_records
from sam2pal.progress import progress


def image_id(file_name: str) -> int:
    """Stable COCO image id of a file name (48 bits: exact in JSON and JavaScript)."""
    return int.from_bytes(hashlib.sha1(file_name.encode("utf-8")).digest()[:6], "big")


def record_image_id(record: ImageRecord) -> int:
    """A result record's COCO image id: its frame index for a video frame, else the
    hash of its file name."""
    if record.frame_index is not None:
        return int(record.frame_index)
    return image_id(record.file_name)


def _sorted_records(paths: list[Path]) -> Iterator[ImageRecord]:
    """Records of several file-name-sorted result files, merged in file-name order."""
    streams = [((r.file_name, i, r) for r in read_records(p)) for i, p in enumerate(paths)]
    previous = None
    for name, _, record in heapq.merge(*streams, key=lambda item: (item[0], item[1])):
        if name == previous:
            raise InputError(f"{name}: image appears in more than one result file")
        previous = name
        yield record


def _annotations(record: ImageRecord, polygons: bool) -> Iterator[dict]:
    for s in sorted(record.structures, key=lambda s: s.key):
        if s.area == 0:
            continue
        segmentation = s.segmentation
        if polygons:
            mask = decode_segmentation(segmentation, record.height, record.width)
            segmentation = mask_to_polygons(mask)
        ann = {
            "image_id": record_image_id(record),
            "category_id": s.category_id,
            "segmentation": segmentation,
            "area": s.area,
            "bbox": s.bbox,
            "score": s.score,
            "iscrowd": 0,
            "instance": s.instance,
            "predicted_iou": s.predicted_iou,
            "object_score": s.object_score,
            "cycle_iou": s.cycle_iou,
            "clamped": s.clamped,
        }
        if s.keyframe:
            ann["keyframe"] = True
        yield ann


def merge_predictions(
    record_paths: Iterable[str | os.PathLike],
    categories: dict[int, str],
    out_json: str | os.PathLike,
    info: dict | None = None,
    polygons: bool = False,
) -> dict:
    """Write the COCO predictions file.

    Args:
        record_paths: the per-image result files (`sam2pal.io.records`), each in
            file-name order.
        categories: {category id: name}.
        out_json: the COCO file, written atomically.
        info: its `info`.
        polygons: segmentations as polygons instead of RLE.

    Returns:
        The counts: images, annotations, skipped.
    """
    paths = [Path(p) for p in record_paths]
    counts = {"images": 0, "annotations": 0, "skipped": 0}
    with atomic_write(out_json) as out:
        out.write('{"info": ' + json.dumps(info or {}))
        out.write(', "licenses": [], "categories": ')
        out.write(
            json.dumps(
                [
                    {"id": int(cid), "name": name, "supercategory": "morphology"}
                    for cid, name in sorted(categories.items())
                ]
            )
        )
        out.write(', "images": [')
        _write_images(out, paths, counts)
        out.write('], "annotations": [')
        counts["annotations"] = _write_annotations(out, paths, categories, polygons, counts)
        out.write("]}\n")
    return counts


def _write_images(out, paths: list[Path], counts: dict) -> None:
    """The image entries of the records (first pass), counting images and skipped."""
    seen_ids: dict[int, str] = {}
    first = True
    for record in _sorted_records(paths):
        if record.is_skipped:
            counts["skipped"] += 1
            continue
        iid = record_image_id(record)
        if iid in seen_ids:
            raise InputError(
                f"{record.file_name}: image id collides with {seen_ids[iid]}; rename one of them"
            )
        seen_ids[iid] = record.file_name
        entry = {
            "id": iid,
            "file_name": record.file_name,
            "width": record.width,
            "height": record.height,
        }
        if record.frame_index is not None:
            entry.update(frame_index=int(record.frame_index), time_s=record.time_s)
        out.write(("" if first else ", ") + json.dumps(entry))
        first = False
        counts["images"] += 1


def _write_annotations(out, paths: list[Path], categories, polygons: bool, counts: dict) -> int:
    """The annotations of the records (second pass); returns their number."""
    next_id = 1
    for record in progress(
        _sorted_records(paths),
        total=counts["images"] + counts["skipped"],
        desc="merge",
        unit="img",
    ):
        if record.is_skipped:
            continue
        for ann in _annotations(record, polygons):
            unknown = ann["category_id"] not in categories
            if unknown:
                raise InputError(
                    f"{record.file_name}: structure with category id {ann['category_id']} "
                    "that the templates do not define"
                )
            ann = {"id": next_id, **ann}
            out.write(("" if next_id == 1 else ", ") + json.dumps(ann))
            next_id += 1
    return next_id - 1
