"""Multi-head latent attention (``latent_attention``, L) against a float64 MLA written out here,
its latent-cache (absorbed) path against its no-cache (expanded) path, transformers'
KimiLinearAttention and DeepseekV3Attention, its option checks, and a whole model decoding."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from layers.base import TokenContext
from layers.latent_attention import LatentAttention, LatentKVCache
from tests.hf_testing import randomize

D_MODEL = 64
# Four heads of 8 + 4 query / key channels and 6 value channels over a latent of 16.
SMALL = {"n_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
         "v_head_dim": 6}  # fmt: skip
CPU = torch.device("cpu")
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


def make_config(**options) -> HybridConfig:
    """The one place the tests name the block family: a ``L-L-`` model whose latent-attention
    sublayers have ``SMALL`` updated with ``options``."""
    return HybridConfig(
        pattern="L-L-",
        d_model=D_MODEL,
        vocab_size=101,
        latent_attention={**SMALL, **options},
    )


def make_block(seed: int = 0, **options) -> LatentAttention:
    """A float64 block with weights where every term matters (norms away from 1, biases)."""
    block = LatentAttention(D_MODEL, make_config(**options).layer_options[0], 0)
    return randomize(block, seed).double()


def inputs(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, D_MODEL, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------ the float64 reference


def rotate_half_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x (b, l, heads, d) at positions 0..l-1: channels i and i + d/2 rotated by the angle
    pos * theta^(-2i/d)."""
    length, dim = x.shape[1], x.shape[-1]
    freqs = torch.tensor([theta ** (-2 * i / dim) for i in range(dim // 2)], dtype=x.dtype)
    angles = torch.arange(length, dtype=x.dtype)[:, None] * freqs  # (l, d/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[None, :, None]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[None, :, None]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference(block: LatentAttention, x: torch.Tensor) -> torch.Tensor:
    """MLA with plain matmuls from the block's weights, one head at a time: explicit causal
    (windowed) softmax of ``scale * q.k`` over keys ``[k_nope_h ; k_rot]``, values ``v_h``."""
    opts = block.options
    p = dict(block.named_parameters())
    heads, nope, rope = opts.n_heads, opts.qk_nope_head_dim, opts.qk_rope_head_dim
    rank, dv = opts.kv_lora_rank, opts.v_head_dim
    batch, length, _ = x.shape

    def linear(t, name):
        out = t @ p[f"{name}.weight"].T
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    def rms(t, weight):
        return t / torch.sqrt(t.square().mean(-1, keepdim=True) + opts.norm_eps) * weight

    if opts.q_lora_rank is None:
        q = linear(x, "q_proj")
    else:
        q = linear(rms(linear(x, "q_a_proj"), p["q_a_layernorm.weight"]), "q_b_proj")
    q = q.view(batch, length, heads, nope + rope)
    q_nope, q_rot = q[..., :nope], q[..., nope:]
    compressed = linear(x, "kv_a_proj_with_mqa")
    latent = rms(compressed[..., :rank], p["kv_a_layernorm.weight"])
    k_rot = compressed[..., rank:]  # (b, l, rope), one head for all
    kv = linear(latent, "kv_b_proj").view(batch, length, heads, nope + dv)
    if opts.position == "rope":
        q_rot = rotate_half_rope(q_rot, opts.rope_theta)
        k_rot = rotate_half_rope(k_rot[:, :, None], opts.rope_theta)[:, :, 0]
    scale = opts.softmax_scale if opts.softmax_scale is not None else (nope + rope) ** -0.5
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = j <= i
    if opts.window is not None:
        visible &= j > i - opts.window
    out = torch.zeros(batch, length, heads, dv, dtype=x.dtype)
    for h in range(heads):
        queries = torch.cat([q_nope[:, :, h], q_rot[:, :, h]], -1)  # (b, l, nope + rope)
        keys = torch.cat([kv[:, :, h, :nope], k_rot], -1)
        scores = (queries @ keys.transpose(1, 2)) * scale  # (b, l, l)
        scores = scores.masked_fill(~visible, -math.inf)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        out[:, :, h] = weights @ kv[:, :, h, nope:]
    return linear(out.reshape(batch, length, heads * dv), "o_proj")


CASES = [
    {},
    {"q_lora_rank": 12},
    {"position": "none"},
    {"position": "none", "q_lora_rank": 12, "qk_rope_head_dim": 0},
    {"window": 3, "rope_theta": 500.0},
    {"attention_bias": True, "q_lora_rank": 12},
    {"softmax_scale": 0.2, "norm_eps": 1e-3, "v_head_dim": 10},
]


@pytest.mark.parametrize("options", CASES)
def test_forward_matches_the_float64_reference(options):
    block = make_block(**options)
    x = inputs(2, 11)
    torch.testing.assert_close(block(x), reference(block, x), **TOL64)


# --------------------------------------------------------- the latent cache (absorbed form)


def positions(start: int, n: int, batch: int) -> torch.Tensor:
    return torch.arange(start, start + n).expand(batch, -1)


def run_cached(block, x, sizes, capacity, static=False):
    """``x`` fed through one cache in chunks of ``sizes``; with ``static``, one-token chunks
    take the static-shape decode path (``context.static_start``)."""
    batch = x.shape[0]
    cache = block.allocate_cache(batch, capacity, x.dtype, CPU)
    outputs, start = [], 0
    for size in sizes:
        where = positions(start, size, batch)
        if static and size == 1:
            context = TokenContext(-1, where, static_start=torch.tensor(start), decoding=True)
        else:
            context = TokenContext(start, where)
        outputs.append(block(x[:, start : start + size], cache=cache, context=context))
        start += size
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize("options", [{}, {"q_lora_rank": 12}, {"position": "none"}, {"window": 3}])
@pytest.mark.parametrize(
    "sizes,static",
    [([13], False), ([5, 4, 1, 1, 1, 1], False), ([6, *[1] * 7], True), ([1] * 13, False)],
)
def test_cached_path_equals_the_forward(options, sizes, static):
    """One prefill, chunks then decode steps, and static decode steps over the latent cache
    (capacity 16: a window of 3 runs as a ring) give the no-cache forward."""
    block = make_block(**options)
    x = inputs(2, 13)
    got, cache = run_cached(block, x, sizes, capacity=16, static=static)
    torch.testing.assert_close(got, block(x), **TOL64)
    assert isinstance(cache, LatentKVCache) and cache.window == options.get("window")
    rank, rope = SMALL["kv_lora_rank"], SMALL["qk_rope_head_dim"]
    assert cache.keys.shape[1:] == (1, 3 if "window" in options else 16, rank + rope)
    assert cache.values.shape[-1] == rank  # the latent only, not n_heads keys and values


def left_padding(length: int, lengths: list[int]) -> torch.Tensor:
    """(rows, length) bool: True on the last ``lengths[row]`` tokens of each row."""
    valid = torch.zeros(len(lengths), length, dtype=torch.bool)
    for row, n in enumerate(lengths):
        valid[row, length - n :] = True
    return valid


@pytest.mark.parametrize("options", [{}, {"window": 4, "q_lora_rank": 12}])
@pytest.mark.parametrize("static", [False, True])
def test_left_padding_equals_each_row_alone(options, static):
    """Left-padded rows, without a cache and with a chunked prefill then decode steps, give
    each row run alone; padding rows stay finite."""
    block = make_block(**options)
    lengths = [11, 4, 1]
    x, valid = inputs(3, 11), left_padding(11, lengths)  # random vectors at the pads too
    where = (valid.long().cumsum(1) - 1).clamp(min=0)  # real tokens before each, as the model
    steps = inputs(3, 3, seed=1)
    batched = block(x, context=TokenContext(0, where, valid=valid))
    cache = block.allocate_cache(3, 14, torch.float64, CPU)
    chunks = []
    for lo, hi in ((0, 5), (5, 11)):
        context = TokenContext(lo, where[:, lo:hi], valid=valid[:, lo:hi])
        chunks.append(block(x[:, lo:hi], cache=cache, context=context))
    decoded = []
    for i in range(steps.shape[1]):
        step_positions = torch.tensor(lengths)[:, None] + i
        start = 11 + i
        context = (
            TokenContext(-1, step_positions, static_start=torch.tensor(start), decoding=True)
            if static
            else TokenContext(start, step_positions)
        )
        decoded.append(block(steps[:, i : i + 1], cache=cache, context=context))
    chunked, decoded = torch.cat(chunks, dim=1), torch.cat(decoded, dim=1)
    assert torch.isfinite(batched).all() and torch.isfinite(chunked).all()
    for row, n in enumerate(lengths):
        alone = block(torch.cat([x[row, 11 - n :], steps[row]])[None])[0]
        torch.testing.assert_close(batched[row, 11 - n :], alone[:n], **TOL64)
        torch.testing.assert_close(chunked[row, 11 - n :], alone[:n], **TOL64)
        torch.testing.assert_close(decoded[row], alone[n:], **TOL64)


@pytest.mark.parametrize("options", [{}, {"window": 3, "position": "none"}])
def test_packed_documents_equal_each_document_alone(options):
    block = make_block(**options)
    x = inputs(2, 13)
    starts = [[4, 5], [9]]  # document starts; a one-token document in the first row
    seq_idx = torch.zeros(2, 13, dtype=torch.long)
    for row, cuts in enumerate(starts):
        for cut in cuts:
            seq_idx[row, cut:] += 1
    index = torch.arange(13).expand(2, -1)
    first = torch.where(seq_idx != seq_idx.roll(1, 1), index, 0)
    first[:, 0] = 0
    where = index - first.cummax(1).values  # positions restart at every document
    got = block(x, context=TokenContext(0, where, seq_idx=seq_idx))
    for row, cuts in enumerate(starts):
        bounds = [0, *cuts, 13]
        for lo, hi in itertools.pairwise(bounds):
            torch.testing.assert_close(got[row, lo:hi], block(x[row : row + 1, lo:hi])[0], **TOL64)


@pytest.mark.parametrize("window", [None, 4])
def test_fill_random_sets_the_slots_a_prefill_would(window):
    """LatentKVCache.fill_random (decode benchmarks) leaves the slots a real prefill leaves,
    each value the latent part of its key."""
    block = make_block(window=window)
    filled, fed = (block.allocate_cache(2, 12, torch.float64, CPU) for _ in "ab")
    filled.fill_random(7, torch.Generator().manual_seed(0))
    block(inputs(2, 7), cache=fed, context=TokenContext(0, positions(0, 7, 2)))
    assert torch.equal(filled.key_index, fed.key_index) and torch.equal(filled.valid, fed.valid)
    kept = filled.key_index >= 0
    assert torch.equal(filled.keys.ne(0).any(-1).any(1), kept)
    assert torch.equal(filled.values, filled.keys[..., : SMALL["kv_lora_rank"]])


def views_survive_replacements(entry, shares) -> None:
    """A copy, a batch selection (of 3 rows) and a rollback keep ``shares(entry)`` true."""
    saved = entry.copy()
    assert shares(saved) and saved.keys.data_ptr() != entry.keys.data_ptr()
    entry.select(torch.tensor([2, 0]))
    assert shares(entry) and entry.keys.shape[0] == 2
    entry.rollback(saved)
    assert shares(entry)
    for name, tensor in saved.tensors().items():
        assert torch.equal(entry.tensors()[name], tensor), name


def test_the_latent_is_stored_once():
    """The values are the keys' latent part, one storage, through every way an entry's
    tensors get replaced; the entry's bytes are what inference_state_bytes counts."""
    from hybrid.inference.cache import CachePrecision, with_precision

    block = make_block()
    cache = block.allocate_cache(3, 12, torch.float64, CPU)
    rank = SMALL["kv_lora_rank"]

    def shares(entry: LatentKVCache) -> bool:
        return (
            entry.values.data_ptr() == entry.keys.data_ptr()
            and entry.values.shape[-1] == rank
            and torch.equal(entry.values, entry.keys[..., :rank])
        )

    block(inputs(3, 7), cache=cache, context=TokenContext(0, positions(0, 7, 3)))
    assert shares(cache) and cache.values.abs().sum() > 0
    assert set(cache.tensors()) == {"keys", "key_index", "valid"}
    per_sequence = block.inference_state_bytes(D_MODEL, block.options, 12, torch.float64)
    assert cache.nbytes == 3 * per_sequence
    views_survive_replacements(cache, shares)
    low = with_precision(cache, CachePrecision(kv_dtype=torch.float32))
    assert shares(low) and low.values.dtype == torch.float32


# ---------------------------------------------------------------------------- transformers

TOL32 = {"rtol": 1e-5, "atol": 1e-5}
HF_SHAPES = dict(
    hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, num_hidden_layers=2,
)  # fmt: skip


def causal_mask(length: int) -> torch.Tensor:
    """Additive (1, 1, L, L) causal mask, as eager attention takes it."""
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


def copied_block(theirs: torch.nn.Module, **options) -> LatentAttention:
    """Our float32 block with transformers' weights: the parameter names are the same."""
    ours = LatentAttention(D_MODEL, make_config(**options).layer_options[0], 0)
    ours.load_state_dict(theirs.state_dict())  # strict: every name on both sides
    return ours.eval()


@pytest.mark.parametrize("q_lora_rank,bias", [(None, False), (12, True)])
def test_kimi_linear_attention(q_lora_rank, bias):
    modeling_kimi_linear = pytest.importorskip(
        "transformers.models.kimi_linear.modeling_kimi_linear"
    )
    config = modeling_kimi_linear.KimiLinearConfig(
        **HF_SHAPES, q_lora_rank=q_lora_rank, attention_bias=bias
    )
    config._attn_implementation = "eager"
    theirs = randomize(modeling_kimi_linear.KimiLinearAttention(config, layer_idx=0), seed=3)
    ours = copied_block(theirs, position="none", q_lora_rank=q_lora_rank, attention_bias=bias)
    x = inputs(2, 13).float()
    expected, _ = theirs(x, attention_mask=causal_mask(13))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, **TOL32)
        cached, _ = run_cached(ours, x, [5, 1, 6, 1], capacity=14)
        torch.testing.assert_close(cached, expected, **TOL32)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
        "mscale": 0.9, "mscale_all_dim": 0.7}  # fmt: skip


@pytest.mark.parametrize("scaling", [None, YARN])
def test_deepseek_v3_attention(scaling):
    """RoPE'd MLA (rope_interleave false), YaRN's mscale_all_dim folded into the scale."""
    modeling_deepseek_v3 = pytest.importorskip(
        "transformers.models.deepseek_v3.modeling_deepseek_v3"
    )
    rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    if scaling is not None:
        rope_parameters = {**rope_parameters, **scaling}
    config = modeling_deepseek_v3.DeepseekV3Config(
        **HF_SHAPES, q_lora_rank=12, attention_bias=True, rope_interleave=False,
        rope_parameters=rope_parameters, max_position_embeddings=32,
    )  # fmt: skip
    config._attn_implementation = "eager"
    theirs = randomize(modeling_deepseek_v3.DeepseekV3Attention(config, layer_idx=0), seed=4)
    ours = copied_block(theirs, q_lora_rank=12, attention_bias=True, rope_theta=500.0,
                        rope_scaling=scaling)  # fmt: skip
    x = inputs(2, 13).float()
    rotary = modeling_deepseek_v3.DeepseekV3RotaryEmbedding(config)
    cos_sin = rotary(x, torch.arange(13)[None])
    expected, _ = theirs(x, position_embeddings=cos_sin, attention_mask=causal_mask(13))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, **TOL32)
        cached, _ = run_cached(ours, x, [6, *[1] * 7], capacity=13, static=True)
        torch.testing.assert_close(cached, expected, **TOL32)


