"""Block families that several transformers model types share, as their checkpoints hold them.

Tensor-name tables (:mod:`hybrid.convert.mapping`) inside one block, our name -> theirs, for
the model converters to place in their layers with :func:`~hybrid.convert.mapping.nest`:
attention, the MLP, the Mamba-2 mixer (mamba2, bamba, nemotron_h), the Mamba-1 mixer (jamba,
mamba, falcon_mamba) and stacked experts (jamba, nemotron_h, qwen3_next). Tables name every
tensor a block can have; those a config does not build (biases, a gate) are skipped. And the
config keys of the families that are spelled alike across types: Llama's attention and gated
MLP (llama, bamba), the Mamba-2 mixer's sizes and dt limit; and the layouts of fused tensors
that several of our tensors share: packed gate/up experts (jamba, qwen3_next), Qwen3-Next's
gated query projection and its Gated DeltaNet in-projections.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.common import take, unsupported
from hybrid.convert.hf_config import require_value
from hybrid.convert.mapping import PerExpert, Table


def same_names(*names: str) -> Table:
    """A table of tensors named alike on both sides."""
    return {name: name for name in names}


# q, k, v, o projections, with their biases where the config has them
ATTENTION = same_names(
    *(f"{proj}.{kind}" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
      for kind in ("weight", "bias"))
)  # fmt: skip

# a gated MLP (Llama's) or an ungated one (Nemotron-H's: no gate_proj)
MLP = same_names(
    *(f"{proj}.{kind}" for proj in ("gate_proj", "up_proj", "down_proj")
      for kind in ("weight", "bias"))
)  # fmt: skip

# transformers' Mamba2Mixer, BambaMixer and NemotronHMamba2Mixer name their tensors as we do
MAMBA2_MIXER = same_names(
    "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
    "norm.weight", "out_proj.weight", "out_proj.bias",
)  # fmt: skip

# transformers' JambaMambaMixer, with its RMSNorms on dt, B and C, and MambaMixer /
# FalconMambaMixer (no norms / weight-free ones: only our tensors are mapped)
MAMBA1_MIXER = same_names(
    "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight",
    "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight", "out_proj.bias",
) | {
    "dt_norm.weight": "dt_layernorm.weight",
    "b_norm.weight": "b_layernorm.weight",
    "c_norm.weight": "c_layernorm.weight",
}  # fmt: skip

# our stacked (n_experts, out, in) expert weights; transformers writes one tensor per expert
EXPERTS: Table = {
    f"experts.{proj}": PerExpert(f"experts.{{expert}}.{proj}.weight", packed=f"experts.{proj}")
    for proj in ("gate_proj", "up_proj", "down_proj")
}


def unpacked_gate_up(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with transformers' in-memory ``experts.gate_up_proj`` (n_experts, 2 hidden,
    d_model; the gate's rows, then the up's) split into ``experts.gate_proj`` and
    ``experts.up_proj`` (the packed names :data:`EXPERTS` reads)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            gate, up = tensor.chunk(2, dim=1)
            out[prefix + "gate_proj"], out[prefix + "up_proj"] = gate.contiguous(), up.contiguous()
        else:
            out[name] = tensor
    return out


# the attention Jamba and Nemotron-H build: no positional encoding, no biases, whole prefix
NOPE_ATTENTION = {"position": "none", "window": None, "qkv_bias": False, "out_bias": False}

# ------------------------------------------------------------- Llama's attention and gated MLP

# transformers hidden_act of a gated MLP -> our mlp activation, and back
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu"}
HF_GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}

# Written as max_position_embeddings: plain RoPE works at any length; this only bounds what
# transformers pre-allocates for static caches.
MAX_POSITIONS = 131072


def rope_to_hf(attention: Any, **extra: Any) -> dict[str, Any]:
    """``rope_parameters`` (``rope_theta``, the keys of ``attention.rope_scaling``, ``extra``)
    and ``max_position_embeddings`` of resolved attention options: dynamic NTK scales from
    max_position_embeddings, so it is the original length there; plain RoPE runs at any
    length (:data:`MAX_POSITIONS`)."""
    scaling = attention.rope_scaling or {}
    original = "original_max_position_embeddings"
    dynamic = scaling.get("rope_type") == "dynamic"
    kept = {key: value for key, value in scaling.items() if not (dynamic and key == original)}
    parameters = {"rope_type": "default", **kept, "rope_theta": attention.rope_theta, **extra}
    return {
        "rope_parameters": parameters,
        "max_position_embeddings": scaling[original] if dynamic else MAX_POSITIONS,
    }


def mlp_from_hf(hf: dict[str, Any], model_type: str, intermediate_default: int) -> dict[str, Any]:
    """Our ``mlp`` options from a Llama-style gated MLP config."""
    act = hf.get("hidden_act", "silu")
    if act not in GATED_ACTIVATIONS:
        raise unsupported(model_type, "hidden_act", act, f"one of {', '.join(GATED_ACTIVATIONS)}")
    return {
        "hidden_size": hf.get("intermediate_size", intermediate_default),
        "activation": GATED_ACTIVATIONS[act],
        "bias": bool(hf.get("mlp_bias", False)),
    }


def mlp_to_hf(options: Any, model_type: str) -> dict[str, Any]:
    """The Llama-style MLP keys of resolved mlp options."""
    if options.activation not in HF_GATED_ACTIVATIONS:
        raise ValueError(
            f"{model_type}: cannot express mlp.activation={options.activation!r} "
            f"({model_type} has a gated MLP: {', '.join(HF_GATED_ACTIVATIONS)})"
        )
    return {
        "intermediate_size": options.hidden_size,
        "hidden_act": HF_GATED_ACTIVATIONS[options.activation],
        "mlp_bias": options.bias,
    }


def attention_from_hf(
    hf: dict[str, Any], *, heads_default: int, kv_default: int | None, d_model: int
) -> dict[str, Any]:
    """Our ``attention`` options (without RoPE) from a Llama-style attention config."""
    n_heads = hf.get("num_attention_heads", heads_default)
    n_kv_heads = hf.get("num_key_value_heads", kv_default) or n_heads
    bias = bool(hf.get("attention_bias", False))
    return {
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": hf.get("head_dim") or d_model // n_heads,
        "qkv_bias": bias,
        "out_bias": bias,
    }


def attention_to_hf(options: Any, model_type: str) -> dict[str, Any]:
    """The Llama-style attention keys of resolved attention options (no RoPE keys)."""
    require_value(
        model_type, "attention.position", options.position, "rope", "RoPE on every attention"
    )
    require_value(model_type, "attention.window", options.window, None, "full causal attention")
    require_value(
        model_type, "attention.out_bias", options.out_bias, options.qkv_bias,
        "one attention_bias for q, k, v and o",
    )  # fmt: skip
    return {
        "num_attention_heads": options.n_heads,
        "num_key_value_heads": options.n_kv_heads,
        "head_dim": options.head_dim,
        "attention_bias": options.qkv_bias,
    }


# ------------------------------------------------------------------------- the Mamba-2 mixer


def dt_limit_from_hf(value: Any) -> tuple[float, float]:
    """``time_step_limit`` as our ``dt_limit`` (None: no clamp)."""
    if value is None:
        return (0.0, math.inf)
    low, high = value
    return (float(low), float(high))


def mamba2_from_hf(
    model_type: str,
    d_model: int,
    *,
    n_heads: int,
    head_dim: int,
    expand: Any,
    hidden_act: str,
    **options: Any,
) -> dict[str, Any]:
    """Our ``mamba2`` options of a transformers Mamba-2 mixer whose width is ``expand *
    d_model`` (Mamba2, Bamba).

    ``options`` are our option names already mapped (d_state, ngroups, ...).
    """
    if hidden_act != "silu":
        raise unsupported(model_type, "hidden_act", hidden_act, "silu, the Mamba-2 conv activation")
    if n_heads * head_dim != expand * d_model:
        raise ValueError(
            f"{model_type}: heads {n_heads} * head_dim {head_dim} must equal expand {expand} * "
            f"hidden_size {d_model}"
        )
    return {"headdim": head_dim, "expand": expand, **options}


def mamba_prefixed_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Our ``mamba2`` options (all but sizes and eps) from the ``mamba_``-prefixed keys that
    Bamba, Granite 4 and Falcon-H1 share, with their common defaults."""
    return {
        "d_state": hf.get("mamba_d_state", 256),
        "ngroups": hf.get("mamba_n_groups", 1),
        "d_conv": hf.get("mamba_d_conv", 4),
        "chunk_size": hf.get("mamba_chunk_size", 256),
        "conv_bias": bool(hf.get("mamba_conv_bias", True)),
        "bias": bool(hf.get("mamba_proj_bias", False)),
        "dt_limit": dt_limit_from_hf(hf.get("time_step_limit", (0.0, math.inf))),
    }


