"""MQAR examples (Zoology style), their accuracy metric, and training on them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hybrid.data.errors import DataError
from hybrid.data.synthetic import MQARDataModule
from hybrid.eval.mqar import accuracy, accuracy_grid
from hybrid.labels import IGNORE_INDEX
from hybrid.recipe import DataConfig
from hybrid.synthetic.mqar import TEST_STREAM, TRAIN_STREAM, MQARSpec, make_examples

SPEC = MQARSpec(vocab_size=64, seq_len=64, n_kv_pairs=6)


def test_examples_follow_the_zoology_layout():
    inputs, labels = make_examples(SPEC, 200, seed=1)
    assert inputs.shape == labels.shape == (200, 64) and inputs.dtype == torch.int64
    half, pairs = 32, 6
    for x, y in zip(inputs.tolist(), labels.tolist(), strict=True):
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k < half for k in keys)
        assert all(half <= v < 64 for v in values)
        table = dict(zip(keys, values, strict=True))
        asked = [t for t, label in enumerate(y) if label != IGNORE_INDEX]
        assert len(asked) == pairs and all(t >= 2 * pairs for t in asked)
        assert sorted(x[t] for t in asked) == sorted(keys)  # every key asked exactly once
        assert all(y[t] == table[x[t]] for t in asked)  # the label is the key's value
        assert all(y[t] == IGNORE_INDEX for t in range(2 * pairs))


def test_query_distances_follow_a_power_law():
    _, labels = make_examples(MQARSpec(64, 256, 4), 2000, seed=2)
    positions = (labels != IGNORE_INDEX).nonzero()[:, 1].numpy()
    gaps = (positions - 8) // 2  # query slot index after the 4 pairs
    slots = (256 - 8) // 2
    # p(slot d) ~ d^(a - 1) with a = 0.01 puts about log(15)/log(124) ~ 0.56 of single draws in
    # the first eighth of the slots (uniform: 0.125); four draws without replacement, a bit less
    early = np.mean(gaps < slots // 8)
    assert 0.35 < early < 0.7, early
    assert np.mean(gaps >= slots // 2) < 0.25


def test_streams_are_disjoint_and_seeded():
    a, _ = make_examples(SPEC, 100, seed=3, stream=TRAIN_STREAM)
    b, _ = make_examples(SPEC, 100, seed=3, stream=TRAIN_STREAM)
    c, _ = make_examples(SPEC, 100, seed=3, stream=TEST_STREAM)
    assert torch.equal(a, b)
    train_rows = {tuple(row) for row in a.tolist()}
    assert not train_rows & {tuple(row) for row in c.tolist()}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (MQARSpec(63, 64, 4), "vocab_size"),
        (MQARSpec(64, 64, 40), "n_kv_pairs"),
        (MQARSpec(64, 12, 4), "seq_len"),
        (MQARSpec(64, 64, 4, power_a=0.0), "power_a"),
    ],
)
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        make_examples(spec, 1, seed=0)


class LookupModel(torch.nn.Module):
    """Answers every query by reading the pairs: an oracle (``wrong`` flips to a bad answer)."""

    def __init__(self, vocab_size: int, pairs: int, wrong_every: int = 0) -> None:
        super().__init__()
        self.vocab_size, self.pairs, self.wrong_every = vocab_size, pairs, wrong_every

    def forward(self, inputs):
        logits = torch.zeros(*inputs.shape, self.vocab_size)
        for b, row in enumerate(inputs.tolist()):
            table = dict(zip(row[0 : 2 * self.pairs : 2], row[1 : 2 * self.pairs : 2], strict=True))
            for t, token in enumerate(row):
                if t >= 2 * self.pairs and token in table:
                    answer = table[token]
                    if self.wrong_every and b % self.wrong_every == 0:
                        answer = (answer + 1) % self.vocab_size
                    logits[b, t, answer] = 1.0
        return SimpleNamespace(logits=logits)


def test_accuracy_counts_answers_at_query_positions():
    inputs, labels = make_examples(SPEC, 40, seed=4)
    assert accuracy(LookupModel(64, 6), inputs, labels, batch_size=7) == 1.0
    # rows 0, 4, 8, ... answered wrong: 10 of 40 rows
    assert accuracy(LookupModel(64, 6, wrong_every=4), inputs, labels) == pytest.approx(0.75)
    grid = accuracy_grid(LookupModel(64, 6), 64, [64], [6], n_examples=8, seed=0)
    assert grid == [{"seq_len": 64, "n_kv_pairs": 6, "accuracy": 1.0}]


def test_data_module_batches_resume_and_errors():
    data = DataConfig.model_validate(
        {"source": {"format": "mqar"}, "seq_len": 32,
         "mqar": {"vocab_size": 64, "kv_pairs": [2, 4], "train_examples": 20, "val_examples": 6}}
    )  # fmt: skip
    module = MQARDataModule(data, seed=0, micro_batch_size=4, grad_accum=1)
    module.prepare()
    assert module.stats["train_examples"] == 40 and module.stats["val_examples"] == 12
    assert module.stats["unigram_val_loss"] == pytest.approx(math.log(32))
    loader = iter(module.train_dataloader())
    batches = [next(loader) for _ in range(12)]
    inputs, labels = batches[0]
    assert inputs.shape == labels.shape == (4, 32)
    module.trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=5)
    resumed = iter(module.train_dataloader())
    for expected in batches[5:]:
        got = next(resumed)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    val = list(module.val_dataloader())
    assert sum(len(b[0]) for b in val) == 12

    bad = data.model_copy(update={"seq_len": 8})
    with pytest.raises(DataError, match=r"data\.mqar\.seq_len"):
        MQARDataModule(bad, seed=0, micro_batch_size=4, grad_accum=1).prepare()


def test_training_on_mqar_logs_accuracy(tmp_path):
    from hybrid.recipe import validate_recipe
    from hybrid.train.run import train
    from tests.train.runs import read_metrics

    recipe = validate_recipe(
        {
            "name": "mqar", "output_dir": str(tmp_path),
            "model": {"pattern": "*-", "d_model": 32, "attention": {"n_heads": 2}},
            "data": {"source": {"format": "mqar"}, "seq_len": 32,
                     "mqar": {"vocab_size": 64, "kv_pairs": [2], "train_examples": 64,
                              "val_examples": 16}},
            "trainer": {"max_steps": 4, "micro_batch_size": 8, "val_every": 2, "log_every": 1},
            "logging": {"wandb": False}, "eval": {"max_new_tokens": 0},
        }
    )  # fmt: skip
    result = train(recipe, progress_bar=False)
    assert result.steps == 4 and result.sample is None
    accuracies = [r["val/accuracy"] for r in read_metrics(recipe.run_dir) if "val/accuracy" in r]
    assert accuracies and all(0 <= a <= 1 for a in accuracies)
    assert result.unigram_val_loss == pytest.approx(math.log(32))


def test_hybrid_eval_mqar_writes_results_and_a_plot(tmp_path, capsys):
    import json

    from hybrid import HybridConfig, HybridLM
    from hybrid.checkpoint import save_pretrained
    from hybrid.cli import main

    torch.manual_seed(0)
    model = HybridLM(HybridConfig(pattern="*-", vocab_size=64, d_model=16,
                                  attention={"n_heads": 2}))  # fmt: skip
    save_pretrained(model, tmp_path / "model")
    code = main(["eval", "mqar", "--checkpoint", str(tmp_path / "model"), "--seq-lens", "32",
                 "--kv-pairs", "2", "4", "--examples", "8", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "eval" / "mqar"
    results = json.loads((out / "results.json").read_text())
    inputs, labels = make_examples(MQARSpec(64, 32, 4), 8, seed=0, stream=TEST_STREAM)
    expected = accuracy(model.eval(), inputs, labels)
    assert [r["n_kv_pairs"] for r in results["rows"]] == [2, 4]
    assert results["rows"][1]["accuracy"] == pytest.approx(expected)
    assert (out / "mqar_accuracy.png").stat().st_size > 0
    for bad, message in ((["--kv-pairs", "0"], "--kv-pairs"), (["--vocab-size", "999"], "--vocab")):
        code = main(["eval", "mqar", "--checkpoint", str(tmp_path / "model"), *bad])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
