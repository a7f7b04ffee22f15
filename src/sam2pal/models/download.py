"""Official SAM 2.1 checkpoints: where they live locally, and their download.

`model.checkpoint` may name an official model (``sam2.1_hiera_tiny``, ``..._small``,
``..._base_plus``, ``..._large``, or the file name). The file then lives at
``<checkpoint_dir>/<file name>`` (``resources/checkpoints/`` in the workflow). The
workflow's `download_model` rule fetches it from Meta's published URL and checks its
SHA-256; on a machine without internet it stops with a message saying where to put a
copy fetched elsewhere.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_path, file_sha256
from sam2pal.models.registry import (
    MICRO_MODEL,
    RANDOM_CHECKPOINT,
    OfficialModel,
    micro_model_files,
    official_model,
)

DEFAULT_CHECKPOINT_DIR = Path("resources") / "checkpoints"


def official_checkpoint_path(model: OfficialModel, checkpoint_dir=DEFAULT_CHECKPOINT_DIR) -> Path:
    return Path(checkpoint_dir) / model.file_name


def resolve_checkpoint(value, checkpoint_dir=DEFAULT_CHECKPOINT_DIR) -> str:
    """A checkpoint setting -> a file path or ``"random"`` (see `resolve_checkpoint_digest`)."""
    return resolve_checkpoint_digest(value, checkpoint_dir)[0]


def resolve_checkpoint_digest(
    value, checkpoint_dir=DEFAULT_CHECKPOINT_DIR
) -> tuple[str, str | None]:
    """Resolve a checkpoint setting to a file and its digest.

    Official names resolve to their local file, which must exist and carry the
    published SHA-256; other values must be existing files. The file is hashed once
    (a large checkpoint takes seconds).

    Args:
        value: a file path, an official model name, ``sam2pal-micro``, ``"random"`` or
            None (random weights).
        checkpoint_dir: the folder of the official checkpoints.

    Returns:
        (file path or ``"random"``, the file's SHA-256 or None).
    """
    text = str(value).strip() if value is not None else RANDOM_CHECKPOINT
    if text == RANDOM_CHECKPOINT:
        return RANDOM_CHECKPOINT, None
    if Path(text).expanduser().is_file():
        path = Path(text).expanduser()
        return str(path), file_sha256(path)
    if text == MICRO_MODEL:
        path = micro_model_files()[0]
        if not path.is_file():
            raise InputError(
                f"{path}: the sam2pal-micro checkpoint is missing from this copy of sam2-pal"
            )
        return str(path), file_sha256(path)
    model = official_model(text)
    if model is None:
        raise InputError(
            f"{text}: checkpoint file not found (give a .pt file path, an official model name "
            "such as sam2.1_hiera_tiny, sam2pal-micro, or 'random')"
        )
    path = official_checkpoint_path(model, checkpoint_dir)
    if not path.is_file():
        raise InputError(missing_message(model, path))
    digest = file_sha256(path)
    if digest != model.sha256:
        raise InputError(
            f"{path}: not the official {model.file_name} (sha256 {digest[:12]}..., expected "
            f"{model.sha256[:12]}...); delete it and download it again from {model.url}"
        )
    return str(path), digest


def missing_message(model: OfficialModel, path: Path) -> str:
    return (
        f"{path}: official checkpoint {model.name} is not there; download {model.url} "
        f"({model.size / 1e6:.0f} MB, sha256 {model.sha256}) and put it at that path"
    )


def download_model(
    name: str | OfficialModel, checkpoint_dir=DEFAULT_CHECKPOINT_DIR, timeout: float = 60.0
) -> Path:
    """Download an official checkpoint into `checkpoint_dir`, checking size and SHA-256.

    Args:
        name: an official model name, or its `OfficialModel`.
        checkpoint_dir: the folder of the official checkpoints.
        timeout: seconds to wait for the server.

    Returns:
        The checkpoint file (not downloaded again when already there and intact).
    """
    model = name if isinstance(name, OfficialModel) else official_model(name)
    if model is None:
        raise InputError(f"'{name}' is not an official SAM 2.1 model name")
    dest = official_checkpoint_path(model, checkpoint_dir)
    if dest.is_file() and file_sha256(dest) == model.sha256:
        return dest
    digest = hashlib.sha256()
    size = 0
    try:
        with (
            urllib.request.urlopen(model.url, timeout=timeout) as response,
            atomic_path(dest) as tmp,
        ):
            with open(tmp, "wb") as out:
                while block := response.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
            if size != model.size or digest.hexdigest() != model.sha256:
                raise InputError(
                    f"{model.url}: download is corrupt ({size} bytes, sha256 {digest.hexdigest()[:12]}...; "
                    f"expected {model.size} bytes, {model.sha256[:12]}...); try again"
                )
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(
            f"cannot download {model.url} ({reason}); if this machine has no internet access, "
            f"download it on one that has and put it at {dest} (sha256 {model.sha256})"
        ) from None
    return dest
