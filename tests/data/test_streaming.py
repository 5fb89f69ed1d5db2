"""Streaming mode: the same packed rows as the map-style pipeline, shuffled through a seeded
buffer; every k-th document validates; exact resume; ranks as one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import (
    BYTE_EOS,
    byte_texts,
    fake_trainer,
    make_module,
    random_documents,
    take,
    write_texts,
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A training folder of 30 documents and a validation folder of 5."""
    root = tmp_path_factory.mktemp("streaming")
    write_texts(root / "train", random_documents(30, seed=11))
    write_texts(root / "val", random_documents(5, seed=12))
    return {"paths": [str(root / "train")]}, {"paths": [str(root / "val")]}


def streaming_module(tmp_path, source, **options):
    module = make_module(tmp_path, source, streaming=True, **options)
    module.prepare()
    return module


def keys(batches) -> list[bytes]:
    return [row.numpy().tobytes() for batch in batches for row in batch]


@pytest.mark.parametrize("shuffle_buffer", [7, 10_000])
def test_one_epoch_holds_the_rows_of_the_map_style_pipeline(tmp_path, sources, shuffle_buffer):
    train, val = sources
    arrays = make_module(tmp_path, train, validation=val)
    arrays.prepare()
    rows = arrays.train_rows.rows.astype(np.int64)
    stream = streaming_module(
        tmp_path, train, validation=val, micro_batch_size=1, shuffle_buffer=shuffle_buffer
    )
    epoch = take(stream.train_dataloader(), len(rows))
    assert all(batch.shape == (1, 17) and batch.dtype == torch.int64 for batch in epoch)
    assert sorted(keys(epoch)) == sorted(keys([torch.from_numpy(rows)]))
    assert keys(epoch) != keys([torch.from_numpy(rows)])  # shuffled
    assert np.array_equal(stream.val_rows.rows, arrays.val_rows.rows)
    assert stream.stats["val_tokens"] == arrays.stats["val_tokens"]

    next_epoch = take(stream.train_dataloader(), 2 * len(rows))[len(rows) :]
    assert sorted(keys(next_epoch)) == sorted(keys(epoch))
    assert keys(next_epoch) != keys(epoch)  # another order


def test_every_kth_document_validates(tmp_path, sources):
    train, _ = sources
    documents = [path.read_text() for path in sorted(_folder(train).iterdir())]
    module = streaming_module(tmp_path, train, val_fraction=0.2)  # k = 5
    assert byte_texts(module.val_rows.tokens) == documents[4::5]
    assert module.stats["val_documents"] == 6
    assert module.stats["train_tokens"] is None
    held_out = set(documents[4::5])
    assert_stream_trains_on(module, [text for text in documents if text not in held_out])


def test_max_documents_cuts_the_stream(tmp_path, sources):
    train, _ = sources
    documents = [path.read_text() for path in sorted(_folder(train).iterdir())]
    module = streaming_module(tmp_path, train, val_fraction=0.5, max_documents=6)
    assert byte_texts(module.val_rows.tokens) == documents[1:6:2]
    assert_stream_trains_on(module, documents[0:6:2])


def test_empty_documents_do_not_count(tmp_path):
    documents = random_documents(6, seed=4)
    write_texts(tmp_path / "t", [documents[0], "", documents[1], "", "", *documents[2:]])
    module = streaming_module(tmp_path, {"paths": [str(tmp_path / "t")]}, val_fraction=0.5)
    assert byte_texts(module.val_rows.tokens) == documents[1::2]
    assert_stream_trains_on(module, documents[0::2])


def assert_stream_trains_on(module, documents: list[str]) -> None:
    """Unshuffled (a buffer of one row), a pass of the training loader is exactly
    ``documents`` joined with eos, cut into rows."""
    module.data_config.shuffle_buffer = 1
    module.micro_batch_size = 1
    joined = b"".join(t.encode() + b"\0" for t in documents)
    expected = np.frombuffer(joined, np.uint8).astype(np.int64)
    expected[expected == 0] = BYTE_EOS
    n_rows = len(expected) // 17
    rows = torch.cat(take(module.train_dataloader(), n_rows + 1)).numpy()
    assert np.array_equal(rows[:n_rows].ravel(), expected[: n_rows * 17])
    assert np.array_equal(rows[n_rows], rows[0])  # the next pass starts over, tail dropped


def test_resume_skips_exactly_the_consumed_batches(tmp_path, sources):
    train, val = sources
    options = {"validation": val, "micro_batch_size": 4, "grad_accum": 2, "shuffle_buffer": 50}
    module = streaming_module(tmp_path, train, **options)
    reference = take(module.train_dataloader(), 130)  # several epochs of ~22 batches
    for step in (3, 13, 50):
        module.trainer = fake_trainer(global_step=step)
        resumed = take(module.train_dataloader(), 20)
        expected = reference[2 * step : 2 * step + 20]
        assert all(torch.equal(a, b) for a, b in zip(resumed, expected, strict=True))


def test_two_ranks_see_what_one_process_sees(tmp_path, sources):
    train, val = sources
    single = streaming_module(tmp_path, train, validation=val, micro_batch_size=4)
    single.trainer = fake_trainer(global_step=5)
    expected = take(single.train_dataloader(), 30)
    halves = []
    for rank in (0, 1):
        module = streaming_module(tmp_path, train, validation=val, micro_batch_size=2)
        module.trainer = fake_trainer(world_size=2, global_rank=rank, global_step=5)
        halves.append(take(module.train_dataloader(), 30))
    for step in range(30):
        assert torch.equal(torch.cat([halves[0][step], halves[1][step]]), expected[step])


def test_workers_do_not_change_the_stream(tmp_path, sources):
    train, val = sources
    plain = streaming_module(tmp_path, train, validation=val)
    workers = streaming_module(tmp_path, train, validation=val, num_workers=2)
    first, second = take(plain.train_dataloader(), 25), take(workers.train_dataloader(), 25)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_streaming_unigram_baseline_counts_the_first_training_documents(tmp_path, sources):
    train, val = sources
    documents = [path.read_text() for path in sorted(_folder(train).iterdir())]
    module = streaming_module(tmp_path, train, validation=val)
    counts = np.bincount(
        np.concatenate([np.frombuffer(t.encode(), np.uint8) for t in documents]), minlength=257
    ).astype(np.float64)
    counts[256] += len(documents)  # one eos per document
    log_p = np.log(counts + 1) - np.log(counts.sum() + 257)
    targets = module.val_rows.rows[:, 1:].ravel()
    assert np.isclose(module.stats["unigram_val_loss"], -log_p[targets].mean(), rtol=1e-12)


def _folder(source) -> object:
    from pathlib import Path

    return Path(source["paths"][0])
