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
  `clamped` (and `stability`, SAM's stability score of the mask, where recorded;
  `keyframe`: true where the mask is a video keyframe's annotation;
  `zoomed`: true where it comes from the zoom pass, `zoom_placed` where that pass's
  window was placed from the template; `corrected`: {"when", "source"[, "reviewed_at"]}
  where a reviewer's correction replaced the prediction, see
  `sam2pal.outputs.corrections`).

The file is written as a stream (two passes over the per-image files), so merging
does not hold a collection's masks in memory.

Every COCO file the project reads (templates, ground truth, predictions, fine-tuning
pools) is read here too, by `load_coco` (whole) or `scan_coco` and `stream_annotations`
(streamed), with one set of checks: see "reading" below.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import heapq
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import ijson
import numpy as np

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
        if s.stability is not None:
            ann["stability"] = s.stability
        for flag in ("keyframe", "zoomed", "zoom_placed"):
            if getattr(s, flag):
                ann[flag] = True
        if s.corrected is not None:
            ann["corrected"] = s.corrected
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
        if record.orientation is not None:
            # propagate.orientation's search: the photo shows the template turned
            # `rotation` degrees clockwise, after a mirror when `mirrored`
            entry["orientation"] = record.orientation
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


# -- reading --------------------------------------------------------------------------
#
# One reader for every COCO file the project reads (templates, ground truth,
# predictions, fine-tuning pools), with one set of checks and one wording of each
# error: InputError("<path>: <what is wrong>"). `load_coco` reads a file whole;
# `scan_coco` and `stream_annotations` read it as a stream (two passes, constant memory
# in the number of annotations) and apply the same checks to each item.
#
# Ids are integers (integral floats are read as integers) or, unless `integer_ids`,
# strings. Images need an `id`, a `file_name` and, unless `sizes` is False, a `width`
# and a `height` (positive whole numbers wherever they are given). Annotations need an
# `id`, an `image_id` and a `category_id` that name an image and a category of the file,
# and a `segmentation`; an `instance` (the project's instance rank) is a positive whole
# number. Segmentations are checked when decoded (`annotation_mask`).

COCO_LISTS = ("images", "annotations", "categories")


