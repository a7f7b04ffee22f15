"""Shards: how a collection's images are split into propagation jobs, and how finished
results are found again.

An image's shard is a stable hash of its file name (the path inside the collection's
folder) modulo the number of shards, so it never depends on the other images, on
their order or on the machine. Shard counts are powers of two. For a new collection
the count is the smallest one that keeps shards at `shard_size` images or fewer on
average:

    shards = 1, 2, 4, 8 ... >= n_images / shard_size

Once a collection has a complete set of shard results (a *layout*), it keeps that
layout (`choose_count`) as long as its shards hold exactly the collection's images, or
the collection still fits in it (at most `shards x shard_size` images). So changing
`shard_size` alone changes nothing in a finished collection; adding images changes
only the shards they land in, until the collection outgrows the layout. Then the
count becomes the smallest power of two that fits.

Whatever the layout, finished results are reused, never segmented again: each
finished shard's results are also kept (hard-linked) in ``.done/`` next to them, and a
shard job takes the records of its images from every earlier result file whose images
overlap its own (`reusable_results`): under two power-of-two counts, shard k of S and
shard j of T share images only if k and j are equal modulo the smaller count. Whether
a record may be reused (same model, templates and settings; image not modified since)
is decided by `pipeline.reusable_records`.

A shard's label, used in file names and as the workflow's `shard` wildcard, is
``"{index}-of-{count}"`` with a zero-padded index, e.g. ``"03-of-16"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

LABEL = re.compile(r"^(\d+)-of-(\d+)$")
RESULT = re.compile(r"^shard-(\d+-of-\d+)\.jsonl$")
DONE = ".done"  # finished shard results, kept for reuse after Snakemake removes an output it reruns


def shard_count(n_images: int, shard_size: int) -> int:
    """Number of shards for a new collection of `n_images` (a power of two)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, not {shard_size!r}")
    count = 1
    while count * shard_size < n_images:
        count *= 2
    return count


def shard_index(file_name: str, count: int) -> int:
    """The shard (0 .. count-1) of an image, from its file name alone."""
    digest = hashlib.sha256(file_name.replace("\\", "/").encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def label(index: int, count: int) -> str:
    return f"{index:0{len(str(count - 1))}d}-of-{count}"


def parse_label(text: str) -> tuple[int, int]:
    """(index, count) of a shard label."""
    match = LABEL.match(text)
    if not match:
        raise ValueError(f"not a shard label: {text!r} (expected e.g. '03-of-16')")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or count & (count - 1) or index >= count or text != label(index, count):
        raise ValueError(f"not a shard label: {text!r}")
    return index, count


def names_digest(file_names) -> str:
    """SHA-256 of a set of file names (order does not matter): recorded in each shard's
    run file, to tell whether a layout still holds exactly a collection's images."""
    text = "\n".join(sorted(name.replace("\\", "/") for name in file_names))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split(file_names, count: int) -> dict[str, list[str]]:
    """{shard label: its file names, in the given order} for every shard of `count`,
    empty ones included (a shard with no image yet still has its job and result file)."""
    shards: dict[str, list[str]] = {label(i, count): [] for i in range(count)}
    for name in file_names:
        shards[label(shard_index(name, count), count)].append(name)
    return shards


def result_files(folder: str | os.PathLike, text: str) -> tuple[Path, Path]:
    """(records .jsonl, run .json) of a shard in a collection's propagate folder."""
    folder = Path(folder)
    return folder / f"shard-{text}.jsonl", folder / f"shard-{text}.run.json"


def _finished(where: Path):
    """(directory entry, label, index, count) of every shard records file in `where`
    whose run file is there too (a finished shard); nothing when `where` is missing."""
    try:
        entries = list(os.scandir(where))
    except FileNotFoundError:
        return
    names = {entry.name for entry in entries}
    for entry in entries:
        match = RESULT.match(entry.name)
        if not match:
            continue
        try:
            index, count = parse_label(match.group(1))
        except ValueError:
            continue
        if f"shard-{match.group(1)}.run.json" in names:
            yield entry, match.group(1), index, count


def layouts(folder: str | os.PathLike) -> dict[int, float]:
    """{shard count: time of its newest run file} of the complete layouts in `folder`:
    those whose every shard has its records and run file."""
    folder = Path(folder)
    found: dict[int, set[int]] = {}
    for _, _, index, count in _finished(folder):
        found.setdefault(count, set()).add(index)
    complete = {}
    for count, indices in found.items():
        if len(indices) == count:
            complete[count] = max(
                os.path.getmtime(result_files(folder, label(i, count))[1]) for i in range(count)
            )
    return complete


def _holds_exactly(folder: Path, file_names, count: int) -> bool:
    """Whether the run files of layout `count` record exactly these images per shard."""
    for text, names in split(file_names, count).items():
        try:
            with open(result_files(folder, text)[1], encoding="utf-8") as handle:
                recorded = json.load(handle).get("images_sha256")
        except (OSError, ValueError, AttributeError):
            return False
        if recorded != names_digest(names):
            return False
    return True


def choose_count(file_names, shard_size: int, folder: str | os.PathLike | None = None) -> int:
    """The shard count of a collection whose results are in `folder`: the newest
    complete layout there that holds exactly these images or still fits them (at most
    `count x shard_size` images); otherwise `shard_count`."""
    names = list(file_names)
    wanted = shard_count(len(names), shard_size)
    if folder is None:
        return wanted
    for count, _ in sorted(layouts(folder).items(), key=lambda item: -item[1]):
        if len(names) <= count * shard_size or _holds_exactly(Path(folder), names, count):
            return count
    return wanted


def assign(
    file_names, shard_size: int, folder: str | os.PathLike | None = None
) -> dict[str, list[str]]:
    """{shard label: its file names} for every shard (`split`), with the count of
    `choose_count` (finished results in `folder` keep their layout)."""
    names = list(file_names)
    return split(names, choose_count(names, shard_size, folder))


def overlapping(text: str, count: int) -> list[str]:
    """Labels of the shards of `count` that hold images of shard `text` (under any other
    power-of-two count)."""
    index, own = parse_label(text)
    if count <= own:
        return [label(index % count, count)]
    return [label(j, count) for j in range(index, count, own)]


def reusable_results(folder: str | os.PathLike, text: str) -> list[tuple[str, str]]:
    """[(records .jsonl, run .json)] of the finished results in a collection's propagate
    `folder` (and its `.done/` copies) that may hold images of shard `text`, newest
    first, each file once."""
    folder = Path(folder)
    found, seen = [], set()
    for where in (folder, folder / DONE):
        for entry, found_label, _, count in _finished(where):
            if found_label not in overlapping(text, count):
                continue
            run = f"shard-{found_label}.run.json"
            stat = entry.stat()
            if (stat.st_dev, stat.st_ino) in seen:  # the same file linked into .done
                continue
            seen.add((stat.st_dev, stat.st_ino))
            found.append((stat.st_mtime, entry.path, str(Path(where) / run)))
    return [(records, run) for _, records, run in sorted(found, key=lambda item: -item[0])]


def keep_done(records: str | os.PathLike, run: str | os.PathLike) -> None:
    """Keep a finished shard's results in `.done/` (hard links where the file system
    allows, else copies), replacing its earlier ones."""
    records, run = Path(records), Path(run)
    done = records.parent / DONE
    done.mkdir(exist_ok=True)
    for source in (records, run):
        target = done / source.name
        tmp = done / f".{source.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)
        os.replace(tmp, target)
