"""Reading a model repository: ``REPO/NAME/VERSION/manifest.json`` plus the files it names.

A version directory is *complete* once its name is a positive integer and it holds a manifest:
the exporter builds each version in a hidden temporary directory and renames it into place, so
anything else (``.tmp-*``, stray files) is ignored here rather than half-read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.repo.manifest import MANIFEST_FILE, Artifact, Manifest, ManifestError, sha256_file


class IntegrityError(ManifestError):
    """A file that the manifest names is missing or its sha256 does not match."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    directory: Path

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_FILE

    def load_manifest(self) -> Manifest:
        manifest = Manifest.load(self.manifest_path)
        if manifest.name != self.name or manifest.version != self.version:
            raise ManifestError(
                f"{self.manifest_path}: manifest says {manifest.name}/{manifest.version},"
                f" directory is {self.name}/{self.version}"
            )
        return manifest


def is_version_number(name: str) -> bool:
    """ASCII digits only: str.isdigit() accepts "²" and "١", which int() refuses or reads as
    another number. Version directories and v2 version strings are read with it."""
    return name.isascii() and name.isdigit()


def model_names(repository: Path) -> list[str]:
    if not repository.is_dir():
        return []
    return sorted(
        entry.name
        for entry in repository.iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )


def versions(repository: Path, name: str) -> list[ModelVersion]:
    """Complete versions of one model, oldest first."""
    model_dir = repository / name
    if not model_dir.is_dir():
        return []
    found = []
    for entry in model_dir.iterdir():
        complete = entry.is_dir() and (entry / MANIFEST_FILE).is_file()
        if complete and is_version_number(entry.name) and int(entry.name) > 0:
            found.append(ModelVersion(name, int(entry.name), entry))
    return sorted(found, key=lambda v: v.version)


def latest_version(repository: Path, name: str) -> ModelVersion | None:
    found = versions(repository, name)
    return found[-1] if found else None


def next_version_number(repository: Path, name: str) -> int:
    """One past the highest numbered directory, complete or not, so numbers are never reused."""
    model_dir = repository / name
    numbers = [
        int(entry.name)
        for entry in (model_dir.iterdir() if model_dir.is_dir() else [])
        if is_version_number(entry.name)
    ]
    return max(numbers, default=0) + 1


def verify_file(directory: Path, file: str, expected_sha256: str) -> Path:
    path = directory / file
    if not path.is_file():
        raise IntegrityError(f"{path}: missing (named in the manifest)")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise IntegrityError(
            f"{path}: sha256 {actual[:12]}… does not match the manifest's {expected_sha256[:12]}…"
        )
    return path


def verify_artifact(model: ModelVersion, artifact: Artifact) -> Path:
    return verify_file(model.directory, artifact.file, artifact.sha256)