def whole_number(value):
    """An int from JSON (integral floats accepted), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _key(value):
    """A reference (image_id, category_id) as the id it names, None when it cannot be one."""
    whole = whole_number(value)
    if whole is not None:
        return whole
    return value if isinstance(value, str) and value else None


def _entry_id(path, label: str, entry: dict, integer_ids: bool):
    if "id" not in entry:
        raise InputError(f"{path}: {label} has no 'id'")
    value = whole_number(entry["id"])
    if value is None and not integer_ids and isinstance(entry["id"], str) and entry["id"]:
        value = entry["id"]
    if value is None:
        kind = "an integer" if integer_ids else "an integer or a string"
        raise InputError(f"{path}: {label} has id {entry['id']!r}, expected {kind}")
    return value


def _image_label(image: dict) -> str:
    return f"image {image['id']!r} ({image['file_name']!r})"


def _check_image(path, index: int, image, sizes: bool, integer_ids: bool) -> dict:
    if not isinstance(image, dict):
        raise InputError(f"{path}: images[{index}] is not an object")
    image["id"] = _entry_id(path, f"images[{index}]", image, integer_ids)
    name = image.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{path}: image {image['id']!r} has no 'file_name'")
    for key in ("width", "height"):
        if key not in image:
            if sizes:
                raise InputError(f"{path}: {_image_label(image)} has no '{key}'")
            continue
        value = whole_number(image[key])
        if value is None or value <= 0:
            raise InputError(
                f"{path}: {_image_label(image)}: {key} {image[key]!r} is not a positive whole number"
            )
        image[key] = value
    return image


def check_images(path, raw: list, sizes: bool = True, integer_ids: bool = False) -> dict:
    """Check the `images` list of a COCO file.

    Args:
        path: the file (named in errors).
        raw: its `images` list; ids and sizes are normalised in place (1.0 -> 1).
        sizes: whether each image needs a `width` and a `height`.
        integer_ids: whether string ids are refused.

    Returns:
        {image id: image entry}, in file order. Raises InputError on a bad entry.
    """
    images: dict = {}
    for index, entry in enumerate(raw):
        image = _check_image(path, index, entry, sizes, integer_ids)
        if image["id"] in images:
            raise InputError(
                f"{path}: duplicate image id {image['id']!r} "
                f"({images[image['id']]['file_name']!r} and {image['file_name']!r})"
            )
        images[image["id"]] = image
    return images


def check_categories(path, raw: list, integer_ids: bool = False) -> dict:
    """Check the `categories` list of a COCO file.

    Args:
        path: the file (named in errors).
        raw: its `categories` list; ids are normalised in place.
        integer_ids: whether string ids are refused.

    Returns:
        {category id: category entry}, in file order. Raises InputError on a bad entry.
    """
    categories: dict = {}
    for index, category in enumerate(raw):
        if not isinstance(category, dict):
            raise InputError(f"{path}: categories[{index}] is not an object")
        cid = category["id"] = _entry_id(path, f"categories[{index}]", category, integer_ids)
        name = category.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{path}: category {cid!r} has no 'name'")
        if cid in categories:
            raise InputError(
                f"{path}: duplicate category id {cid!r} ({categories[cid]['name']!r} and {name!r})"
            )
        categories[cid] = category
    return categories


def check_annotation(
    path, index: int, ann, images: dict, categories: dict, seen: set, integer_ids: bool = False
) -> dict:
    """Check one entry of the `annotations` list of a COCO file.

    Args:
        path: the file (named in errors).
        index: the entry's position in the list.
        ann: the entry; its ids are normalised in place.
        images: `check_images` of the file.
        categories: `check_categories` of the file.
        seen: the annotation ids met so far (this one is added).
        integer_ids: whether string ids are refused.

    Returns:
        The annotation. Raises InputError when it is bad.
    """
    if not isinstance(ann, dict):
        raise InputError(f"{path}: annotations[{index}] is not an object")
    aid = ann["id"] = _entry_id(path, f"annotations[{index}]", ann, integer_ids)
    if aid in seen:
        raise InputError(f"{path}: duplicate annotation id {aid!r}")
    seen.add(aid)
    for key in ("image_id", "category_id"):
        if key not in ann:
            raise InputError(f"{path}: annotation {aid!r} has no '{key}'")
    image = images.get(_key(ann["image_id"]))
    if image is None:
        value = ann["image_id"]
        raise InputError(
            f"{path}: annotation {aid!r} has image_id {value!r}, "
            f"but 'images' has no image id {value!r}"
        )
    label = f"{path}: annotation {aid!r} on {_image_label(image)}"
    if _key(ann["category_id"]) not in categories:
        value = ann["category_id"]
        raise InputError(
            f"{label} has category_id {value!r}, but 'categories' has no category id {value!r}"
        )
    ann["image_id"], ann["category_id"] = image["id"], _key(ann["category_id"])
    if "segmentation" not in ann:
        raise InputError(f"{label} has no 'segmentation'")
    if ann.get("instance") is not None:
        instance = whole_number(ann["instance"])
        if instance is None or instance < 1:
            raise InputError(
                f"{label}: instance {ann['instance']!r} is not a positive whole number"
            )
        ann["instance"] = instance
    return ann


def _rle_counts(text) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the decoding pycocotools does)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    counts: list[int] = []
    pos, size = 0, len(text)
    while pos < size:
        value, shift, more = 0, 0, True
        while more:
            if pos >= size:
                raise ValueError("compressed RLE counts are cut short")
            code = ord(text[pos]) - 48
            if not 0 <= code < 64:
                raise ValueError("compressed RLE counts contain an invalid character")
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            pos += 1
            shift += 1
            if not more and code & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _check_rle(segmentation, height: int, width: int) -> None:
    """Check the size of an RLE segmentation, and that compressed runs cover the image.

    pycocotools decodes compressed counts without bounds checks, so they are checked
    here before decoding.
    """
    if not isinstance(segmentation, dict) or "size" not in segmentation:
        return
    try:
        size = [int(v) for v in segmentation["size"]]
    except (TypeError, ValueError):
        raise ValueError(f"RLE size {segmentation['size']!r} is not [height, width]") from None
    if len(size) != 2:
        raise ValueError(f"RLE size {segmentation['size']!r} is not [height, width]")
    if size != [height, width]:
        raise ValueError(
            f"RLE size is {size[0]}x{size[1]} (height x width) but the image is {height}x{width}"
        )
    counts = segmentation.get("counts")
    if isinstance(counts, (str, bytes)):
        runs = _rle_counts(counts)
        if any(run < 0 for run in runs) or sum(runs) != height * width:
            raise ValueError("compressed RLE counts do not add up to height*width")


def annotation_mask(path, image: dict, ann: dict) -> np.ndarray:
    """The mask of a checked annotation, its segmentation checked as it is decoded.

    Args:
        path: the COCO file (named in errors).
        image: the annotation's image entry (`id`, `file_name`, `width`, `height`).
        ann: the annotation (`id`, `segmentation`).

    Returns:
        A bool array (height, width). Raises InputError on a bad segmentation.
    """
    height, width = image["height"], image["width"]
    try:
        _check_rle(ann["segmentation"], height, width)
        return decode_segmentation(ann["segmentation"], height, width)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(
            f"{path}: annotation {ann['id']!r} on {_image_label(image)}: "
            f"invalid segmentation ({reason})"
        ) from None


def _open_coco(path: Path, role: str):
    """A COCO file opened for binary reading, past a UTF-8 byte order mark."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (returned to the caller, who closes it)
    except FileNotFoundError:
        raise InputError(f"{path}: {role} not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a {role}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {role} ({exc.strerror or exc})") from None
    if handle.read(3) != codecs.BOM_UTF8:
        handle.seek(0)
    return handle


