"""Reading labelled texts out of user files (CSV, TSV, JSONL).

Every reader funnels its rows through `Examples.add`, so the rule for what counts as a usable
example lives in one place: a row with a blank text or a blank label is skipped and counted,
never kept and never dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FileFormat = Literal["csv", "tsv", "jsonl"]
FormatChoice = Literal["auto", "csv", "tsv", "jsonl"]

_SUFFIX_FORMATS: dict[str, FileFormat] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


class DatasetError(Exception):
    """A dataset problem, told in one line that names the file, column or dataset at fault."""

    def __init__(self, message: str) -> None:
        # The CLI prints str(error) after "seqserve: error: "; a stray newline (from pip's
        # output, or a text quoted into the message) must not split that line.
        super().__init__(" ".join(message.split()))


@dataclass
class Examples:
    """Texts with their labels (as strings), plus how many rows were unusable and why."""

    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    skipped_empty: int = 0
    skipped_unlabeled: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: object, label: object) -> None:
        """Keep the row, or count it as skipped (a blank text is counted before a blank label)."""
        text_str = _as_string(text)
        if not text_str:
            self.skipped_empty += 1
            return
        label_str = _as_string(label)
        if not label_str:
            self.skipped_unlabeled += 1
            return
        self.texts.append(text_str)
        self.labels.append(label_str)


def _as_string(value: object) -> str:
    """Strip a cell to a string; None (a missing cell or JSON null) becomes the empty string."""
    if value is None:
        return ""
    return str(value).strip()


def resolve_format(path: Path, fmt: FormatChoice = "auto") -> FileFormat:
    """The file's format: the explicit one, else the one its extension names."""
    if fmt != "auto":
        return fmt
    found = _SUFFIX_FORMATS.get(path.suffix.lower())
    if found is None:
        known = ", ".join(sorted(_SUFFIX_FORMATS))
        raise DatasetError(
            f"cannot tell the format of {path} from its extension (known: {known}); "
            "set the format to csv, tsv or jsonl"
        )
    return found


def decode_utf8(data: bytes, path: Path | str) -> str:
    """Decode strictly as UTF-8 (a leading byte-order mark is allowed), naming the file on error."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        raise DatasetError(
            f"{path} is not UTF-8 text (byte 0x{bad} at offset {exc.start}); "
            "re-save it with UTF-8 encoding"
        ) from None


def read_examples(
    path: Path,
    *,
    fmt: FormatChoice = "auto",
    text_column: str = "text",
    label_column: str = "label",
) -> Examples:
    """Read a CSV, TSV or JSONL file of labelled texts.

    The whole file is read into memory: datasets for these models are megabytes, and reading it
    at once lets an encoding error name its byte offset. CSV and TSV both follow the `csv`
    module's quoting rules (what pandas and spreadsheets write), so a field that starts with a
    double quote runs to the matching closing quote.
    """
    rows = _rows(path, fmt, (text_column, label_column))
    return collect_examples((row.get(text_column), row.get(label_column)) for row in rows)


def read_texts(path: Path, *, fmt: FormatChoice = "auto", text_column: str = "text"
               ) -> tuple[list[str], int]:
    """Read the texts of a CSV, TSV or JSONL file that need no label (texts a teacher model
    labels); the texts, and how many rows were blank and skipped."""
    texts, blank = [], 0
    for row in _rows(path, fmt, (text_column,)):
        text = _as_string(row.get(text_column))
        if text:
            texts.append(text)
        else:
            blank += 1
    return texts, blank


def _rows(path: Path, fmt: FormatChoice, used_columns: tuple[str, ...]
          ) -> list[dict[str, object]]:
    """The file's rows as dicts, once every column in ``used_columns`` is known to exist."""
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    file_format = resolve_format(path, fmt)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset file {path}: {exc.strerror}") from None
    text = decode_utf8(data, path)
    if file_format == "jsonl":
        columns, rows = _jsonl_rows(text, path, used_columns)
    else:
        columns, rows = _delimited_rows(text, path, "," if file_format == "csv" else "\t")
    for column in used_columns:
        if column not in columns:
            available = ", ".join(repr(c) for c in columns) or "none"
            raise DatasetError(f"{path} has no column {column!r}; available columns: {available}")
    return rows


def collect_examples(pairs: Iterable[tuple[object, object]]) -> Examples:
    """Gather (text, label) pairs, counting the unusable ones."""
    examples = Examples()
    for text, label in pairs:
        examples.add(text, label)
    return examples


def _delimited_rows(
    text: str, path: Path, delimiter: str
) -> tuple[list[str], list[dict[str, object]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        columns = [name.strip() for name in reader.fieldnames or []]
        # Header names are compared stripped: "text, label" is a common hand-written header.
        reader.fieldnames = columns
        rows: list[dict[str, object]] = list(reader)
    except csv.Error as exc:
        raise DatasetError(f"{path} line {reader.line_num}: malformed row ({exc})") from None
    if not columns:
        raise DatasetError(f"{path} is empty: expected a header row naming the columns")
    return columns, rows


def _jsonl_rows(
    text: str, path: Path, used_columns: tuple[str, ...]
) -> tuple[list[str], list[dict[str, object]]]:
    columns: dict[str, None] = {}  # an ordered set: keys in the order they first appear
    rows: list[dict[str, object]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(
                f"{path} line {number}: expected a JSON object, got {type(row).__name__}"
            )
        for key in used_columns:
            if isinstance(row.get(key), dict | list):
                # A nested value has no single text or label reading; refuse it rather than
                # train on its Python repr.
                raise DatasetError(
                    f"{path} line {number}: field {key!r} holds a JSON "
                    f"{'object' if isinstance(row[key], dict) else 'array'}, "
                    "expected a string or number"
                )
        columns.update(dict.fromkeys(row))
        rows.append(row)
    if not rows:
        raise DatasetError(f"{path} is empty: expected one JSON object per line")
    return list(columns), rows
