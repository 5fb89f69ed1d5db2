"""Perplexity: chunked losses equal one full forward; lengths and buckets average them right."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybrid.eval import ppl
from hybrid.eval.inference import token_losses
from hybrid.tokenizer import ByteTokenizer

TEXT = "def scale(values, factor):\n    return [v * factor for v in values]\n" * 3


def direct_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """(batch, n + 1) ids -> (batch, n) losses from one forward without a cache."""
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


@pytest.mark.parametrize("chunk_size", [3, 64, 1000])
def test_chunked_losses_equal_the_unchunked_loss(tiny_model, chunk_size):
    ids = torch.tensor([ByteTokenizer().encode(TEXT[:90]), ByteTokenizer().encode(TEXT[5:95])])
    chunked = token_losses(tiny_model, ids, chunk_size=chunk_size)
    assert chunked.shape == (2, 89)
    torch.testing.assert_close(chunked, direct_losses(tiny_model, ids), rtol=1e-4, atol=1e-4)


def test_run_ppl_means_per_length_and_position(tmp_path, tiny_model):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT.upper())
    (tmp_path / "short.txt").write_text("tiny")
    results = ppl.run_ppl(
        tiny_model, ByteTokenizer(), train_length=16, multiples=[3, 1, 2], samples=5,
        data=[str(tmp_path / "*.txt")], bucket_size=10, chunk_size=5, batch_size=2,
    )  # fmt: skip
    assert sorted(d["path"] for d in results["documents"]) == [
        str(tmp_path / "a.txt"),
        str(tmp_path / "b.txt"),
    ]
    ids = torch.tensor([ByteTokenizer().encode(t)[:49] for t in (TEXT, TEXT.upper())])
    order = [results["documents"][i]["path"].endswith("b.txt") for i in range(2)]
    losses = direct_losses(tiny_model, ids).double()  # (2, 48)
    assert [r["length"] for r in results["rows"]] == [16, 32, 48]
    for row in results["rows"]:
        expected = losses[:, : row["length"]].mean()
        assert row["mean_loss"] == pytest.approx(float(expected), rel=1e-4)
        assert row["perplexity"] == pytest.approx(math.exp(row["mean_loss"]))
        assert row["tokens"] == 2 * row["length"]
        per_document = losses[:, : row["length"]].mean(1).tolist()
        if order[0]:
            per_document.reverse()
        assert row["document_losses"] == pytest.approx(per_document, rel=1e-4)
    starts = [b["start"] for b in results["positions"]]
    assert starts == [0, 10, 20, 30, 40] and results["positions"][-1]["end"] == 48
    for bucket in results["positions"]:
        expected = losses[:, bucket["start"] : bucket["end"]].mean()
        assert bucket["mean_loss"] == pytest.approx(float(expected), rel=1e-4)


def test_documents_are_a_seeded_choice_of_long_enough_files(tmp_path):
    for index in range(6):
        (tmp_path / f"{index}.py").write_text(f"# file {index}\n" + "x = 1\n" * (index * 10))
    files = ppl.find_files([str(tmp_path / "*.py")])
    assert len(files) == 6
    pick = [p for p, _ in ppl.select_documents(ByteTokenizer(), files, 40, 3, seed=1)]
    assert pick == [p for p, _ in ppl.select_documents(ByteTokenizer(), files, 40, 3, seed=1)]
    assert all(p.stat().st_size >= 40 for p in pick) and len(pick) == 3
    assert tmp_path / "0.py" not in pick
    seeds = {tuple(p for p, _ in ppl.select_documents(ByteTokenizer(), files, 40, 3, s))
             for s in range(6)}  # fmt: skip
    assert len(seeds) > 1


def test_default_data_is_the_standard_library_without_site_packages():
    files = ppl.find_files()
    assert len(files) > 100 and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts for p in files)


def test_no_long_enough_document_is_one_line(tmp_path, tiny_model):
    (tmp_path / "a.txt").write_text("short text")
    with pytest.raises(ValueError, match=r"none of the 1 files .* has 129 tokens"):
        ppl.run_ppl(tiny_model, ByteTokenizer(), 16, data=[str(tmp_path / "*.txt")])
    with pytest.raises(ValueError, match="data: no file matches"):
        ppl.run_ppl(tiny_model, ByteTokenizer(), 16, data=[str(tmp_path / "*.md")])