def _check_top_level(path, is_object: bool, lists: dict) -> None:
    """The top level of a COCO file: an object whose `COCO_LISTS` are lists.

    `lists`: {key: whether its value is a list} of the object's keys."""
    if not is_object:
        raise InputError(
            f"{path}: not a COCO file (it must hold a JSON object with 'images', "
            "'annotations' and 'categories')"
        )
    missing = [key for key in COCO_LISTS if key not in lists]
    if missing:
        raise InputError(
            f"{path}: not a COCO file (missing top-level key(s) "
            f"{', '.join(repr(key) for key in missing)})"
        )
    for key in COCO_LISTS:
        if not lists[key]:
            raise InputError(f"{path}: '{key}' must be a list")


def read_json(path: str | os.PathLike, role: str) -> object:
    """A JSON file's value (past a UTF-8 byte order mark); InputError (one line naming
    the file, what it is: `role`) when it is missing, unreadable, not UTF-8 or not JSON."""
    path = Path(path)
    with _open_coco(path, role) as handle:
        raw = handle.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: not valid JSON ({exc.msg}: invalid JSON at line {exc.lineno}, "
            f"column {exc.colno})"
        ) from None


def load_coco(
    path: str | os.PathLike,
    role: str = "COCO file",
    sizes: bool = True,
    integer_ids: bool = False,
) -> dict:
    """Read and check a whole COCO file.

    Args:
        path: the JSON file.
        role: what the file is, in the error for a missing file ("template file").
        sizes: whether images need a `width` and a `height`.
        integer_ids: whether string ids are refused.

    Returns:
        The file's object, its ids normalised (1.0 -> 1). Raises InputError (one line
        naming the file) on any problem; segmentations are checked by `annotation_mask`.
    """
    path = Path(path)
    data = read_json(path, role)
    is_object = isinstance(data, dict)
    _check_top_level(
        path, is_object, {k: isinstance(v, list) for k, v in data.items()} if is_object else {}
    )
    images = check_images(path, data["images"], sizes, integer_ids)
    categories = check_categories(path, data["categories"], integer_ids)
    seen: set = set()
    for index, ann in enumerate(data["annotations"]):
        check_annotation(path, index, ann, images, categories, seen, integer_ids)
    return data


def _parse_error(exc: Exception) -> str:
    """The first line of a streaming parser's error (the C parser's comes as bytes)."""
    reason = exc.args[0] if exc.args else ""
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", errors="replace")
    lines = str(reason).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


