"""Per-image result records, and the JSON-lines files that hold them.

A segmentation run writes one record per image (or video frame), one JSON object a
line:

    {"file_name": ..., "width": ..., "height": ...,
     "structures": [{"category_id", "instance", "segmentation" (COCO RLE), "area", "bbox",
                     "score", "predicted_iou", "object_score", "cycle_iou", "clamped"
                     [, "stability"] [, "keyframe": true]
                     [, "zoomed": true [, "zoom_placed": true]]
                     [, "corrected": {"when", "source" [, "reviewed_at"]}]},
                    ...]
     [, "orientation": {"rotation", "mirrored", "candidates"}]
     [, "frame_index": ..., "time_s": ...] [, "segmented_by": {...}]}

(`stability`: SAM's stability score of the mask, absent where it is not a prediction
and in records written before it was recorded; `orientation`: the orientation found by
propagate.orientation's search, when searched;
see `ImageRecord`; `corrected`: the mask is a reviewer's correction brought back by
`sam2pal.outputs.corrections`, see `StructureRecord`)

or, for a bad image file, ``{"file_name": ..., "skipped": "<reason>"}`` (a video frame's
record carries its `frame_index` and `time_s` too). `ImageRecord` and
`StructureRecord` are these records; `to_json` gives the JSON object with its keys in
this order, `from_json` reads one back, so that a record read and written again is the
same text.

While a run goes on, its records are appended to ``<out>.partial`` (`PartialRecords`),
whose first line holds a key of the run's settings; at the end they are copied to
``<out>`` in file-name order, atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_write

PARTIAL_SUFFIX = ".partial"

_STRUCTURE_KEYS = (
    "category_id",
    "instance",
    "segmentation",
    "area",
    "bbox",
    "score",
    "predicted_iou",
    "object_score",
    "cycle_iou",
    "clamped",
)


# the structure's optional keys, written only when true
_STRUCTURE_FLAGS = ("keyframe", "zoomed", "zoom_placed")


def _rounded(value) -> float | None:
    return None if value is None else round(float(value), 6)


@dataclass
class StructureRecord:
    """One structure of an image: its mask (COCO RLE), area, bbox and scores."""

    category_id: int
    instance: int
    segmentation: dict
    area: int
    bbox: list
    score: float
    predicted_iou: float
    object_score: float
    cycle_iou: float | None = None
    clamped: bool = False
    stability: float | None = None  # SAM's stability score of the predicted mask
    keyframe: bool = False
    zoomed: bool = False  # the mask and scores come from the zoom pass
    zoom_placed: bool = False  # its window was placed from the template
    # a reviewer's correction replaced the mask: {"when": ISO time of the import,
    # "source": the corrections file [, "reviewed_at": the annotation's time]}; the
    # scores stay those of the prediction it replaced
    corrected: dict | None = None

    @classmethod
    def from_prediction(cls, pred, keyframe: bool = False) -> StructureRecord:
        """The record of a `sam2pal.inference.engine.StructurePrediction`.

        Args:
            pred: the prediction (its `box` is a `sam2pal.io.masks.BoxMask`).
            keyframe: the mask is a video keyframe's annotation.

        Returns:
            The record, with the scores rounded to 6 decimals.
        """
        box = pred.box
        return cls(
            category_id=int(pred.category_id),
            instance=int(pred.instance),
            segmentation=box.rle(),
            area=box.area,
            bbox=box.bbox(),
            score=round(pred.score, 6),
            predicted_iou=_rounded(pred.predicted_iou),
            object_score=_rounded(pred.object_score),
            cycle_iou=_rounded(pred.cycle_iou),
            clamped=bool(pred.clamped),
            stability=_rounded(getattr(pred, "stability", None)),
            keyframe=keyframe,
            zoomed=bool(getattr(pred, "zoomed", False)),
            zoom_placed=bool(getattr(pred, "zoom_placed", False)),
        )

    @property
    def key(self) -> tuple[int, int]:
        """(category_id, instance)."""
        return self.category_id, self.instance

    def to_json(self) -> dict:
        """The JSON object of the record (`stability` only when known, `keyframe`,
        `zoomed` and `zoom_placed` only when true, `corrected` only when set)."""
        data = {name: getattr(self, name) for name in _STRUCTURE_KEYS}
        if self.stability is not None:
            data["stability"] = self.stability
        for flag in _STRUCTURE_FLAGS:
            if getattr(self, flag):
                data[flag] = True
        if self.corrected is not None:
            data["corrected"] = self.corrected
        return data

    @classmethod
    def from_json(cls, data: dict) -> StructureRecord:
        """The record of a JSON object written by `to_json`; raises ValueError when it
        is not one."""
        _check_keys(
            data, _STRUCTURE_KEYS, ("stability", *_STRUCTURE_FLAGS, "corrected"), "structure"
        )
        corrected = data.get("corrected")
        if corrected is not None and not isinstance(corrected, dict):
            raise ValueError("structure record whose 'corrected' is not an object")
        return cls(
            **{name: data[name] for name in _STRUCTURE_KEYS},
            stability=data.get("stability"),
            **{flag: bool(data.get(flag)) for flag in _STRUCTURE_FLAGS},
            corrected=corrected,
        )


@dataclass
class ImageRecord:
    """The result of one image (or video frame): its size and structures, or the
    reason it was skipped."""

    file_name: str
    width: int | None = None
    height: int | None = None
    structures: list[StructureRecord] = field(default_factory=list)
    skipped: str | None = None
    frame_index: int | None = None
    time_s: float | None = None
    segmented_by: dict | None = None
    # {"rotation": 0/90/180/270, "mirrored": bool, "candidates": [{"rotation", "mirrored",
    # "score"}, ...]}: the photo shows the template turned `rotation` degrees clockwise,
    # after a left-right mirror when `mirrored`; None when the orientation was not searched
    orientation: dict | None = None

    @classmethod
    def skip(cls, file_name: str, reason: str) -> ImageRecord:
        """The record of an image skipped for `reason`."""
        return cls(file_name=file_name, skipped=reason)

    @property
    def is_skipped(self) -> bool:
        return self.skipped is not None

    def to_json(self) -> dict:
        """The JSON object of the record, keys in the order of the module docstring."""
        data: dict = {"file_name": self.file_name}
        if self.skipped is not None:
            data["skipped"] = self.skipped
        else:
            data["width"] = self.width
            data["height"] = self.height
            data["structures"] = [s.to_json() for s in self.structures]
            if self.orientation is not None:
                data["orientation"] = self.orientation
        if self.frame_index is not None:
            data["frame_index"] = self.frame_index
            data["time_s"] = self.time_s
        if self.segmented_by is not None:
            data["segmented_by"] = self.segmented_by
        return data

    def to_line(self) -> str:
        """The record as one line of a JSON-lines file (with its newline)."""
        return json.dumps(self.to_json()) + "\n"

    @classmethod
    def from_json(cls, data: dict) -> ImageRecord:
        """The record of a JSON object written by `to_json`; raises ValueError when it
        is not one."""
        optional = ("frame_index", "time_s", "segmented_by")
        if not isinstance(data, dict):
            raise ValueError(f"a record is a JSON object, not {type(data).__name__}")
        if "skipped" in data:
            _check_keys(data, ("file_name", "skipped"), optional, "skipped image")
            record = cls.skip(data["file_name"], data["skipped"])
        else:
            required = ("file_name", "width", "height", "structures")
            _check_keys(data, required, (*optional, "orientation"), "image")
            record = cls(
                file_name=data["file_name"],
                width=data["width"],
                height=data["height"],
                structures=[StructureRecord.from_json(s) for s in data["structures"]],
                orientation=data.get("orientation"),
            )
        record.frame_index = data.get("frame_index")
        record.time_s = data.get("time_s")
        record.segmented_by = data.get("segmented_by")
        return record


def _check_keys(data, required: tuple, optional: tuple, what: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"a {what} record is a JSON object, not {type(data).__name__}")
    missing = [k for k in required if k not in data]
    unknown = sorted(set(data) - set(required) - set(optional))
    if missing or unknown:
        problems = [f"no {', '.join(missing)}"] if missing else []
        problems += [f"unknown {', '.join(unknown)}"] if unknown else []
        raise ValueError(f"{what} record with {'; '.join(problems)}")


def parse_record(line: str | bytes, where="") -> ImageRecord:
    """The record of one line of a result file.

    Args:
        line: the JSON text of the record.
        where: the file (and line) it comes from, for the error.

    Returns:
        The record; raises InputError naming `where` when the line is not one.
    """
    try:
        return ImageRecord.from_json(json.loads(line))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where}: not a result record ({exc})") from None


def read_records(path: str | os.PathLike) -> Iterator[ImageRecord]:
    """The records of a finished JSON-lines result file.

    Args:
        path: the file.

    Returns:
        An iterator over its records; a line that is no record raises InputError
        naming the file and line.
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield parse_record(line, f"{path}, line {number}")


