"""Run the engine over a collection, writing each image's result as soon as it is done.

Results go to a JSON-lines file, one record per image:

    {"file_name": ..., "width": ..., "height": ...,
     "structures": [{"category_id", "instance", "segmentation" (COCO RLE), "area", "bbox",
                     "score", "predicted_iou", "object_score", "cycle_iou", "clamped"}, ...]}

or, for a bad image file, ``{"file_name": ..., "skipped": "<reason>"}``. Only bad image
files are skipped (`sam2pal.io.images.ImageReadError`); a file that cannot be read at all
(missing, no permission, an input/output error) stops the run. Structures predicted
absent are kept with area 0 so that QC can report them.

Too many skipped images stop the run too (`SkipLimit`, propagate.max_skipped_fraction).
Images are segmented in an order given by a hash of their names (`processing_order`),
so the images read so far are a fair sample of the collection, whatever its naming.

While running, records are appended (and flushed) to ``<out>.partial``, whose first
line records a key of the model, templates and settings. If the run is interrupted,
the next run with the same key picks up where it stopped: nothing finished is lost
(skipped images are tried again). At the end the records are rewritten in file-name
order to ``<out>`` (atomically) and the partial file is removed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sam2pal.errors import ImageReadError, InputError
from sam2pal.io.atomic import atomic_write
from sam2pal.io.images import read_image as default_read_image

PARTIAL_SUFFIX = ".partial"


def structure_record(pred) -> dict:
    """JSON record of one `engine.StructurePrediction`."""
    box = pred.box
    return {
        "category_id": int(pred.category_id),
        "instance": int(pred.instance),
        "segmentation": box.rle(),
        "area": box.area,
        "bbox": box.bbox(),
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
    """File names already segmented in a partial file of the same key (else start
    over). Skipped images are not among them: they are tried again, and their new
    record replaces the old one (`_finalise`).

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
                record = json.loads(line)
                name = record["file_name"]
            except (ValueError, KeyError, TypeError):
                break
            if "skipped" in record:
                done.discard(name)
            else:
                done.add(name)
            good_end = handle.tell()
    with open(partial, "rb+") as handle:
        handle.truncate(good_end)
    return done


def _finalise(partial: Path, out: Path) -> None:
    """Copy the partial file's records to `out` in file-name order, atomically (the
    last record of an image that was tried again)."""
    last = {}
    with open(partial, "rb") as handle:
        handle.readline()
        while True:
            offset = handle.tell()
            line = handle.readline()
            if not line:
                break
            last[json.loads(line)["file_name"]] = (offset, len(line))
    index = sorted((name, offset, length) for name, (offset, length) in last.items())
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
    return write_skipped_rows(rows, out_csv)


def write_skipped_rows(rows: Iterable[tuple[str, str]], out_csv: str | os.PathLike) -> int:
    """`skipped.csv` from (file_name, reason) pairs; returns the count."""
    rows = sorted(rows)
    with atomic_write(out_csv) as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "reason"])
        writer.writerows(rows)
    return len(rows)


def check_skipped(
    records_paths: Iterable[str | os.PathLike], max_fraction: float | None, where, log=None
) -> tuple[int, int]:
    """Apply propagate.max_skipped_fraction to a whole collection (its result files):
    raises TooManySkipped, after logging every skipped file, when too many images were
    skipped. Returns (images, skipped)."""
    max_fraction = check_max_fraction(max_fraction)
    images, skipped = 0, []
    for path in records_paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                images += 1
                if '"skipped"' in line:  # parse only the few lines that may be skipped records
                    record = json.loads(line)
                    if "skipped" in record:
                        skipped.append((record["file_name"], record["skipped"]))
    if too_many_skipped(len(skipped), images, max_fraction):
        if log is not None:
            log(
                "skipped images:\n"
                + "\n".join(f"  {name}: {reason}" for name, reason in sorted(skipped))
            )
        raise too_many_skipped_error(where, skipped, images, max_fraction)
    return images, len(skipped)


def processing_order(file_names) -> list[str]:
    """`file_names` in the order they are segmented: by a hash of the name, so that any
    first part of a run is a fair sample of its images (the outputs are in file-name
    order all the same)."""
    return sorted(
        file_names, key=lambda name: hashlib.sha256(b"order:" + name.encode("utf-8")).digest()
    )


