"""Sources: every format loads the same documents; paths, globs, {stdlib} and exclude resolve
deterministically; bad input fails with one line naming the field or file."""

from __future__ import annotations

import glob
import json
import os
import sysconfig

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import byte_texts, make_module, random_documents, write_texts

from hybrid.data import DataError
from hybrid.data.sources import load_documents, resolve_files
from hybrid.recipe import SourceConfig


def all_documents(module) -> list[str]:
    """Every document a prepared byte-level module holds, training then validation."""
    return byte_texts(module.train_rows.tokens) + byte_texts(module.val_rows.tokens)


def test_text_folder_glob_and_exclude_give_sorted_files(tmp_path):
    documents = random_documents(6)
    write_texts(tmp_path / "corpus" / "b", documents[:3])
    write_texts(tmp_path / "corpus" / "a" / "deep", documents[3:])
    (tmp_path / "corpus" / "skip").mkdir()
    (tmp_path / "corpus" / "skip" / "x.txt").write_text("excluded")

    folder = SourceConfig(paths=[str(tmp_path / "corpus")], exclude=["*/skip/*"])
    recursive = SourceConfig(paths=[str(tmp_path / "corpus" / "**" / "*.txt")], exclude=["*/x.txt"])
    expected = documents[3:] + documents[:3]  # a/deep/... sorts before b/...
    for source in (folder, recursive):
        loaded = load_documents(source, "data.source", cache_dir=str(tmp_path), max_documents=None)
        assert list(loaded.texts()) == expected


def test_stdlib_placeholder_expands_and_sorts():
    stdlib = sysconfig.get_paths()["stdlib"]
    source = SourceConfig(paths=["{stdlib}/json/*.py"], exclude=["*/decoder.py"])
    files = [str(path) for path in resolve_files(source, "data.source")]
    expected = sorted(
        os.path.realpath(path)
        for path in glob.glob(os.path.join(stdlib, "json", "*.py"))
        if not path.endswith("decoder.py")
    )
    assert files == expected
    assert len(files) >= 3


def test_empty_documents_dropped_and_max_documents_keeps_the_first(tmp_path):
    write_texts(tmp_path / "t", ["one", "", "two", "three", "", "four"])
    source = SourceConfig(paths=[str(tmp_path / "t")])
    loaded = load_documents(source, "data.source", cache_dir=str(tmp_path), max_documents=None)
    assert list(loaded.texts()) == ["one", "two", "three", "four"]
    capped = load_documents(source, "data.source", cache_dir=str(tmp_path), max_documents=3)
    assert list(capped.texts()) == ["one", "two", "three"]


def test_non_utf8_bytes_are_replaced_not_fatal(tmp_path):
    folder = tmp_path / "t"
    write_texts(folder, random_documents(4, shortest=100, longest=101))
    (folder / "doc-0001.txt").write_bytes(b"latin-1 caf\xe9 and \xff\xfe bytes " * 10)
    module = make_module(tmp_path, {"paths": [str(folder)]}, val_fraction=0.25, seq_len=8)
    module.prepare()
    expected = ("latin-1 caf\ufffd and \ufffd\ufffd bytes " * 10).encode("utf-8")
    assert expected.decode("utf-8") in all_documents(module)


def write_records(path, documents, fmt):
    """``documents`` as jsonl or parquet records with an extra field, plus a null text."""
    records = [{"id": index, "text": text} for index, text in enumerate(documents)]
    records.insert(1, {"id": -1, "text": None})
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_record_formats_load_the_same_documents(tmp_path, fmt):
    documents = random_documents(12, seed=3)
    if fmt == "disk":
        records = datasets.Dataset.from_dict({"body": documents, "n": list(range(12))})
        datasets.DatasetDict({"train": records}).save_to_disk(str(tmp_path / "saved"))
        source = {"format": "disk", "paths": [str(tmp_path / "saved")], "text_field": "body"}
    else:
        write_records(tmp_path / f"a.{fmt}", documents[:5], fmt)
        write_records(tmp_path / f"b.{fmt}", documents[5:], fmt)
        source = {"format": fmt, "paths": [str(tmp_path / f"*.{fmt}")]}
    module = make_module(tmp_path, source, val_fraction=0.25, seq_len=8)
    module.prepare()
    assert sorted(all_documents(module)) == sorted(documents)
    assert module.stats["train_documents"] + module.stats["val_documents"] == 12


