"""Corrections back: a reviewer's masks replace the predictions, and the random sample
of the review estimates the collection's accuracy.

`sam2pal review export` sends a sample of a collection to Label Studio or CVAT: the
images QC ranked worst and a seeded random sample of the others (review_sample.csv keeps
the two apart). A reviewer corrects the polygons there and exports them. This module
reads that export and brings it back:

1. `read_corrections`: a Label Studio JSON export (a list of tasks; polygonlabels in
   percent of the image, or brushlabels in Label Studio's brush RLE) or a COCO file
   (CVAT's "COCO 1.0" export, Label Studio's COCO export: polygons or RLE). Structures
   are named by category (label) name. A Label Studio task counts as reviewed when it has
   an annotation that was not cancelled (the latest one, by `updated_at`, when there are
   several); every image of a COCO file counts as reviewed (CVAT exports every image of
   the task: export it once the whole task is checked).
2. `load_corrections`: the images matched to the results by file name (the same path,
   else the same bare name when it is unique; Label Studio's upload prefix
   "<8 hex digits>-" is dropped when a task has no `file_name`), their sizes and
   structure names checked. Of several files, a later one wins for an image in both.
3. `correct_record`: on a reviewed image, what the reviewer drew is the truth. The
   reviewer's pieces are grouped into instances (a structure with one instance per
   template: all its pieces; else the pieces with the same instance text in Label
   Studio's region meta, or the same `instance` attribute in COCO, else each annotation
   on its own) and matched to the predicted instances by mask overlap (IoU, Hungarian
   assignment); an instance the reviewer drew where the model found none takes the
   number of a predicted instance left unmatched, else the next number. Every structure
   of the image is marked `corrected` ({"when", "source", "reviewed_at"}); a predicted
   structure the reviewer removed becomes absent (an empty mask, left out of
   predictions.json). Scores stay those of the prediction they replaced (0 for an
   instance the model did not have); qc.csv scores a corrected structure 1.
4. `apply_corrections`: the result records with the corrections applied, written as one
   records file (reviewed.jsonl); predictions.json, qc.csv and the measurement tables
   are then made from it by the same functions as after a segmentation
   (`sam2pal.inference.pipeline.merge`, `pipeline.qc`,
   `sam2pal.outputs.measure.measure_coco`), with no model run.
5. `review_summary`: review_summary.csv, the accuracy of the predictions against the
   corrections (`SUMMARY_COLUMNS`). The estimate for the collection comes from the
   images of the random sample only (review_sample.csv, selected_by `random`); the
   worst images are summarised in rows of their own, marked biased, and never mixed
   in. Per structure (category) and `all`: the mean IoU of the predicted against the
   corrected mask (a structure present on one side only counts 0; absent on both sides
   is left out), and for the size measures of `SUMMARY_MEASURES` the mean relative
   error |predicted - corrected| / corrected and the mean relative bias
   (predicted - corrected) / corrected, over the structures present on both sides.
   Each mean has a 95 % percentile bootstrap interval over images (`bootstrap_mean`:
   images are resampled with replacement, 2000 times with a seeded generator, and the
   mean over the structures of the resampled images taken each time), which respects
   that the structures of one image are not independent; with fewer than two images the
   interval is left empty.

`import_corrections` is the whole of `sam2pal review import` on a results folder of
`sam2pal segment` or `sam2pal video`: every output is computed in a temporary folder and
moved into place only when all of them are done, so a bad corrections file changes
nothing. The workflow runs the same steps as rules (workflow/rules/review.smk).
"""

from __future__ import annotations

import csv
import datetime as _dt
import heapq
import math
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_write
from sam2pal.io.coco import read_json
from sam2pal.io.records import ImageRecord, StructureRecord, read_records
from sam2pal.outputs.measure import MASK_MEASURES

#: The records file of a collection with its corrections applied.
REVIEWED_RECORDS = "reviewed.jsonl"
#: The accuracy estimate.
REVIEW_SUMMARY = "review_summary.csv"
#: The sample file `sam2pal review export` writes into the review folder.
REVIEW_SAMPLE = "review_sample.csv"

#: Size measures (`sam2pal.outputs.measure.MASK_MEASURES`) whose relative error is
#: reported; eccentricity and solidity are ratios already.
SUMMARY_MEASURES = [m for m in MASK_MEASURES if m.endswith("_px")]

SUMMARY_COLUMNS = [
    "sample",
    "structure",
    "quantity",
    "n_images",
    "n",
    "mean",
    "ci_low",
    "ci_high",
    "note",
]

SAMPLE_NOTES = {
    "random": "estimate for the collection (random sample; 95% bootstrap interval over images)",
    "worst": "biased: the images QC ranked worst, not an estimate for the collection",
}

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95

# Label Studio region types that are not masks: refused rather than silently dropped
_OTHER_REGIONS = (
    "rectanglelabels",
    "ellipselabels",
    "keypointlabels",
    "rectangle",
    "ellipse",
    "keypoint",
    "polygon",
    "brush",
)
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_INSTANCE_TEXT = re.compile(r"instance\s*(\d+)", re.IGNORECASE)


