"""transformers ``kimi_linear`` (KimiLinearForCausalLM) <-> HybridLM.

A Kimi Linear decoder layer is a mixer sublayer (``input_layernorm``) then a feed-forward
sublayer (``post_attention_layernorm``). The mixer is our ``kda`` (Kimi Delta Attention) where
``layer_types[i]`` is ``"linear_attention"`` and our ``latent_attention`` (DeepSeek's
multi-head latent attention, without any positional encoding: Kimi Linear's full-attention
layers are NoPE, the shared ``qk_rope_head_dim`` part of the keys included) where it is
``"full_attention"``. The feed-forward is a SwiGLU MLP of ``intermediate_size`` where
``mlp_layer_types[i]`` is ``"dense"`` and DeepSeek-V3's MoE where it is ``"sparse"``: a sigmoid
router with a score-correction bias used for choosing only, group-limited top-k
(``n_group`` / ``topk_group``), ``norm_topk_prob``, ``routed_scaling_factor``, SwiGLU experts
of ``moe_intermediate_size`` and ``n_shared_experts`` shared ones (one SwiGLU of
``n_shared_experts * moe_intermediate_size``). ``K-LEKE`` reads: a KDA layer with a dense MLP,
then latent attention with a MoE, then KDA with a MoE.

Names: ``save_pretrained`` writes the original checkpoints' names, which transformers' conversion
mapping renames on load (:data:`CHECKPOINT_NAMES`): ``block_sparse_moe`` for every layer's
``mlp``, the forget gate's ``f_a_proj`` / ``f_b_proj`` / ``dt_bias`` / ``A_log`` directly under
``self_attn`` (``A_log`` shaped (1, 1, heads, 1)), the conv split in ``q_conv1d`` / ``k_conv1d``
/ ``v_conv1d``, experts as ``experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down). Both those and
transformers' in-memory names are read; the checkpoint names are written. KDA's q / k / v / b /
f_a / g_a projections are our one ``in_proj``, rows in that order.

Read and written: sizes, ``layer_types`` (or the original ``linear_attn_config``'s 1-indexed
``full_attn_layers`` / ``kda_layers``, or transformers' default), ``mlp_layer_types`` (or
``first_k_dense_replace``), heads, ``q_lora_rank`` / ``kv_lora_rank`` / ``qk_nope_head_dim``
/ ``qk_rope_head_dim`` / ``v_head_dim``, ``attention_bias`` (q_a / kv_a / o; q_proj and kv_b
have none), ``linear_num_heads`` / ``linear_head_dim`` / ``linear_conv_kernel_dim`` (or the
``linear_attn_config`` keys), the MoE keys above (under their attribute names or the aliases
``save_pretrained`` writes: ``num_experts``, ``num_experts_per_token``, ``moe_renormalize``,
``num_expert_group``, ``num_shared_experts``), ``rms_norm_eps`` (the layer norms, KDA's gated
output norm, the final norm; the latent norms are 1e-6 whatever it says: :data:`LATENT_NORM_EPS`),
Refused: ``hidden_act`` other than silu (the MLP and expert gates and
the KDA conv), ``num_key_value_heads`` other than ``num_attention_heads`` (transformers'
latent attention expands keys per head and cannot group them), layer or MLP types other
than the two each, lists whose length is not ``num_hidden_layers``, ``n_shared_experts`` of 0,
quantized checkpoints. Ignored: ``output_router_logits``, ``attention_dropout``,
``use_cache``, ``model_max_length``, ``pretraining_tp``, token ids, ``initializer_range`` (kept
as ``init_std``).

transformers never ties Kimi Linear's LM head to the embedding, whatever
``tie_word_embeddings`` says (its ``_tied_weights_keys`` is empty), so the head is always read
from and written to the checkpoint, and a tied model of ours is written with the embedding
copied into it.

KDA's chunk length is ours alone (:data:`CHUNK_SIZE`: speed, not the result).
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import (
    EXPERTS,
    MLP,
    SPLIT_QKV_CONVS,
    same_names,
    split_projection,
    stack_projections,
    unpacked_gate_up,
)
from hybrid.convert.common import renamed, renamed_name, take, unsupported
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
    written_options,
)
from hybrid.convert.mapping import NameMap, model_table, nest

MODEL_TYPE = "kimi_linear"

# What this converter writes beyond the plain model (hybrid.convert.to_hf checks the rest).
EXPRESSES = frozenset()

# Our kda chunk length (speed only; transformers and fla use 64).
CHUNK_SIZE = 64
# KimiLinearAttention's q_a_layernorm and kv_a_layernorm: RMSNorm's default eps, always.
LATENT_NORM_EPS = 1e-6

# transformers' KimiLinearConfig defaults, for keys a config.json may leave out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 163840,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "moe_intermediate_size": 1024,
    "num_hidden_layers": 27,
    "num_attention_heads": 32,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.446,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "num_local_experts": 256,
    "linear_head_dim": 128,
    "linear_num_heads": 32,
    "linear_conv_kernel_dim": 4,
}
# KimiLinearConfig.attribute_map: the names save_pretrained writes for some of those keys.
ALIASES = {
    "norm_topk_prob": "moe_renormalize",
    "n_group": "num_expert_group",
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_token",
    "n_shared_experts": "num_shared_experts",
}
# The original checkpoints' linear_attn_config keys, for ours.
LINEAR_ATTN_CONFIG = {
    "linear_head_dim": "head_dim",
    "linear_num_heads": "num_heads",
    "linear_conv_kernel_dim": "short_conv_kernel_size",
}
SILU = ("silu", "swish")
LINEAR, FULL = "linear_attention", "full_attention"
MIXERS = {"kda": LINEAR, "latent_attention": FULL}  # our mixer -> Kimi Linear's layer type
DENSE, SPARSE = "dense", "sparse"
FEEDFORWARDS = {"mlp": DENSE, "moe": SPARSE}

# A Kimi Linear layer is two of our sublayers: a mixer (2 i), then a feed-forward (2 i + 1).
LAYER = "model.layers.{}."
TENSORS = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
MIXER_NORM = {"sublayers.{}.norm.weight": LAYER + "input_layernorm.weight"}
FEEDFORWARD_NORM = {"sublayers.{}.norm.weight": LAYER + "post_attention_layernorm.weight"}
# in_proj: their q / k / v / b / f_a / g_a projections stacked (:func:`unfused`)
KDA = same_names("in_proj.weight", "conv1d.weight", "g_b_proj.weight") | {
    "f_b_proj.weight": "forget_gate.f_b_proj.weight",
    "dt_bias": "forget_gate.dt_bias",
    "A_log": "forget_gate.A_log",
    "norm.weight": "o_norm.weight",
    "out_proj.weight": "o_proj.weight",
}
LATENT_ATTENTION = same_names(
    "q_proj.weight", "q_a_proj.weight", "q_a_proj.bias", "q_a_layernorm.weight",
    "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias",
    "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight", "o_proj.bias",
)  # fmt: skip
SUBLAYERS = {
    "kda": MIXER_NORM | nest(KDA, "sublayers.{}.block.", LAYER + "self_attn."),
    "latent_attention": MIXER_NORM
    | nest(LATENT_ATTENTION, "sublayers.{}.block.", LAYER + "self_attn."),
    "mlp": FEEDFORWARD_NORM | nest(MLP, "sublayers.{}.block.ffn.", LAYER + "mlp."),
    "moe": FEEDFORWARD_NORM
    | {
        "sublayers.{}.block.router.weight": LAYER + "mlp.gate.weight",
        "sublayers.{}.block.score_bias": LAYER + "mlp.gate.e_score_correction_bias",
    }
    | nest(EXPERTS, "sublayers.{}.block.", LAYER + "mlp.")
    | nest(MLP, "sublayers.{}.block.shared.", LAYER + "mlp.shared_experts."),
}
KDA_IN_PROJ = ("q_proj", "k_proj", "v_proj", "b_proj", "forget_gate.f_a_proj", "g_a_proj")
FORGET_GATE = ("f_a_proj.", "f_b_proj.", "dt_bias", "A_log")  # under self_attn in checkpoints
EXPERT_PROJECTIONS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> Kimi Linear's in-memory ones for ``config``'s model."""
    table = model_table(TENSORS, SUBLAYERS, config, layer_of=lambda index: index // 2)
    return NameMap(table, config, MODEL_TYPE)


def value(hf: dict[str, Any], key: str) -> Any:
    """``hf[key]`` (or its alias, or its ``linear_attn_config`` key), else KimiLinearConfig's
    default."""
    if hf.get(key) is None and hf.get(ALIASES.get(key, "")) is not None:
        return hf[ALIASES[key]]
    linear = hf.get("linear_attn_config") or {}
    if hf.get(key) is None and linear.get(LINEAR_ATTN_CONFIG.get(key, "")) is not None:
        return linear[LINEAR_ATTN_CONFIG[key]]
    return get(hf, key, DEFAULTS)


def layer_types(hf: dict[str, Any]) -> list[str]:
    """Each layer's mixer type as KimiLinearConfig resolves them."""
    n_layers = value(hf, "num_hidden_layers")
    types = hf.get("layer_types")
    linear = hf.get("linear_attn_config") or {}
    if types is None and "full_attn_layers" in linear and "kda_layers" in linear:
        types = [None] * n_layers
        for kind, key in ((FULL, "full_attn_layers"), (LINEAR, "kda_layers")):
            for layer in linear[key]:  # 1-indexed
                if not (isinstance(layer, int) and 1 <= layer <= n_layers):
                    why = f"1-indexed layers in [1, {n_layers}]"
                    raise unsupported(MODEL_TYPE, f"linear_attn_config.{key}", layer, why)
                types[layer - 1] = kind
    elif types is None:
        types = [FULL if i and i % 4 == 0 else LINEAR for i in range(n_layers)]
    return checked_layer_types(types, n_layers, MODEL_TYPE, (LINEAR, FULL))


def mlp_layer_types(hf: dict[str, Any]) -> list[str]:
    """Each layer's feed-forward type (``dense`` or ``sparse``) as KimiLinearConfig resolves
    them (``mlp_layer_types``, or the first ``first_k_dense_replace`` layers dense)."""
    n_layers = value(hf, "num_hidden_layers")
    types = hf.get("mlp_layer_types")
    if types is None:
        first = hf.get("first_k_dense_replace", 1)
        types = [DENSE if i < first else SPARSE for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers:
        why = f"a list of {n_layers} entries (num_hidden_layers)"
        raise unsupported(MODEL_TYPE, "mlp_layer_types", types, why)
    for kind in types:
        if kind not in (DENSE, SPARSE):
            raise unsupported(MODEL_TYPE, "mlp_layer_types", kind, "dense or sparse")
    return types


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers Kimi Linear config (``config.json`` as a dict).

    Raises:
        ValueError: naming an option that changes the computation and that we cannot express.
    """
    reject_quantized(hf, MODEL_TYPE)
    if value(hf, "hidden_act") not in SILU:
        why = "silu only: it is the MLP and expert gate and the KDA conv activation"
        raise unsupported(MODEL_TYPE, "hidden_act", hf["hidden_act"], why)
    heads = value(hf, "num_attention_heads")
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        why = f"= num_attention_heads ({heads}): the latent attention expands keys per head"
        raise unsupported(MODEL_TYPE, "num_key_value_heads", kv_heads, why)
    mixers, feedforwards = layer_types(hf), mlp_layer_types(hf)
    eps = float(value(hf, "rms_norm_eps"))
    head_dim = value(hf, "linear_head_dim")
    families: dict[str, Any] = {
        "kda": {
            "n_heads": value(hf, "linear_num_heads"),
            "head_k_dim": head_dim,
            "d_conv": value(hf, "linear_conv_kernel_dim"),
            "conv_bias": False,
            "output_gate": True,
            "decay_rank": head_dim,
            "gate_rank": head_dim,
            "chunk_size": CHUNK_SIZE,
            "norm_eps": eps,
        },
        "latent_attention": {
            "n_heads": heads,
            "q_lora_rank": value(hf, "q_lora_rank"),
            "kv_lora_rank": value(hf, "kv_lora_rank"),
            "qk_nope_head_dim": value(hf, "qk_nope_head_dim"),
            "qk_rope_head_dim": value(hf, "qk_rope_head_dim"),
            "v_head_dim": value(hf, "v_head_dim"),
            "position": "none",
            "attention_bias": bool(value(hf, "attention_bias")),
            "norm_eps": LATENT_NORM_EPS,
        },
        "mlp": {"hidden_size": value(hf, "intermediate_size"), "activation": "swiglu"},
    }
    if SPARSE in feedforwards:
        shared = value(hf, "n_shared_experts")
        if not (isinstance(shared, int) and shared > 0):
            why = "a positive count (an empty shared expert is not built)"
            raise unsupported(MODEL_TYPE, "n_shared_experts", shared, why)
        families["moe"] = {
            "n_experts": value(hf, "num_local_experts"),
            "top_k": value(hf, "num_experts_per_tok"),
            "expert_hidden_size": value(hf, "moe_intermediate_size"),
            "activation": "swiglu",
            "n_shared_experts": shared,
            "shared_hidden_size": shared * value(hf, "moe_intermediate_size"),
            "router": "sigmoid",
            "normalize_top_k": bool(value(hf, "norm_topk_prob")),
            "routed_scaling": float(value(hf, "routed_scaling_factor")),
            "score_correction_bias": True,
            "n_groups": value(hf, "n_group"),
            "topk_groups": value(hf, "topk_group"),
        }
    common = common_from_hf(
        hf, vocab_default=DEFAULTS["vocab_size"], hidden_default=DEFAULTS["hidden_size"]
    )
    symbols = {LINEAR: "K", FULL: "L", DENSE: "-", SPARSE: "E"}
    pattern = "".join(symbols[m] + symbols[f] for m, f in zip(mixers, feedforwards, strict=True))
    common["tie_embeddings"] = False  # transformers does not tie them either
    return HybridConfig(pattern=pattern, norm_eps=eps, **common, **families)


# The checkpoints' names (which transformers' save_pretrained writes and its conversion
# mapping renames on load) for the in-memory names our tables use, as (theirs, checkpoint).
CHECKPOINT_NAMES = [(".mlp.", ".block_sparse_moe.")] + [
    (f".self_attn.forget_gate.{name}", f".self_attn.{name}") for name in FORGET_GATE
]


def expert_names(state: dict[str, torch.Tensor], to_checkpoint: bool) -> dict:
    """``state`` with per-expert tensors named ``w1`` / ``w3`` / ``w2`` (the checkpoints',
    ``to_checkpoint``) or ``gate_proj`` / ``up_proj`` / ``down_proj`` (what :data:`EXPERTS`
    reads); the shared experts keep their names."""
    names = [(f".{ours}.", f".{theirs}.") for ours, theirs in EXPERT_PROJECTIONS.items()]
    if not to_checkpoint:
        names = [(theirs, ours) for ours, theirs in names]
    return {
        renamed_name(name, names) if ".experts." in name else name: tensor
        for name, tensor in state.items()
    }


def unfused(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """``state`` in the in-memory names our tables read (checkpoint names renamed, packed
    ``gate_up_proj`` experts split) with each KDA layer's six input projections stacked into
    one ``in_proj``, its split conv joined and its ``A_log`` flat."""
    state = renamed(state, [(new, old) for old, new in CHECKPOINT_NAMES])
    state = expert_names(unpacked_gate_up(state), to_checkpoint=False)
    for index, name in enumerate(config.layers):
        if name == "kda":
            prefix = LAYER.format(index // 2) + "self_attn."
            stack_projections(state, prefix, KDA_IN_PROJ, "in_proj")
            if prefix + "conv1d.weight" not in state:
                stack_projections(state, prefix, SPLIT_QKV_CONVS, "conv1d")
            a_log = prefix + "forget_gate.A_log"
            state[a_log] = take(state, a_log).flatten()
    return state


def fused(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`unfused`, in the checkpoints' names (as ``save_pretrained`` writes
    them)."""
    state = dict(state)
    for index, (name, options) in enumerate(zip(config.layers, config.layer_options, strict=True)):
        if name == "kda":
            prefix = LAYER.format(index // 2) + "self_attn."
            key_width, value_width = options.widths()
            sizes = [key_width, key_width, value_width, options.n_v_heads, options.decay_rank,
                     options.gate_rank]  # fmt: skip
            split_projection(state, prefix, "in_proj", KDA_IN_PROJ, sizes)
            split_projection(state, prefix, "conv1d", SPLIT_QKV_CONVS, sizes[:3])
            a_log = prefix + "forget_gate.A_log"
            state[a_log] = state[a_log].view(1, 1, -1, 1)
    return renamed(expert_names(state, to_checkpoint=True), CHECKPOINT_NAMES)


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from a Kimi Linear one (the checkpoints' names or transformers'
    in-memory ones)."""
    return name_map(config).from_hf(unfused(state, config))


def check_expressible(config: HybridConfig) -> None:
    """Raise ValueError naming the first option of ours that Kimi Linear cannot hold (options
    of block families the pattern does not use are not checked)."""
    layers = config.layers
    if not mixer_feedforward_pairs(layers, MIXERS, tuple(FEEDFORWARDS)):
        why = f"{MODEL_TYPE} layers are a mixer (K or L) then a feed-forward (- or E)"
        raise cannot_express(MODEL_TYPE, "pattern", config.pattern_string, why)
    used = set(layers)
    if "kda" in used:
        kda = family_options(config, "kda", MODEL_TYPE)
        require_options(
            MODEL_TYPE, "kda", kda,
            {"conv_bias": False, "output_gate": True, "allow_neg_eigval": False,
             "n_v_heads": kda.n_heads, "head_v_dim": kda.head_k_dim,
             "decay_rank": kda.head_k_dim, "gate_rank": kda.head_k_dim},
            "Kimi Linear's KDA has no conv bias, a gated output norm, beta = sigmoid(b), "
            "one width for keys, values and both low-rank projections, one value head per key "
            "head",
        )  # fmt: skip
        require_value(
            MODEL_TYPE, "kda.norm_eps", kda.norm_eps, config.norm_eps,
            "one rms_norm_eps for the layer norms and the gated output norm",
        )  # fmt: skip
    if "latent_attention" in used:
        latent = family_options(config, "latent_attention", MODEL_TYPE)
        require_options(
            MODEL_TYPE, "latent_attention", latent,
            {"position": "none", "window": None, "softmax_scale": None,
             "norm_eps": LATENT_NORM_EPS},
            "Kimi Linear's latent attention has no positional encoding, full causal attention, "
            "the default scale and latent norms of eps 1e-6",
        )  # fmt: skip
    if "mlp" in used:
        mlp = family_options(config, "mlp", MODEL_TYPE)
        allowed = {"activation": "swiglu", "bias": False}
        require_options(MODEL_TYPE, "mlp", mlp, allowed, "Kimi Linear's MLP is SwiGLU")
    if "moe" in used:
        moe = family_options(config, "moe", MODEL_TYPE)
        require_value(
            MODEL_TYPE, "moe.n_shared_experts", moe.n_shared_experts >= 1, True,
            "Kimi Linear's MoE has at least one shared expert",
        )  # fmt: skip
        allowed = {
            "router": "sigmoid",
            "score_correction_bias": True,
            "activation": "swiglu",
            "bias": False,
            "shared_gate": False,
            "shared_hidden_size": moe.n_shared_experts * moe.expert_hidden_size,
        }
        require_options(MODEL_TYPE, "moe", moe, allowed, "Kimi Linear's MoE is DeepSeek-V3's")


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """A transformers Kimi Linear config (as a dict) for ``config``.

    Raises:
        ValueError: naming an option of ours that Kimi Linear cannot express.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    check_expressible(config)
    mixers, feedforwards = config.layers[0::2], config.layers[1::2]
    kda = written_options(config, "kda", MODEL_TYPE)
    latent = written_options(config, "latent_attention", MODEL_TYPE)
    mlp = written_options(config, "mlp", MODEL_TYPE)
    moe = written_options(config, "moe", MODEL_TYPE)
    return {
        **common_to_hf(config, MODEL_TYPE, "KimiLinearForCausalLM"),
        "num_hidden_layers": len(mixers),
        "layer_types": [MIXERS[name] for name in mixers],
        "mlp_layer_types": [FEEDFORWARDS[name] for name in feedforwards],
        "tie_word_embeddings": False,  # transformers never ties them; the head is written
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "intermediate_size": mlp.hidden_size,
        "linear_num_heads": kda.n_heads,
        "linear_head_dim": kda.head_k_dim,
        "linear_conv_kernel_dim": kda.d_conv,
        "num_attention_heads": latent.n_heads,
        "num_key_value_heads": latent.n_heads,
        "q_lora_rank": latent.q_lora_rank,
        "kv_lora_rank": latent.kv_lora_rank,
        "qk_nope_head_dim": latent.qk_nope_head_dim,
        "qk_rope_head_dim": latent.qk_rope_head_dim,
        "v_head_dim": latent.v_head_dim,
        "attention_bias": latent.attention_bias,
        "num_local_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_hidden_size,
        "n_shared_experts": max(1, moe.n_shared_experts),
        "norm_topk_prob": moe.normalize_top_k,
        "routed_scaling_factor": moe.routed_scaling,
        "n_group": moe.n_groups,
        "topk_group": moe.topk_groups,
    }


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A transformers Kimi Linear state dict for our ``state``, in the checkpoints' names."""
    check_expressible(config)
    out = fused(name_map(config).to_hf(state), config)
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"].clone())  # never tied
    return out