# --------------------------------------------------------------------------------- options

LINEAR = {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize(
    "options,field,message",
    [
        ({"qk_rope_head_dim": 3}, "qk_rope_head_dim", "must be > 0 and even with position: rope"),
        ({"qk_rope_head_dim": 0}, "qk_rope_head_dim", "must be > 0 and even with position: rope"),
        ({"qk_rope_head_dim": -1, "position": "none"}, "qk_rope_head_dim", "integer >= 0"),
        ({"kv_lora_rank": 0}, "kv_lora_rank", "must be a positive integer"),
        ({"q_lora_rank": -4}, "q_lora_rank", "must be a positive integer"),
        ({"qk_nope_head_dim": 0}, "qk_nope_head_dim", "must be a positive integer"),
        ({"v_head_dim": 0}, "v_head_dim", "must be a positive integer"),
        ({"n_heads": 0}, "n_heads", "must be a positive integer"),
        ({"n_heads": 3, "qk_nope_head_dim": None}, "n_heads", "must divide d_model=64"),
        ({"position": "alibi"}, "position", "must be one of rope, none"),
        ({"rope_theta": 0.0}, "rope_theta", "must be > 0"),
        ({"window": 0}, "window", "must be a positive integer"),
        ({"softmax_scale": -1.0}, "softmax_scale", "must be > 0 or null"),
        ({"norm_eps": 0.0}, "norm_eps", "must be > 0"),
        ({"attention_bias": 1}, "attention_bias", "must be true or false"),
        ({"position": "none", "rope_scaling": LINEAR}, "rope_scaling", "needs position: rope"),
        ({"rope_scaling": {"rope_type": "ntk"}}, "rope_scaling.rope_type", "must be one of"),
    ],
)
def test_bad_options_fail_with_one_line_naming_the_field(options, field, message):
    with pytest.raises(ValueError) as error:
        make_config(**options)
    text = str(error.value)
    assert text.startswith(f"latent_attention.{field}: ") and message in text, text
    assert "\n" not in text


def test_defaults_fit_a_tiny_model():
    """Every option left unset resolves for d_model 64 (one head of 64 + 32 channels over a
    latent of 32), and the block runs its cached path."""
    config = HybridConfig(pattern="L", d_model=64, vocab_size=11, latent_attention={})
    opts = config.layer_options[0]
    assert (opts.n_heads, opts.qk_nope_head_dim, opts.qk_rope_head_dim, opts.v_head_dim) == (
        1, 64, 32, 64,
    )  # fmt: skip
    assert (opts.kv_lora_rank, opts.q_lora_rank, opts.position) == (32, None, "rope")
    block = randomize(LatentAttention(64, opts, 0), seed=5).double()
    x = inputs(1, 6)
    got, _ = run_cached(block, x, [4, 1, 1], capacity=6)
    torch.testing.assert_close(got, block(x), **TOL64)


# ------------------------------------------------------------------------- the whole model


def test_model_forward_cached_decode_and_generate_agree():
    torch.manual_seed(0)
    model = HybridLM(make_config(q_lora_rank=12, window=6)).double().eval()
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2, 16)
        pieces = [model(ids[:, :5], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 8)]
        for t in range(8, 11):  # the static-shape step (compile / CUDA graphs)
            pieces.append(model.decode_step(ids[:, t : t + 1], cache, torch.tensor(t))[:, None])
            cache.advance(1, None)
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL64)

        generated = model.generate(ids[:, :4], 6)
        expected = ids[:, :4]
        for _ in range(6):  # greedy by full forwards, no cache
            next_token = model(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated, expected)


