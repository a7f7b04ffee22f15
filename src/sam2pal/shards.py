"""Shards: how a collection's images are split into propagation jobs.

An image's shard is a stable hash of its file name (the path inside the collection's
folder) modulo the number of shards, so it never depends on the other images, on
their order or on the machine. The number of shards is the smallest power of two
that keeps shards at `shard_size` images or fewer on average:

    shards = 1, 2, 4, 8 ... >= n_images / shard_size

Adding images to a collection therefore changes only the shards they land in, until
the collection outgrows `shards x shard_size` images. Then the count doubles and every
shard splits in two: shard k of S becomes shards k and k + S of 2S, each a subset of
its parent, whose finished results the new shards reuse instead of segmenting again
(`related_shards`).

A shard's label, used in file names and as the workflow's `shard` wildcard, is
``"{index}-of-{count}"`` with a zero-padded index, e.g. ``"03-of-16"``.
"""

from __future__ import annotations

import hashlib
import re

LABEL = re.compile(r"^(\d+)-of-(\d+)$")


def shard_count(n_images: int, shard_size: int) -> int:
    """Number of shards for a collection of `n_images` (a power of two)."""
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
    if count < 1 or count & (count - 1) or index >= count:
        raise ValueError(f"not a shard label: {text!r}")
    return index, count


def assign(file_names, shard_size: int) -> dict[str, list[str]]:
    """{shard label: its file names, in the given order} for every shard, empty ones
    included (a shard with no image yet still has its job and result file)."""
    names = list(file_names)
    count = shard_count(len(names), shard_size)
    shards: dict[str, list[str]] = {label(i, count): [] for i in range(count)}
    for name in names:
        shards[label(shard_index(name, count), count)].append(name)
    return shards


def related_shards(text: str) -> list[str]:
    """Labels of the shards whose images overlap this one's under another shard count:
    its parent (half the shards) and its two children (twice as many)."""
    index, count = parse_label(text)
    related = []
    if count > 1:
        related.append(label(index % (count // 2), count // 2))
    related += [label(index, count * 2), label(index + count, count * 2)]
    return related
