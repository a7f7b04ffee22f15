"""Progress bars that read well both on a terminal and in a Snakemake log file.

On a terminal: an ordinary tqdm bar. In a file (a rule's log, a SLURM job's output):
one complete line per update, at most every `log_interval` seconds, instead of the
carriage-return redraws that a terminal swallows and a file keeps as one huge line.
"""

from __future__ import annotations

import sys


class _Lines:
    """A text stream that turns tqdm's carriage-return redraws into lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress(
    iterable=None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    stream=None,
    disable: bool = False,
    log_interval: float = 30.0,
):
    """A tqdm bar over `iterable` (or a manual one, with `total`), on `stream`
    (default: the current stderr, which a rule's log replaces)."""
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        file=stream if interactive else _Lines(stream),
        mininterval=0.5 if interactive else log_interval,
        maxinterval=log_interval * 4,
        ascii=not interactive,
        dynamic_ncols=interactive,
        ncols=None if interactive else 100,
    )