def test_cache_bytes_are_the_latents():
    config = make_config()
    model = HybridLM(config)
    cache = model.allocate_cache(1, 20, dtype=torch.bfloat16)
    for index in (0, 2):
        options = config.layer_options[index]
        expected = LatentAttention.inference_state_bytes(D_MODEL, options, 20, torch.bfloat16)
        assert cache.entries[index].nbytes == expected == 20 * ((16 + 4) * 2 + 9)  # latent once
    assert model.blocks[0].residual_weights() == [model.blocks[0].o_proj.weight]


def test_int8_and_bfloat16_latent_caches():
    """kv_dtype int8 (per-token scales; values narrower than keys) and bfloat16 hold the
    latent cache: decode stays close to the float forward."""
    torch.manual_seed(0)
    model = HybridLM(make_config()).eval()
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        full = model(ids).logits
        for kv_dtype in ("int8", "bfloat16"):
            cache = model.allocate_cache(1, 9, kv_dtype=kv_dtype)
            entry = cache.entries[0]
            assert entry.values.shape[-1] == 16 and entry.keys.shape[-1] == 16 + 4
            steps = [model(ids[:, :5], cache=cache).logits]
            steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 9)]
            error = (torch.cat(steps, 1) - full).norm() / full.norm()
            assert error < 0.05, (kv_dtype, error)