def mamba_prefixed_to_hf(options: Any) -> dict[str, Any]:
    """Inverse of :func:`mamba_prefixed_from_hf` for resolved ``mamba2`` options."""
    return {
        "mamba_d_state": options.d_state,
        "mamba_n_groups": options.ngroups,
        "mamba_d_conv": options.d_conv,
        "mamba_chunk_size": options.chunk_size,
        "mamba_conv_bias": options.conv_bias,
        "mamba_proj_bias": options.bias,
        "time_step_limit": list(options.dt_limit),
    }


def mamba2_sizes_to_hf(options: Any, config: HybridConfig, model_type: str) -> dict[str, Any]:
    """Checked sizes of resolved ``mamba2`` options: ``{"expand": ..., "n_heads": ...}``.

    Raises:
        ValueError: the inner width is not a multiple of d_model (transformers' ``expand`` is an
            integer) or the gated norm's epsilon differs from the other norms'.
    """
    d_inner = options.d_inner(config.d_model)
    if d_inner % config.d_model:
        raise ValueError(
            f"{model_type}: cannot express a Mamba-2 inner width {d_inner} that is not a "
            f"multiple of d_model={config.d_model} ({model_type} has an integer expand)"
        )
    require_value(
        model_type, "mamba2.norm_eps", options.norm_eps, config.norm_eps,
        "one epsilon for all norms, the model's norm_eps",
    )  # fmt: skip
    return {"expand": d_inner // config.d_model, "n_heads": d_inner // options.headdim}


def gated_deltanet_in_proj_from_hf(
    qkvz: torch.Tensor, ba: torch.Tensor, options: Any
) -> torch.Tensor:
    """Our ``gated_deltanet`` ``in_proj.weight`` from Qwen3-Next's ``in_proj_qkvz`` and
    ``in_proj_ba`` weights, whose rows are grouped per key head: [q_i, k_i, v_i, z_i] and
    [b_i, a_i], with key head i's ``n_v_heads / n_heads`` value heads in v_i, z_i, b_i, a_i.
    Ours are [q | k | v | z | b | a], each in head order. Shapes: qkvz (2 * n_heads *
    head_k_dim + 2 * n_v_heads * head_v_dim, d_model), ba (2 * n_v_heads, d_model) -> the
    rows of both, reordered."""
    nk, dk, dv = options.n_heads, options.head_k_dim, options.head_v_dim
    per_head = options.n_v_heads // nk
    q, k, v, z = qkvz.view(nk, -1, qkvz.shape[-1]).split([dk, dk, per_head * dv, per_head * dv], 1)
    b, a = ba.view(nk, 2 * per_head, ba.shape[-1]).split([per_head, per_head], 1)
    return torch.cat([t.flatten(0, 1) for t in (q, k, v, z, b, a)])


def gated_deltanet_in_proj_to_hf(
    in_proj: torch.Tensor, options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`gated_deltanet_in_proj_from_hf`: (in_proj_qkvz, in_proj_ba)."""
    nk, dk, dv, nv = options.n_heads, options.head_k_dim, options.head_v_dim, options.n_v_heads
    per_head = nv // nk
    hidden = in_proj.shape[-1]
    q, k, v, z, b, a = in_proj.split([nk * dk, nk * dk, nv * dv, nv * dv, nv, nv])
    grouped = [t.reshape(nk, -1, hidden) for t in (q, k, v, z)]
    qkvz = torch.cat(grouped, 1).flatten(0, 1)
    ba = torch.cat([b.reshape(nk, per_head, hidden), a.reshape(nk, per_head, hidden)], 1)
    return qkvz, ba.flatten(0, 1)


# ------------------------------------------------------------ Qwen3-Next's gated attention


def gated_query_from_hf(q_proj: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our attention's ``q_proj`` and ``gate_proj`` (weights or biases) from Qwen3-Next's
    ``q_proj``, whose rows are grouped per head: [query_h, gate_h], head_dim rows each.
    Shapes: (n_heads * 2 * head_dim, ...) -> two of (n_heads * head_dim, ...)."""
    query, gate = q_proj.view(n_heads, 2, -1, *q_proj.shape[1:]).unbind(1)
    return query.flatten(0, 1), gate.flatten(0, 1)


def gated_query_to_hf(query: torch.Tensor, gate: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`gated_query_from_hf`: Qwen3-Next's interleaved ``q_proj``."""
    per_head = [t.view(n_heads, -1, *t.shape[1:]) for t in (query, gate)]
    return torch.stack(per_head, 1).flatten(0, 2)


# The delta-rule checkpoints' (OLMo hybrid's, Kimi Linear's) separate convs over q, k and v:
# our one conv1d over [q, k, v].
SPLIT_QKV_CONVS = ("q_conv1d", "k_conv1d", "v_conv1d")


def stack_projections(
    state: dict[str, torch.Tensor], prefix: str, parts: tuple[str, ...], stacked: str
) -> None:
    """Replace ``{prefix}{part}.weight`` of every part by their rows stacked, in order, as
    ``{prefix}{stacked}.weight`` (a fused projection of ours)."""
    weights = [take(state, f"{prefix}{part}.weight") for part in parts]
    state[f"{prefix}{stacked}.weight"] = torch.cat(weights, 0)


def split_projection(
    state: dict[str, torch.Tensor], prefix: str, stacked: str, parts: tuple[str, ...],
    sizes: list[int],
) -> None:  # fmt: skip
    """Inverse of :func:`stack_projections`: ``{prefix}{stacked}.weight`` split into
    ``sizes`` rows, one ``{prefix}{part}.weight`` each."""
    weights = state.pop(f"{prefix}{stacked}.weight").split(sizes, 0)
    for part, weight in zip(parts, weights, strict=True):
        state[f"{prefix}{part}.weight"] = weight.contiguous()