def skipped_of(paths: Iterable[str | os.PathLike]) -> tuple[int, list[tuple[str, str]]]:
    """The images of result files and the (file_name, reason) of those skipped.

    Args:
        paths: the result files.

    Returns:
        (number of records, skipped); only the lines that may be skipped records are
        parsed.
    """
    images, skipped = 0, []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                images += 1
                if '"skipped"' in line:
                    record = parse_record(line, f"{path}, line {number}")
                    if record.is_skipped:
                        skipped.append((record.file_name, record.skipped))
    return images, skipped


class RecordAppender:
    """Appends records to an open partial file, each flushed as soon as written."""

    def __init__(self, handle: IO[str]):
        self.handle = handle

    def append(self, record: ImageRecord) -> None:
        self.handle.write(record.to_line())
        self.handle.flush()

    def sync(self) -> int:
        """Flush to disk; returns the length of the file."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        return self.handle.tell()


class PartialRecords:
    """``<out>.partial``: the records of a run in progress under settings `key` (its
    first line), finalised into `out` when the run is done."""

    def __init__(self, out: str | os.PathLike, key: str):
        self.out = Path(out)
        self.path = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self.key = key

    def matches(self) -> bool:
        """Whether the partial file exists and was started with the same key."""
        if not self.path.exists():
            return False
        with open(self.path, "rb") as handle:
            try:
                header = json.loads(handle.readline())
            except ValueError:
                return False
        return isinstance(header, dict) and header.get("settings") == self.key

    def start(self) -> None:
        """A new partial file: only its header line."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"partial_of": self.out.name, "settings": self.key}) + "\n")

    def resume(self) -> set[str]:
        """File names already segmented in a partial file of the same key (none when
        there is no such file: `start` one). Skipped images are not among them: they
        are tried again, and their new record replaces the old one (`finalise`).

        A last line cut off by a crash is dropped (the file is truncated after the last
        complete record).
        """
        if not self.matches():
            return set()
        done: set[str] = set()
        with open(self.path, "rb") as handle:
            handle.readline()
            good_end = handle.tell()
            while line := handle.readline():
                if not line.endswith(b"\n"):
                    break
                try:
                    record = ImageRecord.from_json(json.loads(line))
                except (ValueError, TypeError):
                    break
                if record.is_skipped:
                    done.discard(record.file_name)
                else:
                    done.add(record.file_name)
                good_end = handle.tell()
        self.truncate(good_end)
        return done

    def truncate(self, end: int) -> None:
        """Cut the partial file back to its first `end` bytes."""
        with open(self.path, "rb+") as handle:
            handle.truncate(end)

    def size(self) -> int:
        return self.path.stat().st_size

    @contextlib.contextmanager
    def appender(self) -> Iterator[RecordAppender]:
        """A `RecordAppender` to the partial file, open for the `with` block."""
        with open(self.path, "a", encoding="utf-8") as handle:
            yield RecordAppender(handle)

    def finalise(self) -> None:
        """Copy the records to `out` in file-name order, atomically (the last record
        of an image that was tried again), and remove the partial file."""
        last = {}
        with open(self.path, "rb") as handle:
            handle.readline()
            while True:
                offset = handle.tell()
                line = handle.readline()
                if not line:
                    break
                last[json.loads(line)["file_name"]] = (offset, len(line))
        index = sorted((name, offset, length) for name, (offset, length) in last.items())
        with open(self.path, "rb") as src, atomic_write(self.out, "wb") as dst:
            for _, offset, length in index:
                src.seek(offset)
                dst.write(src.read(length))
        self.path.unlink()
