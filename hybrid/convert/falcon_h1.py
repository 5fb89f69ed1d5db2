"""transformers ``falcon_h1`` (FalconH1ForCausalLM) <-> HybridLM.

A Falcon-H1 decoder layer runs attention and a Mamba-2 mixer side by side on the same normed
input and adds their outputs, then a gated MLP: ``[*M]-`` per layer, our ``parallel``
sublayer with ``input_multipliers = [attention_in_multiplier, ssm_in_multiplier]`` and
``output_multipliers = [attention_out_multiplier, ssm_out_multiplier]``.

Multipliers: ``embedding_multiplier`` and ``lm_head_multiplier`` are our model's
``embedding_multiplier`` / ``logit_multiplier`` (the embedding may be tied to the head, so they
cannot live in the weights). ``key_multiplier`` (on k_proj's output), ``ssm_multipliers``
(transformers' ``mup_vector``: one factor for each of the z, x, B, C and dt parts of the
Mamba in_proj's output) and ``mlp_multipliers`` (on gate_proj's output before the activation
and on down_proj's output) scale a linear map's output, so they are folded into that map's
weights and biases on reading: the function is the same, exactly. Written back they are all 1
with the weights already scaled. (Training from a folded checkpoint is the same function with
differently scaled parameters, so the optimizer's per-parameter steps differ from training
with the multipliers kept apart: muP's reason for them.)

Read and written: sizes, heads / key-value heads / ``head_dim``, ``rope_theta``,
``attention_bias``, ``mlp_bias``, ``mamba_d_ssm`` / ``mamba_n_heads`` / ``mamba_d_head`` /
``mamba_expand``, ``mamba_d_state``, ``mamba_n_groups``, ``mamba_d_conv``,
``mamba_chunk_size``, ``mamba_conv_bias``, ``mamba_proj_bias`` = ``projectors_bias`` (our one
Mamba projection bias), ``mamba_rms_norm``, ``mamba_norm_before_gate``, ``time_step_limit``,
``rms_norm_eps`` (every norm), ``tie_word_embeddings``, the multipliers above. Refused: RoPE
types other than ``default``, ``hidden_act`` other than silu (the MLP's and the Mamba conv's
activation), ``mamba_proj_bias`` != ``projectors_bias``, quantized checkpoints. Ignored:
``num_logits_to_keep``, ``max_position_embeddings``, dropout, token ids,
``initializer_range`` (kept as ``init_std``).
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import (
    ATTENTION,
    MAMBA2_MIXER,
    MAX_POSITIONS,
    MLP,
    attention_from_hf,
    attention_to_hf,
    mamba_prefixed_from_hf,
    mamba_prefixed_to_hf,
    mlp_from_hf,
    mlp_to_hf,
)
from hybrid.convert.common import unsupported
from hybrid.convert.hf_config import (
    common_from_hf,
    common_to_hf,
    family_options,
    mixer_feedforward_pairs,
    reject_quantized,
    require_expressible,
    require_value,
    rope_from_hf,
)
from hybrid.convert.mapping import NameMap, model_table, nest

MODEL_TYPE = "falcon_h1"

# What this converter writes beyond the plain model (hybrid.convert.to_hf checks the rest).
EXPRESSES = frozenset(
    {"embedding_multiplier", "logit_multiplier", "mamba2.rmsnorm", "mamba2.norm_before_gate"}
)

# A Falcon-H1 decoder layer is two of our sublayers: attention + Mamba-2 side by side (2 i),
# then the MLP (2 i + 1).
LAYER = "model.layers.{}."
TENSORS = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.final_layernorm.weight",
    "lm_head.weight": "lm_head.weight",
}
SUBLAYERS = {
    "parallel": {
        "sublayers.{}.norm.weight": LAYER + "input_layernorm.weight",
        **nest(ATTENTION, "sublayers.{}.block.mixers.0.", LAYER + "self_attn."),
        **nest(MAMBA2_MIXER, "sublayers.{}.block.mixers.1.", LAYER + "mamba."),
    },
    "mlp": {
        "sublayers.{}.norm.weight": LAYER + "pre_ff_layernorm.weight",
        **nest(MLP, "sublayers.{}.block.ffn.", LAYER + "feed_forward."),
    },
}
MIXERS = ["attention", "mamba2"]  # the order of the parallel sublayer's mixers


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> Falcon-H1's for ``config``'s model."""
    table = model_table(TENSORS, SUBLAYERS, config, layer_of=lambda index: index // 2)
    return NameMap(table, config, MODEL_TYPE)


def multipliers(hf: dict[str, Any], key: str, count: int) -> list[float]:
    """A list-valued multiplier key (all 1 when absent)."""
    values = hf.get(key)
    if values is None:
        return [1.0] * count
    if not isinstance(values, (list, tuple)) or len(values) != count:
        raise unsupported(MODEL_TYPE, key, values, f"a list of {count} numbers")
    return [float(value) for value in values]


def scalar(hf: dict[str, Any], key: str) -> float:
    """A scalar multiplier key (1 when absent or null)."""
    value = hf.get(key)
    return 1.0 if value is None else float(value)


def mamba_sizes(hf: dict[str, Any], d_model: int) -> tuple[int, int]:
    """``(n_heads, head_dim)`` of the Mamba mixer, as FalconH1Config resolves them."""
    d_ssm = hf.get("mamba_d_ssm", 1024)
    inner = int(hf.get("mamba_expand", 2) * d_model) if d_ssm is None else d_ssm
    n_heads = hf.get("mamba_n_heads", 128)
    head_dim = hf.get("mamba_d_head", "auto")
    if head_dim == "auto":
        head_dim = inner // n_heads
    if n_heads * head_dim != inner:
        raise ValueError(
            f"{MODEL_TYPE}: mamba_n_heads {n_heads} * mamba_d_head {head_dim} must equal the "
            f"Mamba inner width {inner}"
        )
    return n_heads, head_dim


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers Falcon-H1 config (``config.json`` as a dict)."""
    reject_quantized(hf, MODEL_TYPE)
    theta, _ = rope_from_hf(hf, MODEL_TYPE, default_fraction=None)
    common = common_from_hf(hf, vocab_default=128000, hidden_default=4096)
    d_model = common["d_model"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise unsupported(MODEL_TYPE, "hidden_act", act, "silu, the MLP's and the Mamba conv's")
    if bool(hf.get("mamba_proj_bias", False)) != bool(hf.get("projectors_bias", False)):
        raise unsupported(
            MODEL_TYPE, "projectors_bias", hf.get("projectors_bias"),
            "the same as mamba_proj_bias: one bias switch for the Mamba in and out projections",
        )  # fmt: skip
    multipliers(hf, "ssm_multipliers", 5)  # checked here, folded into the weights later
    multipliers(hf, "mlp_multipliers", 2)
    eps = float(hf.get("rms_norm_eps", 1e-5))
    n_heads, head_dim = mamba_sizes(hf, d_model)
    mamba2 = {
        "n_heads": n_heads,
        "headdim": head_dim,
        **mamba_prefixed_from_hf(hf),
        "norm_eps": eps,
        "rmsnorm": bool(hf.get("mamba_rms_norm", False)),
        "norm_before_gate": bool(hf.get("mamba_norm_before_gate", True)),
    }
    attention = attention_from_hf(hf, heads_default=32, kv_default=8, d_model=d_model)
    parallel = {
        "input_multipliers": [scalar(hf, "attention_in_multiplier"),
                              scalar(hf, "ssm_in_multiplier")],
        "output_multipliers": [scalar(hf, "attention_out_multiplier"),
                               scalar(hf, "ssm_out_multiplier")],
    }  # fmt: skip
    n_layers = hf.get("num_hidden_layers", 32)
    return HybridConfig(
        pattern="[*M]-" * n_layers,
        attention={**attention, "rope_theta": theta},
        mamba2=mamba2,
        mlp=mlp_from_hf(hf, MODEL_TYPE, intermediate_default=14336),
        layer_overrides={2 * i: parallel for i in range(n_layers)},
        norm_eps=eps,
        embedding_multiplier=scalar(hf, "embedding_multiplier"),
        logit_multiplier=scalar(hf, "lm_head_multiplier"),
        **common,
    )


def mup_vector(hf: dict[str, Any], config: HybridConfig) -> torch.Tensor:
    """transformers' ``mup_vector``: the factor of each output row of the Mamba in_proj
    ([z | x | B | C | dt] rows, one ``ssm_multipliers`` entry per part)."""
    z_x_b_c_dt = multipliers(hf, "ssm_multipliers", 5)
    mamba = config.mamba2.resolve(config.d_model, "mamba2")
    inner, groups = mamba.d_inner(config.d_model), mamba.ngroups * mamba.d_state
    sizes = [inner, inner, groups, groups, inner // mamba.headdim]
    return torch.cat([torch.full((size,), f) for size, f in zip(sizes, z_x_b_c_dt, strict=True)])


def fold_multipliers(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """``state`` with key, SSM and MLP multipliers folded into the projections they scale."""
    state = dict(state)
    gate, down = multipliers(hf, "mlp_multipliers", 2)
    factors = {
        "self_attn.k_proj": scalar(hf, "key_multiplier"),
        "mamba.in_proj": mup_vector(hf, config)[:, None],
        "feed_forward.gate_proj": gate,
        "feed_forward.down_proj": down,
    }
    for name in list(state):
        for module, factor in factors.items():
            if f".{module}." not in name:
                continue
            tensor = state[name]
            if isinstance(factor, torch.Tensor):
                factor = (factor if tensor.dim() == 2 else factor[:, 0]).to(tensor.dtype)
            state[name] = tensor * factor
    return state


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from a Falcon-H1 one (multipliers folded as the module docstring says)."""
    return name_map(config).from_hf(fold_multipliers(state, hf, config))


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The transformers Falcon-H1 config of our config.

    Raises:
        ValueError: the model is not ``[*M]-`` layers with one set of options per family that
            Falcon-H1 can express.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    layers = config.layers
    n_layers = len(layers) // 2
    parallel = family_options(config, "parallel", MODEL_TYPE)
    if (
        not mixer_feedforward_pairs(layers, ("parallel",), ("mlp",))
        or [name for name, _ in parallel.mixers] != MIXERS
    ):
        raise ValueError(
            f"{MODEL_TYPE}: cannot express pattern {config.pattern_string!r}; {MODEL_TYPE} "
            "needs layers of attention and Mamba-2 side by side then an MLP ('[*M]-' * n)"
        )
    attention, mamba = (options for _, options in parallel.mixers)
    require_value(
        MODEL_TYPE, "attention.rope_fraction", attention.rope_fraction, 1.0, "RoPE on whole heads"
    )
    require_value(MODEL_TYPE, "attention.rope_scaling", attention.rope_scaling, None, "plain RoPE")
    require_value(
        MODEL_TYPE, "mamba2.norm_eps", mamba.norm_eps, config.norm_eps,
        "one epsilon for all norms, the model's norm_eps",
    )  # fmt: skip
    mlp = family_options(config, "mlp", MODEL_TYPE)
    require_value(
        MODEL_TYPE, "mlp.activation", mlp.activation, "swiglu",
        "one hidden_act, silu, for the MLP and the Mamba conv",
    )  # fmt: skip
    attn_in, ssm_in = parallel.input_multipliers
    attn_out, ssm_out = parallel.output_multipliers
    d_inner = mamba.d_inner(config.d_model)
    return {
        **common_to_hf(config, MODEL_TYPE, "FalconH1ForCausalLM"),
        **attention_to_hf(attention, MODEL_TYPE),
        **mlp_to_hf(mlp, MODEL_TYPE),
        "num_hidden_layers": n_layers,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": attention.rope_theta},
        "max_position_embeddings": MAX_POSITIONS,
        "mamba_d_ssm": d_inner,
        "mamba_n_heads": d_inner // mamba.headdim,
        "mamba_d_head": mamba.headdim,
        **mamba_prefixed_to_hf(mamba),
        "projectors_bias": mamba.bias,
        "mamba_rms_norm": mamba.rmsnorm,
        "mamba_norm_before_gate": mamba.norm_before_gate,
        "embedding_multiplier": config.embedding_multiplier,
        "lm_head_multiplier": config.logit_multiplier,
        "attention_in_multiplier": attn_in,
        "attention_out_multiplier": attn_out,
        "ssm_in_multiplier": ssm_in,
        "ssm_out_multiplier": ssm_out,
        "key_multiplier": 1.0,
        "ssm_multipliers": [1.0] * 5,
        "mlp_multipliers": [1.0, 1.0],
    }


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A Falcon-H1 state dict from ours (written with all folded multipliers 1)."""
    return name_map(config).to_hf(state)