# A run stops early on a sample of its images when a collection within the limit
# would give so many skipped images less often than this (see SkipLimit).
SAMPLE_CERTAINTY = 1e-9


def too_many_skipped(skipped: int, images: int, max_fraction: float | None) -> bool:
    """The rule of propagate.max_skipped_fraction: more than that share of a
    collection's images skipped, and at least two of them (one bad photo never stops
    a run, however small the collection). None: no limit."""
    if max_fraction is None or images <= 0:
        return False
    return skipped >= 2 and skipped / images > max_fraction


def _binomial_tail_bound(k: int, n: int, p: float) -> float:
    """Chernoff bound on P(X >= k) for X ~ Binomial(n, p), k/n > p (it also bounds
    drawing without replacement, Hoeffding 1963)."""
    q = k / n
    if q <= p:
        return 1.0
    if p <= 0.0:
        return 0.0
    kl = q * math.log(q / p) + ((1 - q) * math.log((1 - q) / (1 - p)) if q < 1 else 0.0)
    return math.exp(-n * kl)


def check_max_fraction(value) -> float | None:
    """max_skipped_fraction as a float from 0 to 1 (None: no limit)."""
    if value is None:
        return None
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"max_skipped_fraction must be a number from 0 to 1, not {value!r}")
    return fraction


class TooManySkipped(InputError):
    """The run stopped because too many images were skipped; `.skipped` lists them."""

    def __init__(self, message: str, skipped: list[tuple[str, str]]):
        super().__init__(message)
        self.skipped = skipped


def too_many_skipped_error(
    where,
    skipped: list[tuple[str, str]],
    images: int,
    max_fraction: float,
    read: int | None = None,
    shown: int = 10,
) -> TooManySkipped:
    """The one-line error that stops a run, naming the skipped files (the first
    `shown` with their reasons). `read`: the run stopped early, after this many
    images."""
    skipped = sorted(skipped)
    listed = "; ".join(f"{name} ({reason})" for name, reason in skipped[:shown])
    if len(skipped) > shown:
        listed += f"; and {len(skipped) - shown} more"
    limit = f"propagate.max_skipped_fraction is {max_fraction:g}"
    if read is None:
        head = f"{len(skipped)} of {images} images are bad image files ({len(skipped) / images:.0%}; {limit})"
    else:
        head = (
            f"{len(skipped)} of the first {read} images read are bad image files: far more than the "
            f"collection may have ({limit}), so the run stops early"
        )
    return TooManySkipped(
        f"{where}: {head}. Replace or remove them, or raise the limit: {listed}", skipped
    )


class SkipLimit:
    """Stops a run early when its skipped images show that the collection will break
    propagate.max_skipped_fraction.

    The images are read in `processing_order`, so the ones read so far are a fair
    sample of the collection (a shard is one too: shards are chosen by a hash of the
    name). The run stops when the share skipped among them is so high that a
    collection within the limit gives it with a probability below SAMPLE_CERTAINTY
    (a Chernoff bound): a systematic failure stops after a few dozen images (13 when
    every image is bad, at the default limit), not after the whole collection. The
    rule itself is checked on the whole collection when the results are merged
    (`check_skipped`).
    """

    def __init__(self, max_fraction: float | None, where):
        self.max_fraction = check_max_fraction(max_fraction)
        self.where = where
        self.read = 0
        self.skipped: list[tuple[str, str]] = []

    def add(self, name: str, reason: str | None = None) -> None:
        """Count an image read (segmented, or skipped for `reason`); raises
        TooManySkipped when the run must stop."""
        self.read += 1
        if reason is None:
            return
        self.skipped.append((name, reason))
        if self.max_fraction is None or self.max_fraction >= 1.0:
            return
        k = len(self.skipped)
        if k >= 2 and _binomial_tail_bound(k, self.read, self.max_fraction) < SAMPLE_CERTAINTY:
            raise too_many_skipped_error(
                self.where, self.skipped, self.read, self.max_fraction, read=self.read
            )


