"""Publishing a version into the model repository, atomically.

Files are written into a hidden temporary directory beside the target and renamed into place, so
a server polling the repository never sees half a version, and an export killed half-way leaves
only a ``.tmp-*`` directory that readers ignore.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from service.repo.layout import next_version_number

TEMP_PREFIX = ".tmp-"
# Concurrent exporters that race for the same number each retry with the next one.
MAX_NUMBERING_ATTEMPTS = 20


class VersionExistsError(FileExistsError):
    pass


def staging_directory(repository: Path, name: str) -> Path:
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    return staging


def publish(
    staging: Path,
    repository: Path,
    name: str,
    *,
    version: int | None = None,
    finalize: Callable[[Path, int], None] | None = None,
) -> tuple[int, Path]:
    """Rename ``staging`` to ``repository/name/N``; N is the next free number unless pinned.

    ``finalize(staging, number)`` runs before each rename attempt, to write what depends on the
    number (the manifest).
    """
    model_dir = repository / name
    for _ in range(MAX_NUMBERING_ATTEMPTS):
        number = version if version is not None else next_version_number(repository, name)
        target = model_dir / str(number)
        if target.exists():
            if version is not None:
                raise VersionExistsError(f"{target} already exists; versions are never overwritten")
            continue
        if finalize is not None:
            finalize(staging, number)
        try:
            # rename() onto an existing *empty* directory would replace it, so claim the number
            # first with mkdir (atomic), then swap the staged contents in.
            target.mkdir()
        except FileExistsError:
            if version is not None:
                raise VersionExistsError(
                    f"{target} already exists; versions are never overwritten"
                ) from None
            continue
        sync_tree(staging)
        try:
            os.rename(staging, target)
        except OSError as error:
            target.rmdir()
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        sync_directory(model_dir)  # the rename itself survives a power loss
        return number, target
    raise VersionExistsError(f"could not claim a version number under {model_dir}")


def sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_tree(staging: Path) -> None:
    """Flush every staged file and the directory, so a version that appears after a crash has
    whole files, not the truncated ones a later sha256 check would refuse."""
    for path in staging.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    sync_directory(staging)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
