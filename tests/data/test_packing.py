"""Packing, the document-level split and the unigram baseline, checked against independent
computations: rows must be the corpus joined with eos, cut into rows."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from data_helpers import BYTE_EOS, byte_texts, make_module

from hybrid.data.packing import iter_packed_rows, pack_rows, shuffled
from hybrid.data.splits import split_documents


def test_pack_rows_is_a_view_dropping_the_tail():
    tokens = np.arange(23)
    rows = pack_rows(tokens, 5)
    assert rows.shape == (4, 5)
    assert rows.base is not None
    assert rows[2].tolist() == [10, 11, 12, 13, 14]


def test_streaming_packer_equals_packing_the_concatenation():
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 100, size=int(rng.integers(1, 30))).tolist() for _ in range(50)]
    rows = np.stack(list(iter_packed_rows(documents, 7)))
    expected = pack_rows(np.concatenate(documents), 7)
    assert rows.dtype == np.int64
    assert np.array_equal(rows, expected)


def test_shuffle_buffer_permutes_deterministically():
    items = list(range(100))
    assert list(shuffled(items, 1, np.random.default_rng(1))) == items  # no buffer, no shuffle
    for buffer_size in (2, 10, 100, 1000):
        first = list(shuffled(items, buffer_size, np.random.default_rng(1)))
        again = list(shuffled(items, buffer_size, np.random.default_rng(1)))
        other = list(shuffled(items, buffer_size, np.random.default_rng(2)))
        assert sorted(first) == items
        assert first == again
        assert first != other
        assert first != items


def test_rows_are_the_documents_joined_with_eos(tmp_path, corpus):
    documents, directory = corpus
    module = make_module(
        tmp_path, {"paths": [str(directory / "texts")]}, val_fraction=0.2, seq_len=16
    )
    module.prepare()
    train, val = module.train_rows, module.val_rows
    train_texts, val_texts = byte_texts(train.tokens), byte_texts(val.tokens)

    # Disjoint document-level split covering the corpus, each part in corpus order.
    assert len(val_texts) == round(0.2 * len(documents))
    assert sorted(train_texts + val_texts) == sorted(documents)
    assert not set(train_texts) & set(val_texts)
    assert train_texts == [text for text in documents if text in set(train_texts)]

    # Rows: the corpus joined with eos, cut into rows of seq_len + 1, tail dropped.
    joined = b"".join(text.encode() + b"\0" for text in train_texts)
    expected = np.frombuffer(joined, dtype=np.uint8).astype(np.int64)
    expected[expected == 0] = BYTE_EOS
    n_rows = len(expected) // 17
    assert train.rows.shape == (n_rows, 17)
    assert np.array_equal(train.rows, expected[: n_rows * 17].reshape(n_rows, 17))
    assert module.stats["train_tokens"] == len(expected)
    assert module.stats["train_sequences"] == n_rows


def test_split_is_seeded_and_bounded():
    train, val = split_documents(100, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    again_train, again_val = split_documents(100, 0.1, seed=0)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, split_documents(100, 0.1, seed=1)[1])
    assert len(split_documents(100, 0.001, seed=0)[1]) == 1  # at least one validates
    assert len(split_documents(3, 0.99, seed=0)[0]) == 1  # at least one trains


def test_unigram_baseline_matches_an_explicit_computation(tmp_path, corpus):
    _, directory = corpus
    module = make_module(tmp_path, {"paths": [str(directory / "texts")]}, val_fraction=0.2)
    module.prepare()
    counts = Counter(module.train_rows.rows.ravel().tolist())
    total, vocab = sum(counts.values()), 257
    targets = module.val_rows.rows[:, 1:].ravel().tolist()
    expected = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in targets) / len(targets)
    assert math.isclose(module.stats["unigram_val_loss"], expected, rel_tol=1e-9)
    assert expected < math.log(vocab)  # better than uniform: the baseline means something
