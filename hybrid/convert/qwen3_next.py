"""transformers ``qwen3_next`` (Qwen3NextForCausalLM) <-> HybridLM.

A Qwen3-Next decoder layer is a mixer sublayer (``input_layernorm``) then a feed-forward
sublayer (``post_attention_layernorm``). The mixer is our ``gated_deltanet`` where
``layer_types[i]`` is ``"linear_attention"`` and gated attention where it is
``"full_attention"``: GQA with per-head q / k RMSNorms, an output gate (sigmoid, one per channel
of every head) and RoPE on a share of each head (``partial_rotary_factor``, 0.25 unless the
config says otherwise). The feed-forward is a MoE where ``num_experts > 0``, the layer is not in
``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0`` (a softmax top-k router,
``norm_topk_prob``, SwiGLU experts of ``moe_intermediate_size``, and one SwiGLU shared expert of
``shared_expert_intermediate_size`` scaled per token by ``sigmoid(shared_expert_gate(x))``: our
``moe.shared_gate``), else a SwiGLU MLP of ``intermediate_size``. ``D-D-D-*E`` reads: three
linear-attention layers with dense MLPs, then full attention with a MoE.

Tensors that are not plain renames: Qwen3-Next's RMSNorms (pre-norms, q / k norms, final norm)
multiply by ``1 + weight`` (:class:`~hybrid.convert.mapping.ZeroCentred`; the Gated DeltaNet's
gated output norm does not); its attention ``q_proj`` holds the queries and the output gate
interleaved per head (our ``q_proj`` and ``gate_proj``); its ``in_proj_qkvz`` / ``in_proj_ba``
group their rows per key head (our one ``in_proj``). Weights are written as ``save_pretrained``
writes them (one tensor per expert projection); transformers' in-memory packed
``experts.gate_up_proj`` / ``experts.down_proj`` are read too.

Read and written: sizes, ``layer_types`` (or, without it, ``full_attention_interval``: every
n-th layer is full attention), heads / key-value heads / ``head_dim``, ``attention_bias`` (q
with its gate, k, v and o), ``rope_parameters`` (``rope_theta``, ``partial_rotary_factor``,
read at the top level too, and the RoPE types ``linear``, ``dynamic``, ``yarn``, ``llama3`` as
``attention.rope_scaling``), ``linear_num_key_heads`` / ``linear_num_value_heads`` /
``linear_key_head_dim`` / ``linear_value_head_dim`` / ``linear_conv_kernel_dim``,
``num_experts`` / ``num_experts_per_tok`` / ``moe_intermediate_size`` /
``shared_expert_intermediate_size`` / ``norm_topk_prob``, ``decoder_sparse_step`` /
``mlp_only_layers`` (written as a step of 1 and the list of dense layers),
``intermediate_size``, ``router_aux_loss_coef`` (our ``aux_loss_weight``), ``rms_norm_eps``
(every norm: the pre-norms, the q / k norms, the gated output norm, the final norm),
``tie_word_embeddings``. Refused: ``hidden_act`` other than silu (it is the MLP and expert gate
and the Gated DeltaNet conv activation), layer types other than the two, a ``layer_types`` whose
length is not ``num_hidden_layers``, a ``full_attention_interval`` or ``decoder_sparse_step``
below 1, a ``partial_rotary_factor`` that rotates an odd number of channels, an empty expert or
shared expert, other RoPE types, quantized checkpoints. Ignored: the multi-token-prediction
weights (``mtp.*``, as transformers ignores them), ``output_router_logits``,
``attention_dropout``, ``use_cache``, ``max_position_embeddings`` (except for ``dynamic``
RoPE), token ids, ``initializer_range`` (kept as ``init_std``).

The Gated DeltaNet's chunk length is ours alone (:data:`CHUNK_SIZE`: speed, not the result).
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import (
    ATTENTION,
    EXPERTS,
    MLP,
    gated_deltanet_in_proj_from_hf,
    gated_deltanet_in_proj_to_hf,
    gated_query_from_hf,
    gated_query_to_hf,
    rope_to_hf,
    same_names,
    unpacked_gate_up,
)
from hybrid.convert.common import take, unsupported
from hybrid.convert.hf_config import (
    cannot_express,
    checked_layer_types,
    common_from_hf,
    common_to_hf,
    family_options,
    get,
    mixer_feedforward_pairs,
    reject_quantized,
    require_expressible,
    require_options,
    require_value,
    rope_with_scaling_from_hf,
    written_options,
)
from hybrid.convert.mapping import NameMap, ZeroCentred, model_table, nest

MODEL_TYPE = "qwen3_next"

# What this converter writes beyond the plain model (hybrid.convert.to_hf checks the rest).
EXPRESSES = frozenset({"attention.qk_norm", "attention.output_gate", "moe.shared_gate"})

# Our gated_deltanet chunk length (transformers and fla use 64 too; it changes speed only).
CHUNK_SIZE = 64

# transformers' Qwen3NextConfig defaults, for keys a config.json may leave out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "partial_rotary_factor": 0.25,
    "full_attention_interval": 4,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "num_experts_per_tok": 10,
    "num_experts": 512,
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.001,
}
SILU = ("silu", "swish")
LINEAR, FULL = "linear_attention", "full_attention"  # the layer types transformers runs
MIXERS = {"gated_deltanet": LINEAR, "attention": FULL}  # our mixer -> Qwen3-Next's layer type

# A Qwen3-Next decoder layer is two of our sublayers: a mixer (2 i), then a feed-forward (2 i + 1).
LAYER = "model.layers.{}."
TENSORS = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": ZeroCentred("model.norm.weight"),
    "lm_head.weight": "lm_head.weight",
}
MIXER_NORM = {"sublayers.{}.norm.weight": ZeroCentred(LAYER + "input_layernorm.weight")}
FEEDFORWARD_NORM = {
    "sublayers.{}.norm.weight": ZeroCentred(LAYER + "post_attention_layernorm.weight")
}
# q (the query half of their q_proj), k, v, o, the output gate (the other half of q_proj:
# :func:`unfused`), zero-centred q / k norms
GATED_ATTENTION = {
    **ATTENTION,
    **same_names("gate_proj.weight", "gate_proj.bias"),
    "q_norm.weight": ZeroCentred("q_norm.weight"),
    "k_norm.weight": ZeroCentred("k_norm.weight"),
}
# in_proj: their in_proj_qkvz and in_proj_ba, regrouped (:func:`unfused`)
GATED_DELTANET = same_names(
    "in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight"
)
SUBLAYERS = {
    "attention": MIXER_NORM | nest(GATED_ATTENTION, "sublayers.{}.block.", LAYER + "self_attn."),
    "gated_deltanet": MIXER_NORM
    | nest(GATED_DELTANET, "sublayers.{}.block.", LAYER + "linear_attn."),
    "mlp": FEEDFORWARD_NORM | nest(MLP, "sublayers.{}.block.ffn.", LAYER + "mlp."),
    "moe": FEEDFORWARD_NORM
    | {
        "sublayers.{}.block.router.weight": LAYER + "mlp.gate.weight",
        "sublayers.{}.block.shared_gate.weight": LAYER + "mlp.shared_expert_gate.weight",
    }
    | nest(EXPERTS, "sublayers.{}.block.", LAYER + "mlp.")
    | nest(MLP, "sublayers.{}.block.shared.", LAYER + "mlp.shared_expert."),
}


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> Qwen3-Next's for ``config``'s model (fused tensors split)."""
    table = model_table(TENSORS, SUBLAYERS, config, layer_of=lambda index: index // 2)
    return NameMap(table, config, MODEL_TYPE)


def value(hf: dict[str, Any], key: str) -> Any:
    """``hf[key]``, or Qwen3NextConfig's default when it is absent or null."""
    return get(hf, key, DEFAULTS)


def layer_types(hf: dict[str, Any]) -> list[str]:
    """Each layer's mixer type as Qwen3NextConfig resolves them (``layer_types``, or every
    ``full_attention_interval``-th layer full attention)."""
    n_layers = value(hf, "num_hidden_layers")
    types = hf.get("layer_types")
    if types is None:
        interval = value(hf, "full_attention_interval")
        if not isinstance(interval, int) or interval < 1:
            why = "a positive integer"
            raise unsupported(MODEL_TYPE, "full_attention_interval", interval, why)
        return [LINEAR if (i + 1) % interval else FULL for i in range(n_layers)]
    return checked_layer_types(types, n_layers, MODEL_TYPE, (LINEAR, FULL))


def moe_layers(hf: dict[str, Any]) -> list[bool]:
    """Whether each layer's feed-forward is the sparse MoE block, as Qwen3NextDecoderLayer
    decides it (else it is the dense MLP)."""
    step = value(hf, "decoder_sparse_step")
    if not isinstance(step, int) or step < 1:
        raise unsupported(MODEL_TYPE, "decoder_sparse_step", step, "a positive integer")
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list):
        raise unsupported(MODEL_TYPE, "mlp_only_layers", dense, "a list of layer indices")
    n_experts = value(hf, "num_experts")
    return [
        i not in dense and n_experts > 0 and (i + 1) % step == 0
        for i in range(value(hf, "num_hidden_layers"))
    ]


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers Qwen3-Next config (``config.json`` as a dict).

    Raises:
        ValueError: naming an option that changes the computation and that we cannot express.
    """
    reject_quantized(hf, MODEL_TYPE)
    if value(hf, "hidden_act") not in SILU:
        why = "silu only: it is the MLP and expert gate and the Gated DeltaNet conv activation"
        raise unsupported(MODEL_TYPE, "hidden_act", hf["hidden_act"], why)
    mixers, sparse = layer_types(hf), moe_layers(hf)
    theta, fraction, scaling = rope_with_scaling_from_hf(
        {**hf, "max_position_embeddings": hf.get("max_position_embeddings", 32768)},
        MODEL_TYPE,
        default_fraction=float(value(hf, "partial_rotary_factor")),
    )
    head_dim = value(hf, "head_dim")
    if FULL in mixers and int(head_dim * fraction) % 2:
        why = f"head_dim {head_dim} * partial_rotary_factor must be an even number of channels"
        raise unsupported(MODEL_TYPE, "partial_rotary_factor", fraction, why)
    common = common_from_hf(
        hf, vocab_default=DEFAULTS["vocab_size"], hidden_default=DEFAULTS["hidden_size"]
    )
    eps = float(value(hf, "rms_norm_eps"))
    bias = bool(value(hf, "attention_bias"))
    families: dict[str, Any] = {
        "attention": {
            "n_heads": value(hf, "num_attention_heads"),
            "n_kv_heads": value(hf, "num_key_value_heads"),
            "head_dim": head_dim,
            "qkv_bias": bias,
            "out_bias": bias,
            "qk_norm": True,
            "qk_norm_eps": eps,
            "output_gate": True,
            "rope_theta": theta,
            "rope_fraction": fraction,
            "rope_scaling": scaling,
        },
        "gated_deltanet": {
            "n_heads": value(hf, "linear_num_key_heads"),
            "n_v_heads": value(hf, "linear_num_value_heads"),
            "head_k_dim": value(hf, "linear_key_head_dim"),
            "head_v_dim": value(hf, "linear_value_head_dim"),
            "d_conv": value(hf, "linear_conv_kernel_dim"),
            "conv_bias": False,
            "output_gate": True,
            "chunk_size": CHUNK_SIZE,
            "norm_eps": eps,
        },
        "mlp": {"hidden_size": value(hf, "intermediate_size"), "activation": "swiglu"},
    }
    if any(sparse):
        for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            if not value(hf, key) > 0:
                why = "a positive width (an empty expert is not built)"
                raise unsupported(MODEL_TYPE, key, value(hf, key), why)
        families["moe"] = {
            "n_experts": value(hf, "num_experts"),
            "top_k": value(hf, "num_experts_per_tok"),
            "expert_hidden_size": value(hf, "moe_intermediate_size"),
            "activation": "swiglu",
            "n_shared_experts": 1,
            "shared_hidden_size": value(hf, "shared_expert_intermediate_size"),
            "shared_gate": True,
            "router": "softmax",
            "normalize_top_k": bool(value(hf, "norm_topk_prob")),
            "aux_loss_weight": value(hf, "router_aux_loss_coef"),
        }
    symbols = {LINEAR: "D", FULL: "*"}
    pairs = zip(mixers, sparse, strict=True)
    pattern = "".join(symbols[kind] + ("E" if moe else "-") for kind, moe in pairs)
    return HybridConfig(pattern=pattern, norm_eps=eps, **common, **families)


def unfused(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """``state`` with Qwen3-Next's fused tensors split into those :data:`SUBLAYERS` names:
    each full-attention layer's ``q_proj`` (weight, bias) into ``q_proj`` and ``gate_proj``,
    each linear-attention layer's ``in_proj_qkvz`` and ``in_proj_ba`` into one ``in_proj``."""
    state = dict(state)
    for index, (name, options) in enumerate(zip(config.layers, config.layer_options, strict=True)):
        prefix = LAYER.format(index // 2)
        if name == "attention":
            for kind in ("weight", "bias") if options.qkv_bias else ("weight",):
                query = f"{prefix}self_attn.q_proj.{kind}"
                gate = f"{prefix}self_attn.gate_proj.{kind}"
                state[query], state[gate] = gated_query_from_hf(take(state, query), options.n_heads)
        elif name == "gated_deltanet":
            qkvz = take(state, prefix + "linear_attn.in_proj_qkvz.weight")
            ba = take(state, prefix + "linear_attn.in_proj_ba.weight")
            in_proj = gated_deltanet_in_proj_from_hf(qkvz, ba, options)
            state[prefix + "linear_attn.in_proj.weight"] = in_proj
    return state


def fused(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`unfused`: Qwen3-Next's ``q_proj``, ``in_proj_qkvz`` and
    ``in_proj_ba``."""
    state = dict(state)
    for index, (name, options) in enumerate(zip(config.layers, config.layer_options, strict=True)):
        prefix = LAYER.format(index // 2)
        if name == "attention":
            for kind in ("weight", "bias") if options.qkv_bias else ("weight",):
                query = state.pop(f"{prefix}self_attn.q_proj.{kind}")
                gate = state.pop(f"{prefix}self_attn.gate_proj.{kind}")
                state[f"{prefix}self_attn.q_proj.{kind}"] = gated_query_to_hf(
                    query, gate, options.n_heads
                )
        elif name == "gated_deltanet":
            in_proj = state.pop(prefix + "linear_attn.in_proj.weight")
            qkvz, ba = gated_deltanet_in_proj_to_hf(in_proj, options)
            state[prefix + "linear_attn.in_proj_qkvz.weight"] = qkvz
            state[prefix + "linear_attn.in_proj_ba.weight"] = ba
    return state


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from a Qwen3-Next one (saved per-expert tensors or in-memory packed
    ones; the multi-token-prediction ``mtp.*`` tensors are dropped, as transformers does)."""
    state = {name: tensor for name, tensor in state.items() if not name.startswith("mtp.")}
    return name_map(config).from_hf(unfused(unpacked_gate_up(state), config))


def check_expressible(config: HybridConfig) -> None:
    """Raise ValueError naming the first option of ours that Qwen3-Next cannot hold (options
    of block families the pattern does not use are not checked)."""
    layers = config.layers
    if not mixer_feedforward_pairs(layers, MIXERS, ("mlp", "moe")):
        why = f"{MODEL_TYPE} layers are a mixer (D or *) then a feed-forward (- or E)"
        raise cannot_express(MODEL_TYPE, "pattern", config.pattern_string, why)
    used = set(layers)
    if "attention" in used:
        attention = family_options(config, "attention", MODEL_TYPE)
        require_options(
            MODEL_TYPE, "attention", attention,
            {"position": "rope", "window": None, "qk_norm": True, "output_gate": True,
             "out_bias": attention.qkv_bias},
            "Qwen3-Next's attention has RoPE, full causal attention, per-head q / k RMSNorms, "
            "an output gate and one attention_bias for q, k, v and o",
        )  # fmt: skip
        require_value(
            MODEL_TYPE, "attention.qk_norm_eps", attention.qk_norm_eps, config.norm_eps,
            "one rms_norm_eps for every norm, the q / k norms too",
        )  # fmt: skip
    if "gated_deltanet" in used:
        deltanet = family_options(config, "gated_deltanet", MODEL_TYPE)
        require_options(
            MODEL_TYPE, "gated_deltanet", deltanet, {"conv_bias": False, "output_gate": True},
            "Qwen3-Next's Gated DeltaNet has no conv bias and a gated output norm",
        )  # fmt: skip
        require_value(
            MODEL_TYPE, "gated_deltanet.norm_eps", deltanet.norm_eps, config.norm_eps,
            "one rms_norm_eps for every norm, the gated output norm too",
        )  # fmt: skip
    if "mlp" in used:
        mlp = family_options(config, "mlp", MODEL_TYPE)
        allowed = {"activation": "swiglu", "bias": False}
        require_options(MODEL_TYPE, "mlp", mlp, allowed, "Qwen3-Next's MLP is SwiGLU")
    if "moe" in used:
        moe = family_options(config, "moe", MODEL_TYPE)
        allowed = {
            "router": "softmax",
            "routed_scaling": 1.0,
            "score_correction_bias": False,
            "n_groups": 1,
            "activation": "swiglu",
            "bias": False,
            "shared_gate": True,
        }
        # shared_gate needs a shared expert: one of any width, as Qwen3-Next always has
        require_options(MODEL_TYPE, "moe", moe, allowed, "Qwen3-Next's MoE")


def attention_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The attention and RoPE keys: of the attention sublayers, or for a model without any the
    family's own options (unused by transformers, but they must be valid)."""
    attention = family_options(config, "attention", MODEL_TYPE)
    if attention is None:
        try:
            attention = written_options(config, "attention", MODEL_TYPE)
        except ValueError:  # family options that need a d_model they do not divide
            return {"num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8}
    fraction = attention.rope_fraction if attention.position == "rope" else 1.0
    return {
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads,
        "head_dim": attention.head_dim,
        "attention_bias": attention.qkv_bias,
        **rope_to_hf(attention, partial_rotary_factor=fraction),
    }


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """A transformers Qwen3-Next config (as a dict) for ``config``.

    Raises:
        ValueError: naming an option of ours that Qwen3-Next cannot express.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    check_expressible(config)
    mixers, feedforwards = config.layers[0::2], config.layers[1::2]
    deltanet = written_options(config, "gated_deltanet", MODEL_TYPE)
    mlp = written_options(config, "mlp", MODEL_TYPE)
    moe = written_options(config, "moe", MODEL_TYPE)
    hf = {
        **common_to_hf(config, MODEL_TYPE, "Qwen3NextForCausalLM"),
        **attention_to_hf(config),
        "num_hidden_layers": len(mixers),
        "layer_types": [MIXERS[name] for name in mixers],
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "intermediate_size": mlp.hidden_size,
        "linear_num_key_heads": deltanet.n_heads,
        "linear_num_value_heads": deltanet.n_v_heads,
        "linear_key_head_dim": deltanet.head_k_dim,
        "linear_value_head_dim": deltanet.head_v_dim,
        "linear_conv_kernel_dim": deltanet.d_conv,
        # every layer is a MoE but those listed (a step of 1 counts every layer)
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, name in enumerate(feedforwards) if name == "mlp"],
        "num_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_hidden_size,
        "shared_expert_intermediate_size": moe.shared_hidden_size or moe.expert_hidden_size,
        "norm_topk_prob": moe.normalize_top_k,
        "router_aux_loss_coef": moe.aux_loss_weight,
    }
    return hf


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A transformers Qwen3-Next state dict for our ``state`` (one tensor per expert
    projection, q_proj and the linear-attention in-projections fused as transformers has
    them)."""
    check_expressible(config)
    return fused(name_map(config).to_hf(state), config)