def _reason(exc: Exception, path: Path) -> str:
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


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
    max_skipped_fraction: float | None = None,
) -> dict:
    """Segment `file_names` (relative to `image_dir`) and write `out_jsonl`.

    transform: applied to each record before it is written (e.g. adds a video frame's
    index and time). reused: finished records of some of the images, taken as they are.

    on_bad_image: "skip" records a bad image file as skipped and goes on; "fail"
    raises its ImageReadError. A file that cannot be read at all raises
    ImageAccessError either way. max_skipped_fraction: raise TooManySkipped as soon as
    the images read show that more than this share of the collection is skipped
    (`SkipLimit`; the rule itself is checked by `check_skipped` on the whole
    collection); None: no limit. The partial file is kept for the next run whenever
    the run stops.
    """
    from sam2pal.progress import progress as progress_bar

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
    todo = processing_order(name for name in file_names if name not in done)
    limit = SkipLimit(max_skipped_fraction, image_dir)
    limit.read = len(done)

    if read_image is None:
        read_image = getattr(propagator, "read_target", None) or default_read_image

    def load(name: str):
        """(image for the model, (height, width) of the photo, error)."""
        try:
            image = read_image(image_dir / name)
        except ImageReadError as exc:
            return None, None, exc
        if isinstance(image, tuple):
            return image[0], (int(image[1][0]), int(image[1][1])), None
        return image, (int(image.shape[0]), int(image.shape[1])), None

    batch_size = max(int(getattr(propagator, "batch_size", 1)), 1)
    batched = hasattr(propagator, "start_batch")

    def model_part(images: list, sizes: list) -> list[Callable[[], list]]:
        """Run the model on a batch; returns per image the rest of its work."""
        if batched:
            return [pending.finish for pending in propagator.start_batch(images, sizes=sizes)]
        return [(lambda image=image: propagator.predict(image)) for image in images]

    def finish(name: str, size, rest) -> dict:
        height, width = size
        return {
            "file_name": name,
            "width": width,
            "height": height,
            "structures": [structure_record(p) for p in rest()],
        }

    def segment_all(pending: list, queued: deque, write, readers, writers) -> None:
        """Read, segment and queue every image to do, in batches."""
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            good = []
            for offset, name in enumerate(chunk):
                i = start + offset
                image, size, error = pending[i].result()
                pending[i] = None
                if i + prefetch < len(todo):
                    pending.append(readers.submit(load, todo[i + prefetch]))
                if error is None:
                    good.append((name, image, size))
                    continue
                if on_bad_image == "fail":
                    raise error
                reason = _reason(error, image_dir / name)
                counts["skipped"] += 1
                log(f"skipped {name}: {reason}")
                queued.append((name, {"file_name": name, "skipped": reason}, reason))
            if good:
                rests = model_part([image for _, image, _ in good], [size for _, _, size in good])
                for (name, _, size), rest in zip(good, rests):
                    queued.append((name, writers.submit(finish, name, size, rest), None))
                    counts["segmented"] += 1
            write(until=2 * batch_size)
        write(until=0)

    counts = {
        "images": len(file_names),
        "segmented": 0,
        "skipped": 0,
        "resumed": len(done) - n_reused,
        "reused": n_reused,
    }
    prefetch = max(prefetch, 2 * batch_size)
    # reading runs ahead of the model in threads; resizing the masks and encoding the
    # records runs behind it in as many more, so that the model (a GPU) never waits:
    # two of each, more for larger batches where there are cores for them (JPEG
    # decoding and the array work release Python's lock)
    workers = max(2, min(batch_size, os.cpu_count() or 2))
    with (
        open(partial, "a", encoding="utf-8") as handle,
        ThreadPoolExecutor(max_workers=workers) as readers,
        ThreadPoolExecutor(max_workers=workers) as writers,
    ):
        pending = [readers.submit(load, name) for name in todo[:prefetch]]
        queued: deque = deque()  # (name, future record or ready record, skip reason)
        bar = progress_bar(
            total=len(todo),
            desc=f"segment {out.stem or 'images'}",
            unit="img",
            disable=not progress,
        )

        def write(until: int) -> None:
            while len(queued) > until:
                name, record, reason = queued.popleft()
                if not isinstance(record, dict):
                    record = record.result()
                if transform is not None:
                    record = transform(record)
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                bar.update(1)
                limit.add(name, reason)

        try:
            segment_all(pending, queued, write, readers, writers)
        except BaseException:
            # keep every image finished before the failure for the next run
            try:
                write(until=0)
            except BaseException:  # noqa: BLE001 - the first failure is the one reported
                pass
            raise
        bar.close()
    _finalise(partial, out)
    return counts
