"""Run the engine over a collection, writing each image's result as soon as it is done.

Results go to a JSON-lines file, one record per image (`sam2pal.io.records`: its size
and structures, each with its mask as COCO RLE and its scores), or, for a bad image
file, the reason it was skipped. Only bad image files are skipped
(`sam2pal.io.images.ImageReadError`); a file that cannot be read at all (missing, no
permission, an input/output error) stops the run. Structures predicted absent are kept
with area 0 so that QC can report them.

Too many skipped images stop the run too (`SkipLimit`, propagate.max_skipped_fraction).
Images are segmented in an order given by a hash of their names (`processing_order`),
so the images read so far are a fair sample of the collection, whatever its naming.

While running, records are appended (and flushed) to ``<out>.partial``
(`sam2pal.io.records.PartialRecords`), whose first line records a key of the model,
templates and settings. If the run is interrupted, the next run with the same key picks
up where it stopped: nothing finished is lost (skipped images are tried again). At the
end the records are rewritten in file-name order to ``<out>`` (atomically) and the
partial file is removed.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sam2pal.errors import ImageReadError, InputError
from sam2pal.io.atomic import atomic_write
from sam2pal.io.images import read_image as default_read_image
from sam2pal.io.records import (
    ImageRecord,
    PartialRecords,
    StructureRecord,
    read_records,
    skipped_of,
)


def write_skipped(records_paths: Iterable[str | os.PathLike], out_csv: str | os.PathLike) -> int:
    """`skipped.csv` (file_name, reason) from result files; returns the count."""
    rows = []
    for path in records_paths:
        rows += [(r.file_name, r.skipped) for r in read_records(path) if r.is_skipped]
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
    images, skipped = skipped_of(records_paths)
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
    transform: Callable[[ImageRecord], ImageRecord] | None = None,
    reused: Iterable[ImageRecord] = (),
    max_skipped_fraction: float | None = None,
) -> dict:
    """Segment `file_names` (relative to `image_dir`) and write `out_jsonl`.

    Args:
        propagator: the engine (`sam2pal.inference.engine.Propagator`: `predict`, or
            `start_batch` for batches).
        image_dir, file_names: the images to segment (names relative to the folder).
        out_jsonl: the result file (`sam2pal.io.records`).
        read_image: reads an image (default: the propagator's `read_target`, else
            `sam2pal.io.images.read_image`).
        settings_key: the key of the model, templates and settings; a partial file of
            the same key is resumed.
        on_bad_image: "skip" records a bad image file as skipped and goes on; "fail"
            raises its ImageReadError. A file that cannot be read at all raises
            ImageAccessError either way.
        progress, log: show a progress bar; where messages go (default: stderr).
        prefetch: images read ahead of the model.
        transform: applied to each record before it is written (e.g. adds a video
            frame's index and time).
        reused: finished records of some of the images, taken as they are.
        max_skipped_fraction: raise TooManySkipped as soon as the images read show that
            more than this share of the collection is skipped (`SkipLimit`; the rule
            itself is checked by `check_skipped` on the whole collection); None: no
            limit. The partial file is kept for the next run whenever the run stops.

    Returns:
        The counts: images, segmented, skipped, resumed, reused.
    """
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"on_bad_image must be 'skip' or 'fail', not {on_bad_image!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    image_dir = Path(image_dir)
    partial = PartialRecords(out_jsonl, settings_key)
    done, n_reused = _start_partial(partial, reused, len(file_names), log)
    todo = processing_order(name for name in file_names if name not in done)
    limit = SkipLimit(max_skipped_fraction, image_dir)
    limit.read = len(done)
    counts = {
        "images": len(file_names),
        "segmented": 0,
        "skipped": 0,
        "resumed": len(done) - n_reused,
        "reused": n_reused,
    }
    if read_image is None:
        read_image = getattr(propagator, "read_target", None) or default_read_image
    run = _PhotoRun(propagator, image_dir, todo, read_image, on_bad_image, prefetch, log, counts)
    run.write_all(partial, limit, transform, progress)
    partial.finalise()
    return counts


def _start_partial(
    partial: PartialRecords, reused: Iterable[ImageRecord], images: int, log
) -> tuple[set[str], int]:
    """Resume the partial file of the same settings (else start a new one) and add the
    reused records; returns (file names done, number reused)."""
    partial.out.parent.mkdir(parents=True, exist_ok=True)
    done = partial.resume()
    if done:
        log(f"resuming: {len(done)} of {images} images already done in {partial.path}")
    else:
        partial.start()
    n_reused = 0
    with partial.appender() as out:
        for record in reused:
            if record.file_name not in done:
                out.append(record)
                done.add(record.file_name)
                n_reused += 1
    if n_reused:
        log(f"reused {n_reused} image(s) already segmented with the same settings")
    return done, n_reused


class _PhotoRun:
    """The images to do of one `run_propagation`: reading runs ahead of the model in
    threads; resizing the masks and encoding the records runs behind it in as many
    more, so that the model (a GPU) never waits: two of each, more for larger batches
    where there are cores for them (JPEG decoding and the array work release Python's
    lock). Records are written in the order the images were read."""

    def __init__(
        self, propagator, image_dir, todo, read_image, on_bad_image, prefetch, log, counts
    ):
        self.propagator = propagator
        self.image_dir = image_dir
        self.todo = todo
        self.read_image = read_image
        self.on_bad_image = on_bad_image
        self.log = log
        self.counts = counts
        self.batch_size = max(int(getattr(propagator, "batch_size", 1)), 1)
        self.batched = hasattr(propagator, "start_batch")
        self.prefetch = max(prefetch, 2 * self.batch_size)
        self.workers = max(2, min(self.batch_size, os.cpu_count() or 2))
        # (name, future record or ready record, skip reason)
        self.queued: deque = deque()

    def load(self, name: str):
        """(image for the model, (height, width) of the photo, error)."""
        try:
            image = self.read_image(self.image_dir / name)
        except ImageReadError as exc:
            return None, None, exc
        if isinstance(image, tuple):
            return image[0], (int(image[1][0]), int(image[1][1])), None
        return image, (int(image.shape[0]), int(image.shape[1])), None

    def model_part(self, images: list, sizes: list) -> list[Callable[[], list]]:
        """Run the model on a batch; returns per image the rest of its work."""
        if self.batched:
            return [pending.finish for pending in self.propagator.start_batch(images, sizes=sizes)]
        return [(lambda image=image: self.propagator.predict(image)) for image in images]

    @staticmethod
    def finish(name: str, size, rest) -> ImageRecord:
        height, width = size
        predictions = rest()
        structures = [StructureRecord.from_prediction(p) for p in predictions]
        return ImageRecord(
            file_name=name,
            width=width,
            height=height,
            structures=structures,
            # the orientation found when propagate.orientation searched it (else None)
            orientation=getattr(predictions, "orientation", None),
        )

    def write_all(self, partial: PartialRecords, limit: SkipLimit, transform, progress: bool):
        """Segment every image to do, appending each record (through `transform`) to
        the partial file and counting it in `limit`."""
        from sam2pal.progress import progress as progress_bar

        with partial.appender() as out:
            bar = progress_bar(
                total=len(self.todo),
                desc=f"segment {partial.out.stem or 'images'}",
                unit="img",
                disable=not progress,
            )

            def write(name: str, record: ImageRecord, reason: str | None) -> None:
                out.append(transform(record) if transform is not None else record)
                bar.update(1)
                limit.add(name, reason)

            self.run(write)
            bar.close()

    def run(self, write: Callable[[str, ImageRecord, str | None], None]) -> None:
        """Segment every image to do; `write(name, record, skip reason)` takes each
        record, in order."""
        with (
            ThreadPoolExecutor(max_workers=self.workers) as readers,
            ThreadPoolExecutor(max_workers=self.workers) as writers,
        ):
            pending = [readers.submit(self.load, name) for name in self.todo[: self.prefetch]]
            try:
                for start in range(0, len(self.todo), self.batch_size):
                    good = self._read_batch(start, pending, readers)
                    self._segment_batch(good, writers)
                    self._write(write, until=2 * self.batch_size)
                self._write(write, until=0)
            except BaseException:
                # keep every image finished before the failure for the next run
                try:
                    self._write(write, until=0)
                except BaseException:  # noqa: BLE001 - the first failure is the one reported
                    pass
                raise

    def _read_batch(self, start: int, pending: list, readers) -> list:
        """The images of the batch at `start` that could be read (name, image, size);
        the others are queued as skipped (or raise, when bad images fail the run)."""
        good = []
        for offset, name in enumerate(self.todo[start : start + self.batch_size]):
            i = start + offset
            image, size, error = pending[i].result()
            pending[i] = None
            if i + self.prefetch < len(self.todo):
                pending.append(readers.submit(self.load, self.todo[i + self.prefetch]))
            if error is None:
                good.append((name, image, size))
                continue
            if self.on_bad_image == "fail":
                raise error
            reason = _reason(error, self.image_dir / name)
            self.counts["skipped"] += 1
            self.log(f"skipped {name}: {reason}")
            self.queued.append((name, ImageRecord.skip(name, reason), reason))
        return good

    def _segment_batch(self, good: list, writers) -> None:
        if not good:
            return
        rests = self.model_part([image for _, image, _ in good], [size for _, _, size in good])
        for (name, _, size), rest in zip(good, rests):
            self.queued.append((name, writers.submit(self.finish, name, size, rest), None))
            self.counts["segmented"] += 1

    def _write(self, write, until: int) -> None:
        while len(self.queued) > until:
            name, record, reason = self.queued.popleft()
            if not isinstance(record, ImageRecord):
                record = record.result()
            write(name, record, reason)