def test_the_int8_latent_is_stored_once(tmp_path):
    """kv_dtype int8: the codes and per-token scales of ``[c ; k_rot]`` are stored once; the
    values are the key codes' latent part and the value scales the key scales, through copies,
    selection, rollback and saving; every key is within half a step of the float cache's, and
    the values are exactly the latent part of the dequantized keys."""
    from hybrid.inference.cache_io import load_cache, save_cache
    from layers.kv_int8 import dequantize_per_token
    from layers.latent_attention import Int8LatentKVCache

    torch.manual_seed(0)
    model = HybridLM(make_config()).eval()
    rank, rope = SMALL["kv_lora_rank"], SMALL["qk_rope_head_dim"]
    ids = torch.randint(0, 101, (3, 9))

    def shares(entry: Int8LatentKVCache) -> bool:
        return (
            entry.values.data_ptr() == entry.keys.data_ptr()
            and entry.values.shape[-1] == rank
            and entry.value_scale is entry.key_scale
        )

    with torch.no_grad():
        exact = model.allocate_cache(3, 12, dtype=torch.float64)
        model.double()(ids, cache=exact)
        model.float()
        int8 = model.allocate_cache(3, 12, kv_dtype="int8")
        model(ids, cache=int8)
    entry, reference = int8.entries[0], exact.entries[0]
    assert isinstance(entry, Int8LatentKVCache) and shares(entry)
    assert entry.keys.dtype == torch.int8 and entry.keys.shape[-1] == rank + rope
    assert set(entry.tensors()) == {"keys", "key_index", "valid", "key_scale"}
    assert entry.nbytes == 3 * 12 * ((rank + rope) * 1 + 2 + 8 + 1)  # codes, scale, index, flag
    keys = dequantize_per_token(entry.keys, entry.key_scale, torch.float64)
    bound = entry.key_scale.double() / 2 * 1.002 + 1e-6
    filled = entry.valid[:, None, :, None]
    assert ((keys - reference.keys).abs() <= bound).logical_or(~filled).all()
    _, values = entry.read(None, torch.float64)
    assert torch.equal(values, keys[..., :rank])
    views_survive_replacements(entry, shares)
    save_cache(int8, tmp_path / "c.safetensors")
    loaded = load_cache(model, tmp_path / "c.safetensors").entries[0]
    assert isinstance(loaded, Int8LatentKVCache) and shares(loaded)
    assert torch.equal(loaded.keys, entry.keys) and torch.equal(loaded.key_scale, entry.key_scale)
