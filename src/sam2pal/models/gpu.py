"""Which GPU a job runs on, when several jobs share a server with several GPUs.

Snakemake counts GPUs (`--resources gpu=N`) but does not say which one a job should
use. So a job claims one itself: among the GPUs it can see (CUDA_VISIBLE_DEVICES is
respected: torch numbers only those), it takes the first one no other sam2-pal job
holds, by an exclusive lock on a file named after the GPU in a lock folder shared by
the server's users (`$SAM2PAL_GPU_LOCK_DIR`, default `<tmp>/sam2pal-gpu-locks`). The
lock is held until the process ends, so a crashed job frees its GPU at once. When
every visible GPU is held, the job waits for one and says so in its log.

GPUs are named by their UUID where torch can tell it, so two jobs to which a cluster
shows different physical GPUs both as `cuda:0` do not wait for each other.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from sam2pal.errors import InputError

_HELD: list[int] = []  # file descriptors of the locks this process holds
_CLAIMED: list[int] = []  # the torch index of the GPU this process claimed


def lock_dir() -> Path:
    return Path(
        os.environ.get("SAM2PAL_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / "sam2pal-gpu-locks"
    )


def gpu_keys(count: int, visible: str | None = None, uuids=None) -> list[str]:
    """Names of the `count` GPUs torch sees, in torch's order: their UUIDs when given,
    else the entries of CUDA_VISIBLE_DEVICES (`visible`), else their indices."""
    if uuids is not None and len(uuids) == count and all(uuids):
        return [str(u) for u in uuids]
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    if len(entries) >= count:
        return entries[:count]
    return [str(i) for i in range(count)]


def _lock_file(key: str, folder: Path) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    return folder / f"gpu-{safe}.lock"


def _open_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        os.chmod(path, 0o666)  # other users' jobs must open it too
    except OSError:
        pass
    return fd


def claim(
    keys: list[str],
    folder: str | os.PathLike | None = None,
    wait: bool = True,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
    log=None,
) -> int:
    """Lock the first free GPU of `keys`. The lock lasts as long as this process (or
    until `release`).

    Args:
        keys: one lock key per visible GPU (`gpu_keys`).
        folder: the lock folder (default `lock_dir()`).
        wait: poll until a GPU is free (or until `timeout_s`); else raise InputError at
            once when all are held.
        poll_s: seconds between polls; timeout_s: the longest wait, None for no limit.
        log: where the waiting message goes (default stderr).

    Returns:
        The index in `keys` of the GPU locked.
    """
    if not keys:
        raise InputError("no GPU to claim")
    folder = Path(folder) if folder is not None else lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(folder, 0o1777)  # shared by the server's users, like /tmp
    except OSError:
        pass
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.monotonic()
    said = False
    while True:
        for index, key in enumerate(keys):
            fd = _open_lock(_lock_file(key, folder))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    continue
                raise
            _HELD.append(fd)
            return index
        waited = time.monotonic() - start
        if not wait or (timeout_s is not None and waited >= timeout_s):
            raise InputError(
                f"all {len(keys)} visible GPU(s) are in use by other sam2-pal jobs (locks in {folder}); "
                "run fewer GPU jobs at once (snakemake --resources gpu=N)"
            )
        if not said:
            log(
                f"all {len(keys)} visible GPU(s) are in use by other sam2-pal jobs; waiting for one"
            )
            said = True
        time.sleep(poll_s)


def release() -> None:
    """Give back every GPU this process claimed."""
    while _HELD:
        os.close(_HELD.pop())
    _CLAIMED.clear()


def claim_cuda_device(log=None) -> int:
    """Claim a free visible CUDA GPU for this process and make it torch's current device.

    Args:
        log: where the messages go (default stderr).

    Returns:
        The GPU's torch index (the same one on later calls).
    """
    import torch

    if _CLAIMED:
        return _CLAIMED[0]
    count = torch.cuda.device_count()
    uuids = [getattr(torch.cuda.get_device_properties(i), "uuid", None) for i in range(count)]
    keys = gpu_keys(count, os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
    index = claim(keys, log=log)
    torch.cuda.set_device(index)
    _CLAIMED.append(index)
    (log or (lambda msg: print(msg, file=sys.stderr)))(f"using GPU cuda:{index} ({keys[index]})")
    return index
