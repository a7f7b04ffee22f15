"""Run the engine over a collection, writing each image's result as soon as it is done.

Results go to a JSON-lines file, one record per image:

    {"file_name": ..., "width": ..., "height": ...,
     "structures": [{"category_id", "instance", "segmentation" (COCO RLE), "area", "bbox",
                     "score", "predicted_iou", "object_score", "cycle_iou", "clamped"}, ...]}

or, for an image that cannot be read, ``{"file_name": ..., "skipped": "<reason>"}``.
Structures predicted absent are kept with area 0 so that QC can report them.

While running, records are appended (and flushed) to ``<out>.partial``, whose first
line records a key of the model, templates and settings. If the run is interrupted,
the next run with the same key picks up where it stopped: nothing finished is lost.
At the end the records are rewritten in file-name order to ``<out>`` (atomically) and
the partial file is removed.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .atomic import atomic_write
from .errors import ImageReadError
from .masks import encode_rle, mask_bbox

PARTIAL_SUFFIX = ".partial"


def structure_record(pred) -> dict:
    """JSON record of one `engine.StructurePrediction`."""
    area = int(pred.mask.sum())
    return {
        "category_id": int(pred.category_id),
        "instance": int(pred.instance),
        "segmentation": encode_rle(pred.mask),
        "area": area,
        "bbox": mask_bbox(pred.mask),
        "score": round(pred.score, 6),
        "predicted_iou": round(float(pred.predicted_iou), 6),
        "object_score": round(float(pred.object_score), 6),
        "cycle_iou": None if pred.cycle_iou is None else round(float(pred.cycle_iou), 6),
        "clamped": bool(pred.clamped),
    }


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """Records of a finished JSON-lines result file."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _load_partial(partial: Path, key: str) -> set[str]:
    """File names already done in a partial file of the same key (else start over).

    A last line cut off by a crash is dropped (the file is truncated after the last
    complete record).
    """
    if not partial.exists():
        return set()
    done: set[str] = set()
    good_end = 0
    with open(partial, "rb") as handle:
        header = handle.readline()
        try:
            if json.loads(header).get("settings") != key:
                return set()
        except (ValueError, AttributeError):
            return set()
        good_end = handle.tell()
        while line := handle.readline():
            if not line.endswith(b"\n"):
                break
            try:
                done.add(json.loads(line)["file_name"])
            except (ValueError, KeyError, TypeError):
                break
            good_end = handle.tell()
    with open(partial, "rb+") as handle:
        handle.truncate(good_end)
    return done


def _finalise(partial: Path, out: Path) -> None:
    """Copy the partial file's records to `out` in file-name order, atomically."""
    index = []
    with open(partial, "rb") as handle:
        handle.readline()
        while True:
            offset = handle.tell()
            line = handle.readline()
            if not line:
                break
            name = json.loads(line)["file_name"]
            index.append((name, offset, len(line)))
    index.sort()
    with open(partial, "rb") as src, atomic_write(out, "wb") as dst:
        for _, offset, length in index:
            src.seek(offset)
            dst.write(src.read(length))
    partial.unlink()


def write_skipped(records_paths: Iterable[str | os.PathLike], out_csv: str | os.PathLike) -> int:
    """`skipped.csv` (file_name, reason) from result files; returns the count."""
    rows = []
    for path in records_paths:
        rows += [(r["file_name"], r["skipped"]) for r in read_records(path) if "skipped" in r]
    rows.sort()
    with atomic_write(out_csv) as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "reason"])
        writer.writerows(rows)
    return len(rows)


def _reason(exc: Exception, path: Path) -> str:
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def run_propagation(
    propagator,
    image_dir: str | os.PathLike,
    file_names: list[str],
    out_jsonl: str | os.PathLike,
    read_image: Callable | None = None,
    settings_key: str = "",
    on_bad_image: str = "skip",
    progress: bool = True,
    prefetch: int = 4,
    log=None,
    transform: Callable[[dict], dict] | None = None,
    reused: Iterable[dict] = (),
) -> dict:
    """Segment `file_names` (relative to `image_dir`) and write `out_jsonl`.

    transform: applied to each record before it is written (e.g. adds a video frame's
    index and time). reused: finished records of some of the images, taken as they are.

    on_bad_image: "skip" records an unreadable image as skipped and goes on; "fail"
    raises its ImageReadError (the partial file is kept for the next run).
    """
    from .progress import progress as progress_bar

    if read_image is None:
        from .images import read_image
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"on_bad_image must be 'skip' or 'fail', not {on_bad_image!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    image_dir = Path(image_dir)
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)

    done = _load_partial(partial, settings_key)
    if done:
        log(f"resuming: {len(done)} of {len(file_names)} images already done in {partial}")
    else:
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"partial_of": out.name, "settings": settings_key}) + "\n")
    n_reused = 0
    with open(partial, "a", encoding="utf-8") as handle:
        for record in reused:
            if record["file_name"] not in done:
                handle.write(json.dumps(record) + "\n")
                done.add(record["file_name"])
                n_reused += 1
    if n_reused:
        log(f"reused {n_reused} image(s) already segmented with the same settings")
    todo = [name for name in file_names if name not in done]

    def load(name: str):
        path = image_dir / name
        try:
            return read_image(path), None
        except ImageReadError as exc:
            return None, exc

    counts = {"images": len(file_names), "segmented": 0, "skipped": 0, "resumed": len(done) - n_reused,
              "reused": n_reused}
    with open(partial, "a", encoding="utf-8") as handle, ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(load, name) for name in todo[:prefetch]]
        bar = progress_bar(total=len(todo), desc=f"segment {out.stem or 'images'}", unit="img",
                           disable=not progress)
        for i, name in enumerate(todo):
            image, error = pending[i].result()
            pending[i] = None
            if i + prefetch < len(todo):
                pending.append(pool.submit(load, todo[i + prefetch]))
            if error is not None:
                if on_bad_image == "fail":
                    raise error
                record = {"file_name": name, "skipped": _reason(error, image_dir / name)}
                counts["skipped"] += 1
                log(f"skipped {name}: {record['skipped']}")
            else:
                predictions = propagator.predict(image)
                record = {
                    "file_name": name,
                    "width": int(image.shape[1]),
                    "height": int(image.shape[0]),
                    "structures": [structure_record(p) for p in predictions],
                }
                counts["segmented"] += 1
            if transform is not None:
                record = transform(record)
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            bar.update(1)
        bar.close()
    _finalise(partial, out)
    return counts