@contextlib.contextmanager
def _events(path: Path, role: str, prefix: str | None = None):
    """The JSON events of a COCO file (or its items under `prefix`), streamed, with read
    and parse errors turned into one-line InputErrors naming the file."""
    handle = _open_coco(path, role)
    try:
        with handle:
            if prefix is None:
                yield ijson.parse(handle, use_float=True)
            else:
                yield ijson.items(handle, prefix, use_float=True)
    except ijson.JSONError as exc:
        reason = _parse_error(exc)
        if "invalid bytes in UTF8" in reason:  # the C parser's word for a decoding error
            raise InputError(f"{path}: not UTF-8 text") from None
        raise InputError(f"{path}: not valid JSON ({reason})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {role} ({exc.strerror or exc})") from None


def _scan_lists(path: Path, role: str) -> tuple[dict, dict]:
    """One streamed pass: {top-level key: whether it is a list} and the items of the
    `images` and `categories` lists (the annotations are left to a second pass)."""
    kinds: dict = {}
    lists: dict = {"images": [], "categories": []}
    builder = item_of = key = None
    with _events(path, role) as events:
        first = next(events, None)
        if first is None:
            raise InputError(f"{path}: not valid JSON (the file is empty)")
        if first[1] != "start_map":
            for _ in events:  # a broken file is "not valid JSON" before "not an object"
                pass
            _check_top_level(path, False, {})
        for prefix, event, value in events:
            if builder is not None:
                builder.event(event, value)
                if prefix == item_of and event in ("end_map", "end_array"):
                    lists[item_of[:-5]].append(builder.value)
                    builder = None
            elif prefix == "" and event == "map_key":
                key = value
            elif prefix == key and key not in kinds:
                kinds[key] = event == "start_array"
            elif prefix in ("images.item", "categories.item") and kinds.get(prefix[:-5]):
                if event in ("start_map", "start_array"):
                    builder, item_of = ijson.ObjectBuilder(), prefix
                    builder.event(event, value)
                else:
                    lists[prefix[:-5]].append(value)
    return kinds, lists


def scan_coco(
    path: str | os.PathLike, role: str = "COCO file", sizes: bool = True
) -> tuple[dict, dict]:
    """First streamed pass over a COCO file: its top level, images and categories.

    Args:
        path: the JSON file (its keys may come in any order).
        role: what the file is, in the error for a missing file.
        sizes: whether images need a `width` and a `height`.

    Returns:
        ({image id: image}, {category id: category}), checked as by `load_coco`, in
        file order; `stream_annotations` reads the annotations.
    """
    path = Path(path)
    kinds, lists = _scan_lists(path, role)
    _check_top_level(path, True, kinds)
    return check_images(path, lists["images"], sizes), check_categories(path, lists["categories"])


def stream_annotations(
    path: str | os.PathLike, images: dict, categories: dict, role: str = "COCO file"
) -> Iterator[dict]:
    """Second streamed pass over a COCO file: its annotations, one at a time.

    Args:
        path: the JSON file.
        images: the images of `scan_coco`.
        categories: the categories of `scan_coco`.
        role: what the file is, in the error for a missing file.

    Returns:
        An iterator of the annotations, each checked as by `load_coco` when it is read.
    """
    path = Path(path)
    seen: set = set()
    with _events(path, role, "annotations.item") as annotations:
        for index, ann in enumerate(annotations):
            yield check_annotation(path, index, ann, images, categories, seen)


def category_masks(
    data: dict, path: str | os.PathLike
) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """The masks of a checked COCO file, per image and category name.

    Args:
        data: the file's object, as `load_coco` returns it.
        path: the file (named in errors).

    Returns:
        ({file_name: image}, {file_name: {category name: union of its masks}}).
    """
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = {im["id"]: im for im in data["images"]}
    by_file = {im["file_name"]: im for im in data["images"]}
    masks: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        category = names[ann["category_id"]]
        mask = annotation_mask(path, image, ann)
        current = masks[image["file_name"]].get(category)
        masks[image["file_name"]][category] = mask if current is None else (current | mask)
    return by_file, masks