def test_separate_validation_source(tmp_path):
    train, held_out = random_documents(6, seed=1), random_documents(3, seed=2)
    write_texts(tmp_path / "train", train)
    write_texts(tmp_path / "val", held_out)
    module = make_module(
        tmp_path,
        {"paths": [str(tmp_path / "train")]},
        validation={"paths": [str(tmp_path / "val")]},
    )
    module.prepare()
    assert byte_texts(module.train_rows.tokens) == train
    assert byte_texts(module.val_rows.tokens) == held_out


def broken_link(tmp_path):
    write_texts(tmp_path / "t", ["fine text"] * 3)
    (tmp_path / "t" / "zz.txt").symlink_to(tmp_path / "missing.txt")
    return {"paths": [str(tmp_path / "t" / "*.txt")]}


def jsonl_without_field(tmp_path):
    (tmp_path / "good.jsonl").write_text('{"text": "a document"}\n')
    (tmp_path / "bad.jsonl").write_text('{"content": "a document"}\n')
    return {"format": "jsonl", "paths": [str(tmp_path / "*.jsonl")]}


def parquet_without_column(tmp_path):
    pq.write_table(pa.table({"content": ["a document"]}), tmp_path / "bad.parquet")
    return {"format": "parquet", "paths": [str(tmp_path / "bad.parquet")]}


def not_parquet(tmp_path):
    (tmp_path / "bad.parquet").write_text("not parquet")
    return {"format": "parquet", "paths": [str(tmp_path / "bad.parquet")]}


def all_empty(tmp_path):
    write_texts(tmp_path / "t", ["", "", ""])
    return {"paths": [str(tmp_path / "t")]}


def everything_excluded(tmp_path):
    write_texts(tmp_path / "t", ["text"])
    return {"paths": [str(tmp_path / "t")], "exclude": ["*.txt"]}


def not_a_saved_dataset(tmp_path):
    write_texts(tmp_path / "t", ["text"])
    return {"format": "disk", "paths": [str(tmp_path / "t")]}


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (
            lambda tmp: {"paths": [str(tmp / "nowhere" / "*.txt")]},
            "data.source.paths: no files match '",
        ),
        (lambda tmp: {"paths": []}, "data.source.paths: required for format 'text'"),
        (everything_excluded, "data.source.exclude: excludes all 1 files"),
        (broken_link, "data.source.paths: cannot read '"),
        (all_empty, "data.source: no text: all 3 documents are empty"),
        (jsonl_without_field, "data.source.text_field: '{tmp}/bad.jsonl' has no field 'text'"),
        (
            parquet_without_column,
            "data.source.text_field: '{tmp}/bad.parquet' has no column 'text'",
        ),
        (not_parquet, "data.source.paths: '{tmp}/bad.parquet' is not a readable parquet file"),
        (
            lambda tmp: {"format": "disk", "paths": [str(tmp / "no")]},
            "data.source.paths: no such directory",
        ),
        (
            not_a_saved_dataset,
            "data.source.paths: '{tmp}/t' is not a dataset written by save_to_disk",
        ),
        (lambda tmp: {"format": "hub"}, "data.source.name: required for format 'hub'"),
    ],
)
def test_source_errors_are_one_line_naming_the_field(tmp_path, make_source, message):
    module = make_module(tmp_path, make_source(tmp_path))
    with pytest.raises(DataError) as caught:
        module.prepare()
    text = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in text
    assert text.startswith(message.format(tmp=os.path.realpath(tmp_path))), text


@pytest.mark.parametrize("streaming", [False, True])
def test_unreachable_hub_dataset_fails_fast_naming_the_name(tmp_path, monkeypatch, streaming):
    # Offline mode makes huggingface_hub refuse at once, as it does without a network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    module = make_module(
        tmp_path, {"format": "hub", "name": "nobody/no-such-data"}, streaming=streaming
    )
    with pytest.raises(DataError) as caught:
        module.prepare()
    text = str(caught.value)
    assert text.startswith("data.source.name: cannot load 'nobody/no-such-data' from the Hugging")
    assert "\n" not in text


def test_validation_source_errors_name_data_validation(tmp_path, corpus):
    _, directory = corpus
    module = make_module(
        tmp_path,
        {"paths": [str(directory / "texts")]},
        validation={"paths": [str(tmp_path / "absent.txt")]},
    )
    with pytest.raises(DataError, match=r"^data\.validation\.paths: no files match '"):
        module.prepare()
