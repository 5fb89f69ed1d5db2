"""Training and validation loaders: infinite seeded epochs, exact resume, rank sharding equal to
one process, validation shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import fake_trainer, make_module, take
from lightning.fabric.utilities.data import has_len

from hybrid.data import DataError


@pytest.fixture(scope="module")
def source(corpus):
    _, directory = corpus
    return {"paths": [str(directory / "texts")]}


def loader(tmp_path, source, *, trainer=None, **options):
    """A prepared module's training loader (caches shared under ``tmp_path``)."""
    module = make_module(tmp_path, source, **options)
    module.prepare()
    module.trainer = trainer
    return module, module.train_dataloader()


def row_keys(batches: list[torch.Tensor]) -> list[bytes]:
    return [row.numpy().tobytes() for batch in batches for row in batch]


def test_training_loader_is_infinite_over_seeded_epochs(tmp_path, source):
    module, batches = loader(tmp_path, source, micro_batch_size=3)
    assert not has_len(batches)  # Lightning treats it as infinite
    rows = torch.from_numpy(module.train_rows.rows.astype(np.int64))
    per_epoch = len(rows) // 3
    assert len(rows) % 3 != 0  # so that an incomplete last micro-batch is dropped

    got = take(batches, 3 * per_epoch + 1)
    assert all(b.shape == (3, 17) and b.dtype == torch.int64 for b in got)
    all_rows = set(row_keys([rows]))
    assert len(all_rows) == len(rows)  # distinct rows: keys identify them
    epochs = [row_keys(got[e * per_epoch : (e + 1) * per_epoch]) for e in range(3)]
    for epoch in epochs:  # each epoch: distinct rows of the corpus, all but the remainder
        assert len(set(epoch)) == len(epoch) == 3 * per_epoch
        assert set(epoch) <= all_rows
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0][:10] != row_keys([rows])[:10]  # shuffled, not in corpus order


def test_same_seed_same_batches_other_seed_other_batches(tmp_path, source):
    first = take(loader(tmp_path, source, seed=5)[1], 30)
    again = take(loader(tmp_path, source, seed=5)[1], 30)
    other = take(loader(tmp_path, source, seed=6)[1], 30)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_resume_continues_exactly_across_epochs(tmp_path, source):
    module, uninterrupted = loader(tmp_path, source, micro_batch_size=4, grad_accum=3)
    per_epoch = len(module.train_rows) // 4
    reference = take(uninterrupted, 3 * per_epoch)
    for step in (1, per_epoch // 3, per_epoch // 3 + 1):  # the last ones cross an epoch
        trainer = fake_trainer(global_step=step)
        _, resumed = loader(tmp_path, source, micro_batch_size=4, grad_accum=3, trainer=trainer)
        start = step * 3
        continued = take(resumed, per_epoch + 2)
        expected = reference[start : start + per_epoch + 2]
        assert all(torch.equal(a, b) for a, b in zip(continued, expected, strict=True))


@pytest.mark.parametrize("global_step", [0, 7])
def test_two_ranks_see_what_one_process_sees(tmp_path, source, global_step):
    n_steps = 40
    _, single = loader(
        tmp_path, source, micro_batch_size=4, trainer=fake_trainer(1, 0, global_step)
    )
    ranks = [
        loader(tmp_path, source, micro_batch_size=2, trainer=fake_trainer(2, rank, global_step))[1]
        for rank in (0, 1)
    ]
    expected = take(single, n_steps)
    rank_batches = [take(rank_loader, n_steps) for rank_loader in ranks]
    for step in range(n_steps):
        assert torch.equal(
            torch.cat([rank_batches[0][step], rank_batches[1][step]]), expected[step]
        )


def test_workers_do_not_change_the_batches(tmp_path, source):
    plain = take(loader(tmp_path, source, num_workers=0)[1], 12)
    workers = take(loader(tmp_path, source, num_workers=2)[1], 12)
    assert all(torch.equal(a, b) for a, b in zip(plain, workers, strict=True))


def test_validation_loader_fixed_order_sharded_equally(tmp_path, source):
    module = make_module(tmp_path, source, micro_batch_size=4, val_fraction=0.3)
    module.prepare()
    rows = torch.from_numpy(module.val_rows.rows.astype(np.int64))
    keys = row_keys([rows])
    assert len(set(keys)) == len(keys)

    batches = list(module.val_dataloader())
    assert all(batch.shape[0] <= 4 and batch.dtype == torch.int64 for batch in batches)
    everything = torch.cat(batches)
    assert sorted(row_keys([everything])) == sorted(keys)  # every row once
    assert row_keys([everything]) != keys  # spread over the documents, not corpus order
    again = make_module(tmp_path, source, micro_batch_size=4, val_fraction=0.3)
    again.prepare()
    assert torch.equal(torch.cat(list(again.val_dataloader())), everything)  # fixed order

    world_size = 3
    shares = []
    for rank in range(world_size):
        module.trainer = fake_trainer(world_size, rank)
        shares.append(list(module.val_dataloader()))
    share = len(rows) // world_size
    assert all(len(torch.cat(part)) == share for part in shares)
    assert len({len(part) for part in shares}) == 1  # every rank runs as many batches
    assert torch.equal(
        torch.cat([torch.cat(part) for part in shares]), everything[: share * world_size]
    )


def test_too_little_data_for_a_micro_batch_is_a_data_error(tmp_path, source):
    module = make_module(tmp_path, source, micro_batch_size=2, seq_len=5000)
    with pytest.raises(DataError, match=r"^data\.seq_len: the training documents pack into"):
        module.prepare()
    module = make_module(tmp_path, source, micro_batch_size=300)
    module.prepare()
    module.trainer = fake_trainer(world_size=2)
    with pytest.raises(DataError, match=r"fewer than one global micro-batch"):
        module.train_dataloader()


def test_too_little_validation_text_is_a_data_error(tmp_path, source):
    module = make_module(tmp_path, source, val_fraction=0.01, seq_len=400)
    with pytest.raises(
        DataError, match=r"^data\.val_fraction: the validation documents \(\d+ tokens"
    ):
        module.prepare()
