"""Checks every converter test runs: a transformers model saved to disk, loaded with
``from_hf``, must match transformers' forward, cached decode and greedy generation, and
survive ``to_hf`` back into transformers."""

from __future__ import annotations

import torch

from hybrid.convert import from_hf, to_hf


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def forward_greedy(hf_model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by transformers' full forward over the whole sequence at every step (no
    cache): the reference for ours. transformers' cached ``generate`` is not trusted alone (for
    ``nemotron_h``, 5.23's departs from its own forward after a few tokens on tiny random
    models). Shapes: prompt (batch, length) -> (batch, length + new_tokens)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = hf_model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], 1)
    return ids


def check_parity(hf_model, tmp_path, lengths=(13, 21), new_tokens=8, tolerance=1e-4) -> None:
    """Run all parity checks for one tiny random-weight transformers model (float32, eval)."""
    hf_model = hf_model.float().eval()
    source = tmp_path / "hf"
    hf_model.save_pretrained(source)
    ours = from_hf(source)
    vocab = hf_model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        ids = torch.randint(0, vocab, (2, length), generator=generator)
        with torch.no_grad():
            theirs = hf_model(ids).logits
            mine = ours(ids).logits
            assert relative_error(mine, theirs) < tolerance, ("forward", length)
            # Cached: prefill part of the prompt, then one token at a time.
            cache = ours.allocate_cache(2, length)
            split = length // 2
            steps = [ours(ids[:, :split], cache=cache).logits]
            steps += [ours(ids[:, i : i + 1], cache=cache).logits for i in range(split, length)]
            assert relative_error(torch.cat(steps, 1), theirs) < tolerance, ("cached", length)
    prompt = torch.randint(0, vocab, (1, lengths[0]), generator=generator)
    expected = forward_greedy(hf_model, prompt, new_tokens)
    assert ours.generate(prompt, new_tokens).tolist() == expected.tolist(), "greedy generation"
    # Back to transformers.
    target = tmp_path / "back"
    to_hf(ours, target, hf_model.config.model_type)
    reloaded = type(hf_model).from_pretrained(target).float().eval()
    ids = torch.randint(0, vocab, (2, lengths[-1]), generator=generator)
    with torch.no_grad():
        assert relative_error(reloaded(ids).logits, hf_model(ids).logits) < tolerance, "to_hf"