def now() -> str:
    """The current time, ISO 8601 with the time zone, to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# -- Label Studio's brush RLE -----------------------------------------------------------


class _Bits:
    """Reads big-endian unsigned fields from a string of '0' and '1'."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def read(self, size: int) -> int:
        end = self.pos + size
        if end > len(self.text):
            raise ValueError("the RLE data ends in the middle of a value")
        value = int(self.text[self.pos : end], 2)
        self.pos = end
        return value


def decode_brush_rle(rle, expected_length: int | None = None) -> np.ndarray:
    """Decode Label Studio's brush RLE (`value.rle` of a brushlabels result).

    The format is thi.ng's rle-pack (github.com/thi-ng/umbrella, packages/rle-pack), which
    Label Studio's editor writes and its converter reads (label_studio_converter.brush
    .decode_rle): a bit stream of bytes, big-endian; a 32-bit value count, the word size
    minus 1 (5 bits), four run-length field sizes minus 1 (4 bits each); then chunks,
    each a flag bit (1: a run of one value, 0: literal values), a 2-bit choice of the
    field size, the chunk length minus 1 in that many bits, and the run's value or the
    chunk's values, a word each.

    Args:
        rle: the list of byte values.
        expected_length: the number of values the caller expects (checked before
            anything is allocated).

    Returns:
        The flat array of values (uint8 for words of up to 8 bits). Raises ValueError
        with a short reason when the data is not such a stream.
    """
    if not isinstance(rle, list) or not rle:
        raise ValueError("the brush RLE is not a list of byte values")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in rle):
        raise ValueError("the brush RLE holds values that are not bytes (0-255)")
    bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    reader = _Bits((bits + ord("0")).tobytes().decode("ascii"))
    count = reader.read(32)
    word = reader.read(5) + 1
    sizes = [reader.read(4) + 1 for _ in range(4)]
    if expected_length is not None and count != expected_length:
        raise ValueError(f"the brush RLE holds {count} values, expected {expected_length}")
    dtype = np.uint8 if word <= 8 else np.uint16 if word <= 16 else np.uint32
    out = np.zeros(count, dtype=dtype)
    i = 0
    while i < count:
        run = reader.read(1)
        end = i + 1 + reader.read(sizes[reader.read(2)])
        if end > count:
            raise ValueError("the brush RLE runs past its value count")
        if run:
            out[i:end] = reader.read(word)
        else:
            out[i:end] = [reader.read(word) for _ in range(end - i)]
        i = end
    return out


def brush_mask(rle, height: int, width: int) -> np.ndarray:
    """The mask of a brushlabels result: its RGBA layer's alpha channel, non-zero (as
    Label Studio's own COCO conversion reads it).

    Args:
        rle: the result's `value.rle`.
        height, width: the image's size.

    Returns:
        A bool array (height, width); ValueError when the RLE is bad or of another size.
    """
    values = decode_brush_rle(rle, expected_length=height * width * 4)
    return values.reshape(height, width, 4)[:, :, 3] > 0


# -- reading corrections ----------------------------------------------------------------


@dataclass
class Piece:
    """One region a reviewer drew: a structure (category name), the instance it belongs
    to (None: unknown), and its shape."""

    category: str
    group: int | None
    kind: str  # "polygon" (Label Studio, percent), "brush" (Label Studio RLE), "coco"
    data: object
    where: str  # for errors: "<file>: task 3 (a.jpg)"

    def mask(self, height: int, width: int) -> np.ndarray:
        """The piece's mask on an image of this size; InputError naming it when bad."""
        from sam2pal.io.masks import decode_segmentation

        try:
            if self.kind == "polygon":
                points = np.asarray(self.data, dtype=float)
                if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
                    raise ValueError("a polygon needs at least 3 points [x, y]")
                if not np.isfinite(points).all():
                    raise ValueError("a polygon point is not a number")
                pixels = points / 100.0 * [width, height]
                return decode_segmentation([pixels.reshape(-1).tolist()], height, width)
            if self.kind == "brush":
                return brush_mask(self.data, height, width)
            return decode_segmentation(self.data, height, width)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise InputError(f"{self.where}: invalid {self.category} region ({reason})") from None


@dataclass
class ImageCorrection:
    """A reviewed image of a corrections file: its regions, size when the file gives it,
    and when it was reviewed."""

    name: str  # the image's name in the corrections file
    source: str  # the corrections file
    where: str  # for errors
    pieces: list[Piece] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (width, height)
    reviewed_at: str | None = None
    upload_prefixed: bool = False  # a Label Studio upload name: may start "<8 hex>-"

    def stamp(self, when: str) -> dict:
        """The `corrected` entry of its structures."""
        stamp = {"when": when, "source": self.source}
        if self.reviewed_at:
            stamp["reviewed_at"] = self.reviewed_at
        return stamp


def read_corrections(path: str | os.PathLike) -> list[ImageCorrection]:
    """The reviewed images of a corrections file, Label Studio JSON export or COCO.

    Args:
        path: the file.

    Returns:
        Its reviewed images, in file order. Raises InputError (one line naming the file)
        when it is neither format or holds no reviewed image.
    """
    path = Path(path)
    data = read_json(path, "corrections file")
    if isinstance(data, list):
        images = read_labelstudio(path, data)
    elif isinstance(data, dict) and {"images", "annotations", "categories"} <= set(data):
        images = read_coco_corrections(path, data)
    else:
        raise InputError(
            f"{path}: neither a Label Studio JSON export (a list of tasks) nor a COCO file "
            "(an object with images, annotations and categories)"
        )
    if not images:
        raise InputError(f"{path}: no reviewed image in this file (no submitted annotation)")
    return images


