"""The unified inference cache: chunked prefill and decode equal the full forward, left
padding equals running each sequence alone, select, capacity, bytes."""

import random

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.accounting import describe

BASE = {
    "vocab_size": 40,
    "d_model": 32,
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8, "ngroups": 2},
    "mamba1": {"d_state": 4},
    "gated_deltanet": {
        "n_heads": 2,
        "n_v_heads": 4,
        "head_k_dim": 8,
        "head_v_dim": 4,
        "chunk_size": 8,
    },
    "kda": {"n_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 4, "chunk_size": 8},
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "latent_attention": {"n_heads": 2, "q_lora_rank": 12, "kv_lora_rank": 16},
    "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 16},
}
WINDOWED = {"block": "attention", "window": 5}


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def random_split(rng, length, first):
    """[first, then random chunk sizes (1 included) up to length]."""
    sizes = [first]
    while sum(sizes) < length:
        sizes.append(min(rng.choice([1, 1, 2, 3, 7, 8, 9, 17]), length - sum(sizes)))
    return sizes


def chunked_logits(model, ids, sizes, max_seqlen=None, attention_mask=None):
    cache = model.allocate_cache(ids.shape[0], max_seqlen or ids.shape[1])
    outputs, start = [], 0
    for size in sizes:
        mask = None if attention_mask is None else attention_mask[:, : start + size]
        outputs.append(model(ids[:, start : start + size], cache=cache, attention_mask=mask).logits)
        start += size
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize(
    "pattern",
    [
        "M", "S", "D", "K", "C", "*", "L", ["*", WINDOWED], "-E", "M-S*-E", "D-M*-E", "K-L-E",
        "C-C*-", "[LM]-",
        "[*M]-[SD]-", "[*K]-",
        ["M", WINDOWED, "S", "*", "E", "M"], "S-SES-SE*-SES-SE",
    ],
)  # fmt: skip
def test_chunked_prefill_and_decode_equal_full_forward(pattern):
    torch.manual_seed(0)
    rng = random.Random(str(pattern))
    model = HybridLM(HybridConfig(pattern, **BASE)).eval()
    for length in (1, 7, 8, 9, 25, 40):
        ids = torch.randint(0, 40, (2, length))
        with torch.no_grad():
            full = model(ids).logits
            for first in {1, length // 2 or 1, length}:
                got, cache = chunked_logits(model, ids, random_split(rng, length, first), 48)
                assert relative_error(got, full) < 1e-4, (length, first)
                assert cache.length == length and cache.real_lengths.tolist() == [length] * 2


def test_random_patterns_and_splits():
    rng = random.Random(7)
    for trial in range(12):
        symbols = [
            rng.choice(["M", "S", "D", "C", "*", "-", "E", WINDOWED])
            for _ in range(rng.randint(1, 5))
        ]
        torch.manual_seed(trial)
        model = HybridLM(HybridConfig(symbols, **BASE)).eval()
        length = rng.randint(1, 40)
        ids = torch.randint(0, 40, (rng.randint(1, 3), length))
        with torch.no_grad():
            full = model(ids).logits
            got, _ = chunked_logits(model, ids, random_split(rng, length, rng.randint(1, length)))
        assert relative_error(got, full) < 1e-4, symbols


def left_pad(sequences, pad_id=0):
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, longest - len(seq) :] = torch.tensor(seq)
        mask[row, longest - len(seq) :] = 1
    return ids, mask


@pytest.mark.parametrize(
    "pattern",
    [
        "M",
        "S",
        "D",
        "K",
        "C",
        "*",
        "L",
        ["*", WINDOWED],
        "M-S*-E",
        ["S", WINDOWED, "M", "D", "C"],
        "[*M]-",
    ],
)
def test_left_padded_batch_equals_each_sequence_alone(pattern):
    torch.manual_seed(1)
    model = HybridLM(HybridConfig(pattern, **BASE)).eval()
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 40, (n,), generator=gen).tolist() for n in (13, 4, 1, 9)]
    ids, mask = left_pad(sequences)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        chunked, _ = chunked_logits(model, ids, [5, 1, 7], attention_mask=mask)
        for row, seq in enumerate(sequences):
            alone = model(torch.tensor([seq])).logits[0]
            real = slice(ids.shape[1] - len(seq), None)
            assert relative_error(batched[row, real], alone) < 1e-4
            assert relative_error(chunked[row, real], alone) < 1e-4
            assert torch.isfinite(batched[row]).all()  # padding rows stay finite


def test_left_padded_prefill_then_decode_equals_alone():
    torch.manual_seed(2)
    model = HybridLM(HybridConfig("M-S*-E", **BASE)).eval()
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12]]
    continuation = torch.tensor([[3, 4, 5], [6, 7, 8]])
    ids, mask = left_pad(sequences)
    with torch.no_grad():
        cache = model.allocate_cache(2, 16)
        model(ids, cache=cache, attention_mask=mask)
        steps = [model(continuation[:, i : i + 1], cache=cache).logits for i in range(3)]
        decoded = torch.cat(steps, dim=1)
        for row, seq in enumerate(sequences):
            alone = model(torch.tensor([seq + continuation[row].tolist()])).logits[0, -3:]
            assert relative_error(decoded[row], alone) < 1e-4
    assert cache.real_lengths.tolist() == [9, 5] and cache.length == 9


def test_right_padding_is_refused():
    model = HybridLM(HybridConfig("M", **BASE))
    with pytest.raises(ValueError, match="only left padding"):
        model(torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))


