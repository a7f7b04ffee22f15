"""Glue for the workflow's scripts (workflow/scripts/*.py).

`logged(snakemake)` sends the step's output to its log file. A user error
(`InputError`) ends the step with its one-line message, both in the log and on the
terminal where Snakemake runs; anything else keeps its traceback in the log.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback


@contextlib.contextmanager
def logged(snakemake):
    from sam2pal.errors import InputError

    terminal = sys.__stderr__
    log_path = snakemake.log[0] if len(snakemake.log) else None
    handle = terminal
    if log_path:
        handle = open(log_path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed in finally)
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = handle
    logging.basicConfig(stream=handle, level=logging.INFO, force=True)
    try:
        yield
    except InputError as exc:
        message = f"sam2pal: error in rule {snakemake.rule}: {exc}"
        print(message, file=handle)
        if handle is not terminal:
            print(message, file=terminal)
        sys.exit(1)
    except BaseException:
        traceback.print_exc(file=handle)
        raise
    finally:
        sys.stdout, sys.stderr = saved
        if handle is not terminal:
            handle.close()


def collection_settings(snakemake, section: str) -> dict:
    """A config section with the job's collection's own overrides applied, read from
    the config inside the job: for settings that must not be rule params (Snakemake
    reruns a job when a param changes), such as the device."""
    config = snakemake.config
    entry = config["collections"][snakemake.wildcards.collection]
    return {**config[section], **(entry.get(section) or {})}
