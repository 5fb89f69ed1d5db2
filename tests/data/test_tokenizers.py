"""Tokenizers of a run: bytes plus eos; BPE trained on the training split, saved atomically,
reloaded with the same ids, reused instead of retrained; a given tokenizer.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import byte_texts, make_module, random_documents, split_at, write_texts

import hybrid.data.tokenization
from hybrid.data import DataError
from hybrid.tokenizer import EOS_TOKEN, ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

BPE = {"kind": "bpe", "vocab_size": 300, "train_bytes": 4000}


def must_not_train(*args, **kwargs):
    raise AssertionError("a tokenizer was trained")


def test_byte_tokenizer_has_eos_after_the_bytes(tmp_path):
    tokenizer = ByteTokenizer()
    assert (tokenizer.eos_id, tokenizer.vocab_size) == (256, 257)
    assert tokenizer.encode("é") == [0xC3, 0xA9]
    assert tokenizer.encode_batch(["a", "é"]) == [[97], [0xC3, 0xA9]]
    decoder = tokenizer.decoder()
    assert "".join(decoder.feed(token) for token in [104, 256, 105, 300]) == "hi"
    tokenizer.save(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_is_trained_on_training_documents_saved_and_reloaded(tmp_path, corpus):
    documents, directory = corpus
    module = make_module(tmp_path, {"paths": [str(directory / "texts")]}, tokenizer=BPE)
    module.prepare()
    tokenizer = module.tokenizer
    saved = tmp_path / "run" / "tokenizer.json"
    assert saved.is_file()
    assert [p.name for p in saved.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert tokenizer.eos_id == json.loads(saved.read_text())["added_tokens"][0]["id"]
    assert 257 < tokenizer.vocab_size <= 300

    reloaded = load_tokenizer(tmp_path / "run")
    assert reloaded.fingerprint == tokenizer.fingerprint
    for text in documents[:5]:
        assert reloaded.encode(text) == tokenizer.encode(text)
    # The packed ids decode back to the documents.
    decoded = [
        reloaded._tokenizer.decode(ids.tolist())
        for ids in split_at(module.train_rows.tokens, tokenizer.eos_id)
    ]
    assert set(decoded) <= set(documents)
    assert len(decoded) == module.stats["train_documents"]


def test_saved_bpe_is_reused_not_retrained(tmp_path, corpus, monkeypatch):
    _, directory = corpus
    first = make_module(tmp_path, {"paths": [str(directory / "texts")]}, tokenizer=BPE)
    first.prepare()
    saved = tmp_path / "run" / "tokenizer.json"
    written = saved.stat().st_mtime_ns

    monkeypatch.setattr(hybrid.data.tokenization, "train_bpe", must_not_train)
    again = make_module(tmp_path, {"paths": [str(directory / "texts")]}, tokenizer=BPE)
    again.prepare()
    assert again.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert saved.stat().st_mtime_ns == written
    assert np.array_equal(again.train_rows.rows, first.train_rows.rows)


@pytest.mark.parametrize(("field", "value"), [("vocab_size", 320), ("train_bytes", 8000)])
def test_saved_bpe_trained_with_other_settings_is_refused(tmp_path, corpus, field, value):
    _, directory = corpus
    make_module(tmp_path, {"paths": [str(directory / "texts")]}, tokenizer=BPE).prepare()
    saved = tmp_path / "run" / "tokenizer.json"
    written = saved.read_bytes()
    changed = make_module(
        tmp_path, {"paths": [str(directory / "texts")]}, tokenizer={**BPE, field: value}
    )
    with pytest.raises(DataError, match=f"tokenizer.{field}: {value}, but .* trained with "):
        changed.prepare()
    assert saved.read_bytes() == written  # the run's tokenizer is kept


def test_training_reads_at_most_train_bytes():
    def texts():
        yield "ab" * 400  # 800 bytes
        yield "cd" * 300  # cut after 200 bytes
        raise AssertionError("read past the budget")

    capped = train_bpe(texts(), vocab_size=280, max_bytes=1000)
    explicit = train_bpe(["ab" * 400, "cd" * 100], vocab_size=280, max_bytes=10**6)
    assert capped.fingerprint == explicit.fingerprint
    assert capped.eos_id == 0 and capped._tokenizer.token_to_id(EOS_TOKEN) == 0


def test_special_token_text_inside_documents_is_not_an_eos():
    tokenizer = train_bpe(random_documents(5), vocab_size=280, max_bytes=10**6)
    text = f"before {EOS_TOKEN} after"
    (ids,) = tokenizer.encode_batch([text])
    assert tokenizer.eos_id not in ids
    assert tokenizer._tokenizer.decode(ids) == text


def test_given_tokenizer_path_is_used_and_copied_to_the_run(tmp_path, corpus, monkeypatch):
    _, directory = corpus
    given = train_bpe(random_documents(8, seed=7), vocab_size=290, max_bytes=10**6)
    given.save(tmp_path / "given")
    monkeypatch.setattr(hybrid.data.tokenization, "train_bpe", must_not_train)
    config = {**BPE, "path": str(tmp_path / "given" / "tokenizer.json")}
    module = make_module(tmp_path, {"paths": [str(directory / "texts")]}, tokenizer=config)
    module.prepare()
    assert module.tokenizer.fingerprint == given.fingerprint
    copy = tmp_path / "run" / "tokenizer.json"
    assert copy.read_bytes() == (tmp_path / "given" / "tokenizer.json").read_bytes()
    copied = copy.stat().st_mtime_ns
    again = make_module(tmp_path, {"paths": [str(directory / "texts")]}, tokenizer=config)
    again.prepare()
    assert copy.stat().st_mtime_ns == copied  # not rewritten by later processes
    assert HFTokenizer(copy).fingerprint == given.fingerprint


def test_byte_kind_refuses_a_run_directory_with_a_bpe_tokenizer(tmp_path, corpus):
    _, directory = corpus
    train_bpe(random_documents(4), vocab_size=280, max_bytes=10**6).save(tmp_path / "run")
    module = make_module(tmp_path, {"paths": [str(directory / "texts")]})
    with pytest.raises(DataError, match=r"^tokenizer\.kind: 'byte', but the run directory holds"):
        module.prepare()


def no_eos_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "plain.json"
    Tokenizer(models.BPE()).save(str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "make_path", "message"),
    [
        ("bpe", lambda tmp: tmp / "absent.json", "tokenizer.path: no such file '"),
        ("byte", lambda tmp: tmp / "absent.json", "tokenizer.path: read only with kind 'bpe'"),
        (
            "bpe",
            no_eos_tokenizer,
            "tokenizer.path: '{tmp}/plain.json' has no end-of-document token",
        ),
    ],
)
def test_tokenizer_errors_name_the_field(tmp_path, corpus, kind, make_path, message):
    _, directory = corpus
    config = {"kind": kind, "path": str(make_path(tmp_path))}
    module = make_module(tmp_path, {"paths": [str(directory / "texts")]}, tokenizer=config)
    with pytest.raises(DataError) as caught:
        module.prepare()
    assert str(caught.value).startswith(message.format(tmp=tmp_path)), str(caught.value)
    assert "\n" not in str(caught.value)


def test_invalid_tokenizer_json_is_a_data_error(tmp_path, corpus):
    _, directory = corpus
    (tmp_path / "bad.json").write_text("{not json")
    config = {"kind": "bpe", "path": str(tmp_path / "bad.json")}
    module = make_module(tmp_path, {"paths": [str(directory / "texts")]}, tokenizer=config)
    with pytest.raises(DataError, match=r"^tokenizer\.path: '.*bad\.json' is not a tokenizers"):
        module.prepare()


def test_bpe_is_trained_on_the_training_split_only(tmp_path):
    pairs = ["qa", "wb", "ec", "rd", "tf", "yg", "uh", "ij", "ok", "pl"]
    write_texts(tmp_path / "t", [f"{pair} " * 50 for pair in pairs])
    source = {"paths": [str(tmp_path / "t")]}
    split = make_module(tmp_path, source, val_fraction=0.2, seed=3, run_dir=tmp_path / "bytes")
    split.prepare()  # byte-level: the split can be read back from the rows
    held_out = {text.split()[0] for text in byte_texts(split.val_rows.tokens)}
    assert len(held_out) == 2

    module = make_module(tmp_path, source, val_fraction=0.2, seed=3, tokenizer=BPE)
    module.prepare()
    vocabulary = module.tokenizer._tokenizer.get_vocab()
    assert {pair for pair in pairs if pair in vocabulary} == set(pairs) - held_out


def test_bpe_tokenizer_sees_no_validation_text(tmp_path):
    # Training and validation documents use disjoint alphabets: the merges come from training.
    write_texts(tmp_path / "train", ["xyxyxy xy " * 40] * 4)
    write_texts(tmp_path / "val", ["qwqwqw qw " * 40] * 2)
    module = make_module(
        tmp_path,
        {"paths": [str(tmp_path / "train")]},
        validation={"paths": [str(tmp_path / "val")]},
        tokenizer=BPE,
    )
    module.prepare()
    vocabulary = module.tokenizer._tokenizer.get_vocab()
    assert "xy" in vocabulary
    assert "qw" not in vocabulary