def test_select_reorders_and_drops_rows():
    torch.manual_seed(3)
    model = HybridLM(HybridConfig(["M", WINDOWED, "S", "*"], **BASE)).eval()
    ids = torch.randint(0, 40, (3, 12))
    with torch.no_grad():
        cache = model.allocate_cache(3, 16)
        model(ids[:, :10], cache=cache)
        cache.select(torch.tensor([2, 0]))
        got = model(ids[[2, 0], 10:], cache=cache).logits
        expected = model(ids[[2, 0]]).logits[:, 10:]
    assert relative_error(got, expected) < 1e-4
    assert cache.batch_size == 2


def test_capacity_is_checked_before_any_work():
    model = HybridLM(HybridConfig("M*", **BASE))
    cache = model.allocate_cache(1, 8)
    model(torch.randint(0, 40, (1, 6)), cache=cache)
    before = [t.clone() for t in cache.entries[0].tensors().values()]
    with pytest.raises(ValueError, match="exceed the cache's max_seqlen=8"):
        model(torch.randint(0, 40, (1, 3)), cache=cache)
    assert cache.length == 6
    assert all(
        torch.equal(a, b) for a, b in zip(before, cache.entries[0].tensors().values(), strict=True)
    )
    with pytest.raises(ValueError, match="batch size 2 does not match"):
        model(torch.randint(0, 40, (2, 1)), cache=cache)


def test_cache_bytes_match_hybrid_info_and_windows_are_bounded():
    config = HybridConfig(["M", "S", "*", WINDOWED, "-", "E", "D", "K", "C", "L"], **BASE)
    model = HybridLM(config)
    for context in (3, 100):
        cache = model.allocate_cache(1, context, dtype=torch.bfloat16)
        info = describe(config, context, torch.bfloat16)
        assert cache.layer_nbytes() == [row.cache_bytes for row in info.rows]
        assert cache.nbytes == info.cache_bytes
    small, large = model.allocate_cache(1, 100), model.allocate_cache(1, 1000)
    assert small.layer_nbytes()[3] == large.layer_nbytes()[3]  # the ring holds `window` slots
    assert small.layer_nbytes()[2] * 10 == large.layer_nbytes()[2]
    ssm = model.allocate_cache(1, 10, dtype=torch.bfloat16).entries[0].ssm_state
    assert ssm.dtype == torch.float32


def test_state_stays_float32_under_bf16_autocast_decoding():
    torch.manual_seed(4)
    model = HybridLM(HybridConfig("M-S*D", **BASE)).eval()
    ids = torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(1, 12)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids[:, :6], cache=cache)
            steps = [model(ids[:, i : i + 1], cache=cache).logits for i in range(6, 12)]
    assert cache.entries[0].ssm_state.dtype == torch.float32
    assert cache.entries[-1].ssm_state.dtype == torch.float32
    assert relative_error(torch.cat(steps, 1).float(), full[:, 6:]) < 0.05


def test_a_narrower_cache_dtype_than_the_model():
    torch.manual_seed(5)
    model = HybridLM(HybridConfig(["M", "*", WINDOWED, "S", "D"], **BASE)).eval()
    ids = torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache16 = model.allocate_cache(1, 12, dtype=torch.bfloat16)
        low = torch.cat([model(ids[:, :7], cache=cache16).logits,
                         model(ids[:, 7:], cache=cache16).logits], 1)  # fmt: skip
    assert cache16.entries[1].keys.dtype == torch.bfloat16
    assert cache16.entries[0].conv_state.dtype == torch.bfloat16
    assert cache16.entries[0].ssm_state.dtype == torch.float32
    assert relative_error(low, full) < 0.02


def test_a_single_left_padded_row_equals_no_padding():
    # transformers once skipped padding handling at batch size 1.
    torch.manual_seed(6)
    model = HybridLM(HybridConfig("M-S*-E", **BASE)).eval()
    seq = [4, 8, 15, 16, 23, 42 % 40]
    ids, mask = left_pad([seq, [1] * 9])
    with torch.no_grad():
        padded = model(ids[:1], attention_mask=mask[:1]).logits[0, -len(seq) :]
        alone = model(torch.tensor([seq])).logits[0]
        out = model.generate(ids[:1], 5, attention_mask=mask[:1])
    assert relative_error(padded, alone) < 1e-4
    assert out[0, ids.shape[1] :].tolist() == model.generate(torch.tensor([seq]), 5)[0, 6:].tolist()


@pytest.mark.parametrize(
    "pattern",
    ["M-S*-E", ["M", WINDOWED, "S", "*"], [WINDOWED, "-"], "D-*-", "K-L-", "C-*-", "[*M]-"],
)
def test_static_decode_step_equals_the_dynamic_path(pattern):
    torch.manual_seed(7)
    model = HybridLM(HybridConfig(pattern, **BASE)).eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]])
    steps = torch.randint(0, 40, (2, 9))  # enough to wrap the window ring
    with torch.no_grad():
        dynamic, static = model.allocate_cache(2, 20), model.allocate_cache(2, 20)
        model(ids, cache=dynamic, attention_mask=mask)
        model(ids, cache=static, attention_mask=mask)
        for i in range(steps.shape[1]):
            expected = model(steps[:, i : i + 1], cache=dynamic).logits[:, -1]
            position = torch.tensor(static.length)
            got = model.decode_step(steps[:, i : i + 1], static, position)
            static.advance(1, None)
            assert relative_error(got, expected) < 1e-5, i
