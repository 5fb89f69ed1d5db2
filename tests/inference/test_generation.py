"""Generation: greedy / sampled / streamed / beam search against plain references that run
the full forward without a cache; batched left-padded prompts; bad input."""

import itertools

import pytest
import torch

from hybrid import HybridConfig, HybridLM

CONFIG = {
    "vocab_size": 30,
    "d_model": 32,
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
    "mamba1": {"d_state": 4},
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "moe": {"n_experts": 4, "expert_hidden_size": 16},
}
PATTERN = ["M", {"block": "attention", "window": 6}, "S", "*", "E"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridLM(HybridConfig(PATTERN, **CONFIG)).eval()


def greedy_reference(model, prompt, steps):
    """Argmax of a full forward over the whole sequence, one token at a time."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq


def test_greedy_equals_full_forward_loop(model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    out = model.generate(torch.tensor([prompt]), 12)
    assert out[0].tolist() == greedy_reference(model, prompt, 12)


def test_batched_left_padded_prompts_equal_each_alone(model):
    prompts = [[7, 8, 9, 10, 11, 12, 13], [4], [20, 21, 22]]
    longest = max(map(len, prompts))
    ids = torch.zeros(3, longest, dtype=torch.long)
    mask = torch.zeros(3, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    out = model.generate(ids, 10, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        assert out[row, longest:].tolist() == greedy_reference(model, prompt, 10)[len(prompt) :]


def test_sampling_is_seeded_and_streaming_matches(model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    options = {
        "temperature": 0.9,
        "top_k": 10,
        "top_p": 0.95,
        "min_p": 0.01,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.1,
    }
    a = model.generate(ids, 15, seed=5, **options)
    b = model.generate(ids, 15, seed=5, **options)
    c = model.generate(ids, 15, seed=6, **options)
    assert torch.equal(a, b) and not torch.equal(a, c)
    from hybrid.inference.sampling import SamplingConfig

    streamed = list(model.stream(ids, 15, seed=5, sampling=SamplingConfig(**options)))
    assert torch.equal(torch.stack(streamed, 1), a[:, 3:])


def test_stop_tokens_stop_each_row(model):
    prompt = torch.tensor([[1, 2, 3], [9, 8, 7]])
    free = model.generate(prompt, 8)
    stop = int(free[0, 5])  # row 0's third new token
    out = model.generate(prompt, 8, stop_token_ids=[stop], pad_token_id=29)
    first = out[0, 3:].tolist()
    cut = first.index(stop)
    assert first[: cut + 1] == free[0, 3 : 3 + cut + 1].tolist()
    assert all(t == 29 for t in first[cut + 1 :])
    row1 = out[1, 3:].tolist()
    if stop not in row1:
        assert row1 == free[1, 3 : 3 + len(row1)].tolist()
    single = model.generate(prompt[:1], 8, stop_token_ids=[stop])
    assert single.shape[1] == 3 + cut + 1  # ends as soon as every row stopped


def beam_reference(model, prompt, steps, beams, stop=(), pad=0):
    """Beam search by brute force: score every (beam, token) extension with a full forward."""
    live = [(0.0, list(prompt), False)]
    for _ in range(steps):
        candidates = []
        for score, seq, done in live:
            if done:
                candidates.append((score, [*seq, pad], True))
                continue
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1], -1)
            for token in range(logprobs.shape[0]):
                candidates.append((score + float(logprobs[token]), [*seq, token], token in stop))
        live = sorted(candidates, key=lambda c: -c[0])[:beams]
    return live[0][1]


@pytest.mark.parametrize("beams", [2, 3])
def test_beam_search_equals_brute_force_beams(model, beams):
    prompts = [[5, 6, 7], [11, 3, 2]]
    out = model.generate(torch.tensor(prompts), 4, num_beams=beams, stop_token_ids=[4])
    for row, prompt in enumerate(prompts):
        assert out[row].tolist() == beam_reference(model, prompt, 4, beams, stop={4})


def test_wide_beam_finds_the_most_likely_continuation():
    torch.manual_seed(1)
    config = HybridConfig(
        "M*S",
        vocab_size=3,
        d_model=16,
        mamba2={"d_state": 4, "headdim": 8},
        attention={"n_heads": 2},
    )
    tiny = HybridLM(config).eval()
    prompt = [0, 2, 1]
    best, best_score = None, float("-inf")
    with torch.no_grad():
        for continuation in itertools.product(range(3), repeat=3):
            seq = prompt + list(continuation)
            logprobs = torch.log_softmax(tiny(torch.tensor([seq])).logits[0], -1)
            score = sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(continuation))
            if score > best_score:
                best, best_score = seq, score
    assert tiny.generate(torch.tensor([prompt]), 3, num_beams=27)[0].tolist() == best


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "input_ids"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"num_beams": 0}, "num_beams"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_seqlen": 5}, "max_seqlen"),
        ({"num_beams": 2, "temperature": 0.7}, "num_beams"),
    ],
)
def test_bad_generation_arguments(model, kwargs, field):
    args = {"input_ids": torch.tensor([[1, 2, 3]]), "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError) as error:
        model.generate(args.pop("input_ids"), args.pop("max_new_tokens"), **args)
    assert str(error.value).startswith(field)


def test_compiled_decode_step_gives_the_same_tokens():
    torch.manual_seed(3)
    config = HybridConfig(["M", {"block": "attention", "window": 4}, "S", "*"], **CONFIG)
    model = HybridLM(config).eval()
    prompt = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    eager = model.generate(prompt, 8)
    assert torch.equal(model.generate(prompt, 8, compile=True), eager)


def test_pad_token_id_must_be_in_the_vocabulary(model):
    with pytest.raises(ValueError, match=r"^pad_token_id: must be in \[0, 30\)"):
        model.generate(torch.tensor([[1, 2]]), 3, pad_token_id=30)


@pytest.mark.parametrize("batch", [1, 2, 3])  # MoE: per-token experts up to top_k rows, then sorted
def test_eager_and_static_decode_steps_give_the_full_forward_logits(model, batch):
    """Logits of both decode-step forms (int position: one-token paths over the filled cache;
    tensor position: static shapes) against a full forward, after a left-padded prompt."""
    torch.manual_seed(batch)
    steps, prompt_length = 9, 5
    ids = torch.randint(0, 30, (batch, prompt_length + steps))
    mask = torch.ones(batch, prompt_length, dtype=torch.long)
    mask[0, :2] = 0  # row 0 has two pads
    with torch.no_grad():
        for form in ("eager", "static"):
            cache = model.allocate_cache(batch, prompt_length + steps)
            model(ids[:, :prompt_length], cache=cache, attention_mask=mask)
            for t in range(prompt_length, prompt_length + steps):
                position = cache.length if form == "eager" else torch.tensor(cache.length)
                logits = model.decode_step(ids[:, t : t + 1], cache, position)
                cache.advance(1, None)
                for row in range(batch):
                    start = 2 if row == 0 else 0  # the row alone, without its pads
                    full = model(ids[row : row + 1, start : t + 1]).logits[0, -1]
                    torch.testing.assert_close(logits[row], full, rtol=1e-4, atol=1e-5)


def test_compiling_is_announced_once_with_its_cost(model, monkeypatch, capsys):
    import hybrid.model

    monkeypatch.setattr(hybrid.model, "_announced", False)
    model.__dict__.pop("_compiled_decode_steps", None)
    model.compiled_decode_step()
    model.compiled_decode_step("max-autotune-no-cudagraphs")  # a second compile, said already
    err = capsys.readouterr().err
    assert err.count("compiling the decode step with torch.compile") == 1
    assert " s " in err and "first" in err  # the expected wait is stated
    model.__dict__.pop("_compiled_decode_steps", None)