def _task_name(data: dict) -> tuple[str, bool] | None:
    """(image name, whether it may carry Label Studio's upload prefix) of a task."""
    name = data.get("file_name")
    if isinstance(name, str) and name.strip():
        return name, False
    image = data.get("image")
    if not isinstance(image, str) or not image.strip():
        return None
    return _url_name(image), True


def _url_name(text: str) -> str:
    """The image's name in a Label Studio URL: the path of a local-files URL
    (`...?d=<path>`), else the bare name (an upload: `/data/upload/1/<8 hex>-<name>`)."""
    url = urlparse(text)
    local = parse_qs(url.query).get("d")
    if local:  # relative to the served folder: the file name, folders included
        return PurePosixPath(local[0].replace("\\", "/")).as_posix()
    return PurePosixPath(unquote(url.path).replace("\\", "/")).name


def _latest_annotation(task: dict):
    """The task's latest annotation that was not cancelled (None: not reviewed)."""
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        return None
    kept = [
        (str(a.get("updated_at") or a.get("created_at") or ""), i, a)
        for i, a in enumerate(annotations)
        if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    return max(kept, key=lambda item: item[:2])[2] if kept else None


def _instance_of(result: dict) -> int | None:
    meta = result.get("meta")
    texts = meta.get("text") if isinstance(meta, dict) else None
    if isinstance(texts, str):
        texts = [texts]
    for text in texts or []:
        found = _INSTANCE_TEXT.search(str(text))
        if found:
            return int(found.group(1))
    return None


def _labelstudio_piece(result, where: str) -> Piece | None:
    """The region of one result of an annotation (None: not a region, e.g. a choice)."""
    if not isinstance(result, dict):
        raise InputError(f"{where}: a result is not an object")
    kind = str(result.get("type", "")).lower()
    value = result.get("value") if isinstance(result.get("value"), dict) else {}
    if kind in _OTHER_REGIONS:
        raise InputError(
            f"{where}: {kind} regions are not masks: correct the structures with "
            "PolygonLabels or BrushLabels"
        )
    if kind not in ("polygonlabels", "brushlabels"):
        return None
    labels = value.get(kind)
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise InputError(f"{where}: a {kind} region needs exactly one structure label")
    if kind == "polygonlabels":
        points = value.get("points")
        if not isinstance(points, list):
            raise InputError(f"{where}: a {labels[0]} polygon has no points")
        return Piece(labels[0], _instance_of(result), "polygon", points, where)
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise InputError(f"{where}: a {labels[0]} brush region has no RLE (value.rle)")
    return Piece(labels[0], _instance_of(result), "brush", value["rle"], where)


def _result_size(result) -> tuple[int, int] | None:
    if not isinstance(result, dict):
        return None
    width, height = result.get("original_width"), result.get("original_height")
    if isinstance(width, (int, float)) and isinstance(height, (int, float)):
        return int(width), int(height)
    return None


def read_labelstudio(path: str | os.PathLike, tasks: list) -> list[ImageCorrection]:
    """The reviewed images of a Label Studio JSON export.

    Args:
        path: the file (named in errors and in the `corrected` source).
        tasks: its content, a list of tasks.

    Returns:
        One `ImageCorrection` per task with a submitted (not cancelled) annotation.
    """
    path = Path(path)
    images = []
    for index, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise InputError(
                f"{path}: tasks[{index}] is not a Label Studio task (an object with 'data')"
            )
        label = f"task {task.get('id', index)}"
        named = _task_name(task["data"])
        if named is None:
            raise InputError(f"{path}: {label} has neither data.file_name nor data.image")
        annotation = _latest_annotation(task)
        if annotation is None:
            continue
        where = f"{path}: {label} ({named[0]})"
        results = annotation.get("result") or []
        if not isinstance(results, list):
            raise InputError(f"{where}: the annotation's result is not a list")
        pieces = [p for r in results if (p := _labelstudio_piece(r, where)) is not None]
        sizes = {s for r in results if (s := _result_size(r)) is not None}
        if len(sizes) > 1:
            raise InputError(f"{where}: regions drawn on images of different sizes")
        images.append(
            ImageCorrection(
                name=named[0],
                source=str(path),
                where=where,
                pieces=pieces,
                size=next(iter(sizes)) if sizes else None,
                reviewed_at=annotation.get("updated_at") or annotation.get("created_at"),
                upload_prefixed=named[1],
            )
        )
    return images


def read_coco_corrections(path: str | os.PathLike, data: dict) -> list[ImageCorrection]:
    """The images of a COCO corrections file (CVAT's or Label Studio's COCO export).

    Args:
        path: the file.
        data: its content.

    Returns:
        One `ImageCorrection` per image: an annotation is an instance, or a piece of the
        instance its `attributes.instance` names.
    """
    from sam2pal.io.coco import check_annotation, check_categories, check_images, whole_number

    path = Path(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise InputError(f"{path}: '{key}' must be a list")
    images = check_images(path, data["images"])
    categories = check_categories(path, data["categories"])
    corrections = {}
    for iid, image in images.items():
        where = f"{path}: image {image['file_name']!r}"
        # Label Studio's COCO export names an image by its URL
        url = "?d=" in image["file_name"] or image["file_name"].startswith("/data/")
        corrections[iid] = ImageCorrection(
            name=_url_name(image["file_name"]) if url else image["file_name"],
            source=str(path),
            where=where,
            size=(image["width"], image["height"]),
            upload_prefixed=url,
        )
    seen: set = set()
    for index, ann in enumerate(data["annotations"]):
        check_annotation(path, index, ann, images, categories, seen)
        attributes = ann.get("attributes") if isinstance(ann.get("attributes"), dict) else {}
        instance = whole_number(attributes.get("instance"))
        correction = corrections[ann["image_id"]]
        correction.pieces.append(
            Piece(
                categories[ann["category_id"]]["name"],
                instance if instance is not None and instance > 0 else None,
                "coco",
                ann["segmentation"],
                f"{path}: annotation {ann['id']!r} on {correction.name!r}",
            )
        )
    return list(corrections.values())


# -- matching to the results ------------------------------------------------------------


def record_sizes(record_paths: Iterable[str | os.PathLike]) -> dict[str, tuple[int, int] | None]:
    """{file name: (width, height), None for a skipped image} of result files."""
    sizes: dict[str, tuple[int, int] | None] = {}
    for path in record_paths:
        for record in read_records(path):
            sizes[record.file_name] = (
                None if record.is_skipped else (int(record.width), int(record.height))
            )
    return sizes


def _match_file(correction: ImageCorrection, names: list[str]) -> str | None:
    from sam2pal.outputs.evaluate import match_names

    tried = [correction.name]
    if correction.upload_prefixed and _UPLOAD_PREFIX.match(correction.name):
        tried.append(_UPLOAD_PREFIX.sub("", correction.name, count=1))
    for name in tried:
        found = match_names([name], names).get(name)
        if found is not None:
            return found
    return None


def load_corrections(
    paths: Iterable[str | os.PathLike],
    sizes: dict[str, tuple[int, int] | None],
    categories: dict[int, str],
) -> dict[str, ImageCorrection]:
    """The corrections of several files, matched to the images of the results.

    Args:
        paths: the corrections files; a later one wins for an image in several.
        sizes: `record_sizes` of the results.
        categories: {category id: structure name} of the results.

    Returns:
        {file name in the results: its correction}. Raises InputError naming the file
        for an image not in the results (or skipped there, or of another size), an
        image twice in one file, or an unknown structure name.
    """
    names = sorted(sizes)
    known = set(categories.values())
    merged: dict[str, ImageCorrection] = {}
    for path in paths:
        own: dict[str, ImageCorrection] = {}
        for correction in read_corrections(path):
            target = _match_file(correction, names)
            if target is None:
                raise InputError(
                    f"{correction.where}: no image of that name in the results "
                    f"({len(names)} images, e.g. {names[0] if names else 'none'})"
                )
            if target in own:
                raise InputError(f"{correction.where}: the file reviews {target} twice")
            size = sizes[target]
            if size is None:
                raise InputError(
                    f"{correction.where}: {target} could not be read when it was segmented"
                )
            if correction.size is not None and tuple(correction.size) != size:
                raise InputError(
                    f"{correction.where}: drawn on a {correction.size[0]}x{correction.size[1]} "
                    f"image, but {target} is {size[0]}x{size[1]} (width x height)"
                )
            for piece in correction.pieces:
                if piece.category not in known:
                    raise InputError(
                        f"{piece.where}: unknown structure {piece.category!r} "
                        f"(the results have {', '.join(categories.values())})"
                    )
            own[target] = correction
        merged.update(own)
    return merged


# -- applying them ----------------------------------------------------------------------


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


def _instances(pieces: list[Piece], height: int, width: int, single: bool) -> list[np.ndarray]:
    """The reviewer's instances of one structure: its pieces grouped (all of them for a
    structure with one instance), in the order first drawn."""
    groups: dict = {}
    for index, piece in enumerate(pieces):
        key = 0 if single else (("instance", piece.group) if piece.group else ("piece", index))
        mask = piece.mask(height, width)
        groups[key] = mask if key not in groups else (groups[key] | mask)
    return [m for m in groups.values() if m.any()]


def _assign(predicted: list[StructureRecord], drawn: list[np.ndarray], height: int, width: int):
    """{instance number: drawn mask}: the drawn instances matched to the predicted ones by
    overlap (Hungarian on IoU), the others given the numbers left over, then new ones."""
    from scipy.optimize import linear_sum_assignment

    from sam2pal.io.masks import decode_segmentation

    present = [s for s in predicted if s.area > 0]
    out: dict[int, np.ndarray] = {}
    unmatched = list(range(len(drawn)))
    if present and drawn:
        masks = [decode_segmentation(s.segmentation, height, width) for s in present]
        iou = np.array([[_iou(p, d) for d in drawn] for p in masks])
        for row, col in zip(*linear_sum_assignment(-iou), strict=True):
            if iou[row, col] > 0:
                out[present[row].instance] = drawn[col]
                unmatched.remove(col)
    free = [
        s.instance for s in sorted(predicted, key=lambda s: s.instance) if s.instance not in out
    ]
    following = max([s.instance for s in predicted], default=0) + 1
    for col in unmatched:
        if free:
            out[free.pop(0)] = drawn[col]
        else:
            out[following] = drawn[col]
            following += 1
    return out


def _corrected_structure(
    category_id: int, instance: int, mask: np.ndarray | None, old, stamp: dict, size
) -> StructureRecord:
    from sam2pal.io.masks import BoxMask

    box = BoxMask.from_full(mask) if mask is not None else BoxMask.empty(size)
    return StructureRecord(
        category_id=category_id,
        instance=instance,
        segmentation=box.rle(),
        area=box.area,
        bbox=box.bbox(),
        score=old.score if old is not None else 0.0,
        predicted_iou=old.predicted_iou if old is not None else 0.0,
        object_score=old.object_score if old is not None else 0.0,
        cycle_iou=old.cycle_iou if old is not None else None,
        stability=old.stability if old is not None else None,
        corrected=dict(stamp),
    )


def correct_record(
    record: ImageRecord,
    correction: ImageCorrection,
    categories: dict[int, str],
    multi_instance: set[int],
    when: str,
) -> ImageRecord:
    """An image's record with the reviewer's masks in place of the predictions.

    Args:
        record: the image's result.
        correction: its review.
        categories: {category id: structure name}.
        multi_instance: the category ids with several instances per template.
        when: the time of the import (ISO 8601).

    Returns:
        A new record: every structure of the image marked corrected, those the reviewer
        drew with the drawn mask, the others absent.
    """
    height, width = int(record.height), int(record.width)
    by_name = {name: cid for cid, name in categories.items()}
    pieces: dict[int, list[Piece]] = defaultdict(list)
    for piece in correction.pieces:
        pieces[by_name[piece.category]].append(piece)
    predicted: dict[int, list[StructureRecord]] = defaultdict(list)
    for s in record.structures:
        predicted[s.category_id].append(s)
    stamp = correction.stamp(when)
    structures = []
    for cid in sorted(set(predicted) | set(pieces)):
        drawn = _instances(pieces.get(cid, []), height, width, cid not in multi_instance)
        assigned = _assign(predicted.get(cid, []), drawn, height, width)
        old = {s.instance: s for s in predicted.get(cid, [])}
        for instance in sorted(set(old) | set(assigned)):
            structures.append(
                _corrected_structure(
                    cid, instance, assigned.get(instance), old.get(instance), stamp, (height, width)
                )
            )
    return ImageRecord(
        file_name=record.file_name,
        width=record.width,
        height=record.height,
        structures=structures,
        frame_index=record.frame_index,
        time_s=record.time_s,
        segmented_by=record.segmented_by,
        orientation=record.orientation,
    )


def sorted_records(record_paths: Iterable[str | os.PathLike]) -> Iterator[ImageRecord]:
    """The records of result files (each in file-name order), merged in file-name order."""
    streams = [read_records(p) for p in record_paths]
    return heapq.merge(*streams, key=lambda r: r.file_name)


def apply_corrections(
    record_paths: Iterable[str | os.PathLike],
    templates_json: str | os.PathLike,
    corrections: Iterable[str | os.PathLike],
    out_jsonl: str | os.PathLike,
    when: str | None = None,
) -> dict:
    """Write the collection's records with the corrections applied (reviewed.jsonl).

    Args:
        record_paths: the result files of the segmentation (left as they are).
        templates_json: the prepared templates (the structures and their instances).
        corrections: the corrections files, Label Studio JSON or COCO.
        out_jsonl: the records file to write, in file-name order, atomically.
        when: the time recorded as `corrected.when` (default: now).

    Returns:
        {"images": records written, "corrected": images corrected}. Raises InputError
        (naming the file) on a bad corrections file, before `out_jsonl` is replaced.
    """
    from sam2pal.inference.pipeline import categories_of

    record_paths = [Path(p) for p in record_paths]
    categories, multi = categories_of(templates_json)
    fixes = load_corrections(corrections, record_sizes(record_paths), categories)
    when = when or now()
    counts = {"images": 0, "corrected": 0}
    with atomic_write(out_jsonl) as out:
        for record in sorted_records(record_paths):
            if record.file_name in fixes:
                record = correct_record(record, fixes[record.file_name], categories, multi, when)
                counts["corrected"] += 1
            out.write(record.to_line())
            counts["images"] += 1
    return counts


# -- the accuracy estimate --------------------------------------------------------------


def read_sample(path: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """{file name in the results: "worst" | "random"} of a review_sample.csv.

    Args:
        path: the file `sam2pal review export` wrote.
        names: the images of the results.

    Returns:
        The sample; InputError naming the file when it is not one or names an image the
        results do not have.
    """
    from sam2pal.outputs.evaluate import match_names

    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise InputError(f"{path}: review sample file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read the review sample ({exc})") from None
    if rows and not {"file_name", "selected_by"} <= set(rows[0]):
        raise InputError(f"{path}: not a review_sample.csv (needs file_name and selected_by)")
    names = sorted(names)
    sample = {}
    for number, row in enumerate(rows, start=2):
        kind = (row.get("selected_by") or "").strip()
        if kind not in SAMPLE_NOTES:
            raise InputError(f"{path}, line {number}: selected_by {kind!r} is not worst or random")
        name = row.get("file_name") or ""
        found = match_names([name], names).get(name)
        if found is None:
            raise InputError(f"{path}, line {number}: {name!r} is not an image of the results")
        sample[found] = kind
    return sample


def bootstrap_mean(
    per_image: list[list[float]],
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> tuple[float, float | None, float | None]:
    """The mean of values grouped by image, with a percentile bootstrap interval over
    images.

    Args:
        per_image: the values of each image (images without values are left out).
        seed: seed of the resampling.
        resamples: how many times the images are resampled.
        confidence: the interval's coverage.

    Returns:
        (mean of all values, low, high); the bounds are None with fewer than two images.
    """
    groups = [g for g in per_image if g]
    sums = np.array([sum(g) for g in groups], dtype=float)
    counts = np.array([len(g) for g in groups], dtype=float)
    mean = float(sums.sum() / counts.sum())
    if len(groups) < 2:
        return mean, None, None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(resamples, len(groups)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return mean, float(low), float(high)


def structure_errors(
    predicted: ImageRecord, corrected: ImageRecord, categories: dict[int, str]
) -> list[tuple[str, dict[str, float]]]:
    """How far an image's predictions are from its corrections.

    Args:
        predicted: the image's record from the segmentation.
        corrected: its record with the corrections applied.
        categories: {category id: structure name}.

    Returns:
        [(structure name, {"iou": ..., "<measure>_rel_error": ...,
        "<measure>_rel_bias": ...})], one per structure instance present on either side
        (the relative errors only when it is present on both).
    """
    from sam2pal.io.masks import decode_segmentation
    from sam2pal.outputs.measure import measure_mask

    height, width = int(corrected.height), int(corrected.width)
    pred = {s.key: s for s in predicted.structures}
    fixed = {s.key: s for s in corrected.structures}
    out = []
    for key in sorted(set(pred) | set(fixed)):
        a, b = pred.get(key), fixed.get(key)
        has_a, has_b = a is not None and a.area > 0, b is not None and b.area > 0
        if not (has_a or has_b):
            continue
        values: dict[str, float] = {}
        if has_a and has_b:
            mask_a = decode_segmentation(a.segmentation, height, width)
            mask_b = decode_segmentation(b.segmentation, height, width)
            values["iou"] = _iou(mask_a, mask_b)
            measured_a, measured_b = measure_mask(mask_a), measure_mask(mask_b)
            for name in SUMMARY_MEASURES:
                va, vb = measured_a[name], measured_b[name]
                if math.isfinite(va) and math.isfinite(vb) and vb > 0:
                    values[f"{name}_rel_error"] = abs(va - vb) / vb
                    values[f"{name}_rel_bias"] = (va - vb) / vb
        else:
            values["iou"] = 0.0
        out.append((categories.get(key[0], str(key[0])), values))
    return out


def summary_quantities() -> list[str]:
    """The quantities of review_summary.csv, in row order."""
    return ["iou"] + [f"{m}_rel_{kind}" for m in SUMMARY_MEASURES for kind in ("error", "bias")]


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"


def review_summary(
    record_paths: Iterable[str | os.PathLike],
    reviewed_jsonl: str | os.PathLike,
    templates_json: str | os.PathLike,
    sample_csv: str | os.PathLike,
    out_csv: str | os.PathLike,
    seed: int = BOOTSTRAP_SEED,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Write review_summary.csv: the predictions against the corrections, on the images
    of the review sample that were reviewed (see the module docstring).

    Args:
        record_paths: the result files of the segmentation.
        reviewed_jsonl: the records with the corrections applied (`apply_corrections`).
        templates_json: the prepared templates (the structure names).
        sample_csv: review_sample.csv.
        out_csv: the table to write, atomically.
        seed: seed of the bootstrap.
        log: where notes go (sample images not reviewed).

    Returns:
        The rows written (`SUMMARY_COLUMNS`, values as written).
    """
    from sam2pal.inference.pipeline import categories_of

    categories, _ = categories_of(templates_json)
    record_paths = [Path(p) for p in record_paths]
    sample = read_sample(sample_csv, record_sizes([reviewed_jsonl]))
    # per sample, structure and quantity: the values of each reviewed image
    values: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    reviewed = {"random": 0, "worst": 0}
    pairs = zip_longest(sorted_records(record_paths), sorted_records([reviewed_jsonl]))
    for predicted, corrected in pairs:
        if predicted is None or corrected is None or predicted.file_name != corrected.file_name:
            raise InputError(
                f"{reviewed_jsonl}: does not hold the images of the segmentation's results"
            )
        kind = sample.get(corrected.file_name)
        if kind is None or not any(s.corrected for s in corrected.structures):
            continue
        reviewed[kind] += 1
        per_image: dict = defaultdict(lambda: defaultdict(list))
        for name, found in structure_errors(predicted, corrected, categories):
            for quantity, value in found.items():
                per_image[name][quantity].append(value)
                per_image["all"][quantity].append(value)
        for name, quantities in per_image.items():
            for quantity, found in quantities.items():
                values[kind][name][quantity].append(found)
    for kind, total in sorted(Counter(sample.values()).items()):
        if reviewed[kind] < total and log is not None:
            log(
                f"note: {total - reviewed[kind]} of the {total} {kind} images of {sample_csv} "
                "are not reviewed in the corrections"
            )
    rows = []
    for kind in ("random", "worst"):
        for name in [*categories.values(), "all"]:
            for quantity in summary_quantities():
                per_image = values[kind][name][quantity]
                if not per_image:
                    continue
                mean, low, high = bootstrap_mean(per_image, seed=seed)
                rows.append(
                    {
                        "sample": kind,
                        "structure": name,
                        "quantity": quantity,
                        "n_images": len(per_image),
                        "n": sum(len(v) for v in per_image),
                        "mean": _fmt(mean),
                        "ci_low": _fmt(low),
                        "ci_high": _fmt(high),
                        "note": SAMPLE_NOTES[kind],
                    }
                )
    with atomic_write(out_csv) as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


# -- a results folder of the command line -------------------------------------------------


def _polygon_predictions(predictions_json: Path) -> bool:
    """Whether a predictions.json holds its segmentations as polygons (`--polygons`)."""
    import ijson

    if not predictions_json.is_file():
        return False
    with open(predictions_json, "rb") as handle:
        first = next(ijson.items(handle, "annotations.item.segmentation"), None)
    return isinstance(first, list)


def _measured_in_mm(measurements_csv: Path) -> bool:
    """Whether a measurement table has millimetre columns (the run had a scale)."""
    from sam2pal.outputs.measure import MM_COLUMNS

    if not measurements_csv.is_file():
        return False
    with open(measurements_csv, encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), [])
    return any(column in header for column in MM_COLUMNS)


def _results_files(results: Path) -> tuple[Path, Path, Path]:
    """(records, templates, run file) of a results folder of `sam2pal segment` or
    `sam2pal video`; InputError when it is not one."""
    records, templates, run = (
        results / "predictions.jsonl",
        results / "templates.json",
        results / "run.json",
    )
    if not results.is_dir():
        raise InputError(f"{results}: results folder not found")
    if not records.is_file() and (results / "propagate").is_dir():
        raise InputError(
            f"{results}: results of the workflow: add the corrections to the collection's "
            "`corrections` in the config and run snakemake again"
        )
    for path in (records, templates, run):
        if not path.is_file():
            raise InputError(
                f"{results}: no {path.name}: not a results folder of sam2pal segment or video"
            )
    return records, templates, run


def import_corrections(
    results_dir: str | os.PathLike,
    corrections: Iterable[str | os.PathLike],
    review_dir: str | os.PathLike | None = None,
    px_per_mm: float | None = None,
    calibration_csv: str | os.PathLike | None = None,
    when: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Bring corrections back into a results folder of `sam2pal segment` or `video`.

    The segmentation's records (predictions.jsonl) are left as they are: every import
    starts from them, so importing again with more corrections files gives the outputs
    of all of them. reviewed.jsonl, predictions.json (its format kept: RLE or polygons),
    qc.csv, measurements.csv and measurements_wide.csv are replaced, and, with a review
    folder, review_summary.csv; all of them only once every one is computed.

    Args:
        results_dir: the results folder (OUTPUT_DIR of the run).
        corrections: the corrections files (Label Studio JSON export or COCO).
        review_dir: the folder of `sam2pal review export` (its review_sample.csv tells
            the random sample from the worst images); None: no accuracy estimate.
        px_per_mm, calibration_csv: the scale the run was measured with; required when
            its measurement tables have millimetre columns.
        when: the time recorded as `corrected.when` (default: now).
        log: where notes go.

    Returns:
        The counts of `apply_corrections`, and "summary_rows" (None without a review
        folder). Raises InputError (one line naming the file) on bad input, with nothing
        in the folder changed.
    """
    from sam2pal.inference import pipeline
    from sam2pal.outputs.measure import measure_coco

    results = Path(results_dir)
    corrections = [Path(p) for p in corrections]
    if not corrections:
        raise InputError("give at least one corrections file")
    records, templates, run = _results_files(results)
    if (
        px_per_mm is None
        and calibration_csv is None
        and _measured_in_mm(results / "measurements.csv")
    ):
        raise InputError(
            f"{results / 'measurements.csv'}: has millimetre columns: give the run's "
            "--px_per_mm or --calibration_csv so that they are measured again"
        )
    sample = None
    if review_dir is not None:
        sample = Path(review_dir) / REVIEW_SAMPLE
        if not sample.is_file():
            raise InputError(
                f"{review_dir}: no {REVIEW_SAMPLE} (the folder of sam2pal review export)"
            )
    polygons = _polygon_predictions(results / "predictions.json")
    staging = Path(tempfile.mkdtemp(prefix=".review-import.", dir=results))
    try:
        reviewed = staging / REVIEWED_RECORDS
        counts = apply_corrections([records], templates, corrections, reviewed, when=when)
        pipeline.merge(
            [reviewed], templates, [run], staging / "predictions.json", polygons=polygons
        )
        pipeline.qc([reviewed], templates, staging / "qc.csv")
        measure_coco(
            staging / "predictions.json",
            staging / "measurements.csv",
            px_per_mm=px_per_mm,
            calibration_csv=calibration_csv,
            wide_csv=staging / "measurements_wide.csv",
        )
        counts["summary_rows"] = None
        if sample is not None:
            rows = review_summary(
                [records], reviewed, templates, sample, staging / REVIEW_SUMMARY, log=log
            )
            counts["summary_rows"] = len(rows)
        for path in sorted(staging.iterdir()):
            os.replace(path, results / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stale = results / REVIEW_SUMMARY
    if sample is None and stale.exists():
        stale.unlink()
        log(f"removed {stale}: it was made from other corrections; give --review to estimate again")
    for folder in ("masks", "overlays"):
        if (results / folder).is_dir():
            log(
                f"note: {results / folder} still shows the predictions before correction; "
                f"make it again from {results / 'predictions.json'} with `sam2pal {folder}`"
            )
    return counts


# -- corrections as templates -------------------------------------------------------------


def corrected_templates(templates, paths: Iterable[str | os.PathLike], image_dir):
    """The template set with the reviewed images of corrections files as more templates.

    A reviewed image is annotated in full: what the reviewer kept or drew is the truth,
    so it can be a template (in the memory and in palindrome training) for the rest of
    the collection. Its structures are named by category; a structure with one instance
    per template takes all its pieces, one with several takes the instance numbers of
    the review export's regions ("instance n" in Label Studio, the `instance` attribute
    in COCO), which are the numbers the templates' instances go by. The masks come from
    the corrections files alone (not from the results), so the segmentation can use them
    without depending on itself.

    Args:
        templates: the collection's `sam2pal.io.templates.TemplateSet`.
        paths: the corrections files (a later file wins for an image in several).
        image_dir: the collection's images (the reviewed images are found there by name).

    Returns:
        A new TemplateSet: the templates, then the reviewed images that are not templates
        already, in file-name order. Raises InputError (one line naming the file) for an
        image not in `image_dir`, an unknown structure, or a region of a structure with
        several instances that does not say which instance it is.
    """
    from sam2pal.io.images import list_images, read_image_size
    from sam2pal.io.templates import TemplateImage, TemplateInstance, TemplateSet

    image_dir = Path(image_dir)
    names = list_images(image_dir, recursive=True)
    ids = {name: cid for cid, name in templates.categories.items()}
    counts: dict[int, int] = {}
    for image in templates.images:
        for inst in image.instances:
            counts[inst.category_id] = max(counts.get(inst.category_id, 0), inst.instance)
    reviewed: dict[str, ImageCorrection] = {}
    for path in paths:
        own: dict[str, ImageCorrection] = {}
        for correction in read_corrections(path):
            target = _match_file(correction, names)
            if target is None:
                raise InputError(f"{correction.where}: no image of that name in {image_dir}")
            if target in own:
                raise InputError(f"{correction.where}: the file reviews {target} twice")
            own[target] = correction
        reviewed.update(own)
    known = {image.file_name for image in templates.images}
    added = []
    next_id = max((image.image_id for image in templates.images), default=0) + 1
    next_annotation = 1 + max(
        (inst.annotation_id for image in templates.images for inst in image.instances), default=0
    )
    for name in sorted(reviewed):
        if Path(name).name in known or name in known:
            continue
        correction = reviewed[name]
        path = image_dir / name
        width, height = read_image_size(path)  # upright, as the templates'
        if correction.size is not None and tuple(correction.size) != (width, height):
            raise InputError(
                f"{correction.where}: drawn on a {correction.size[0]}x{correction.size[1]} "
                f"image, but {path} is {width}x{height} (width x height)"
            )
        by_category: dict[int, list[Piece]] = {}
        for piece in correction.pieces:
            if piece.category not in ids:
                raise InputError(
                    f"{piece.where}: unknown structure {piece.category!r} "
                    f"(the templates have {', '.join(templates.categories.values())})"
                )
            by_category.setdefault(ids[piece.category], []).append(piece)
        instances = []
        for cid, pieces in sorted(by_category.items()):
            several = counts.get(cid, 1) > 1
            groups: dict[int, np.ndarray] = {}
            for piece in pieces:
                if several and not piece.group:
                    raise InputError(
                        f"{piece.where}: a {piece.category} region without its instance "
                        f"({piece.category} has {counts[cid]} per template): as a template, "
                        "each region must say which instance it is"
                    )
                number = int(piece.group) if several else 1
                mask = piece.mask(height, width)
                groups[number] = mask if number not in groups else groups[number] | mask
            for number, mask in sorted(groups.items()):
                if mask.any():
                    instances.append(TemplateInstance(next_annotation, cid, number, mask))
                    next_annotation += 1
        if not instances:
            continue  # the reviewer removed every structure: nothing to show the model
        added.append(TemplateImage(name, path.resolve(), width, height, next_id, instances))
        next_id += 1
    return TemplateSet(categories=dict(templates.categories), images=[*templates.images, *added])
