"""HybridConfig: defaults, validation with one-line messages, user blocks, serialisation."""

import sys
import textwrap

import pytest
import torch

from hybrid import HybridConfig, HybridLM

SMALL = {"vocab_size": 32, "d_model": 64, "mamba2": {"d_state": 16, "headdim": 16}}


def test_defaults_fill_everything_else():
    config = HybridConfig("M*-E", vocab_size=100)
    attention, mamba2 = config.layer_options[1], config.layer_options[0]
    assert attention.n_heads == 8 and attention.n_kv_heads == 8 and attention.head_dim == 64
    assert (mamba2.d_state, mamba2.headdim, mamba2.expand, mamba2.chunk_size) == (128, 64, 2, 256)
    assert config.layer_options[2].hidden_size % 64 == 0
    assert config.layer_options[3].top_k == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pattern": "M-?"}, "pattern[2]"),
        ({"pattern": ""}, "pattern"),
        ({"pattern": "*", "attention": {"n_heads": 6}}, "attention.n_heads"),
        ({"pattern": "*", "attention": {"n_heads": 8, "n_kv_heads": 3}}, "attention.n_kv_heads"),
        ({"pattern": "*", "attention": {"window": 0}}, "attention.window"),
        ({"pattern": "*", "attention": {"rope_fraction": 0}}, "attention.rope_fraction"),
        ({"pattern": "*", "attention": {"n_head": 4}}, "attention.n_head"),
        ({"pattern": "E", "moe": {"n_experts": 4, "top_k": 5}}, "moe.top_k"),
        ({"pattern": "E", "moe": {"router": "argmax"}}, "moe.router"),
        ({"pattern": "E", "moe": {"n_experts": 6, "n_groups": 4}}, "moe.n_groups"),
        ({"pattern": "M", "mamba2": {"headdim": 48}}, "mamba2.headdim"),
        ({"pattern": "M", "mamba2": {"headdim": 16, "ngroups": 3}}, "mamba2.ngroups"),
        ({"pattern": "S", "mamba1": {"d_state": 0}}, "mamba1.d_state"),
        ({"pattern": "-", "mlp": {"activation": "tanh"}}, "mlp.activation"),
        ({"pattern": "-", "d_model": 0}, "d_model"),
        ({"pattern": "-", "vocab_size": -1}, "vocab_size"),
        ({"pattern": ["*", {"block": "attention", "window": -2}]}, "layers[1].attention.window"),
        ({"pattern": "**", "layer_overrides": {5: {"window": 2}}}, "layer_overrides"),
        ({"pattern": "-", "modules": ["no_such_module_xyz"]}, "modules"),
    ],
)
def test_invalid_configs_fail_at_construction(kwargs, field):
    kwargs = {"vocab_size": 32, "d_model": 64, **kwargs}
    with pytest.raises(ValueError) as error:
        HybridConfig(**kwargs)
    message = str(error.value)
    assert message.startswith(field), message
    assert "\n" not in message


def test_error_messages_name_the_allowed_values():
    with pytest.raises(ValueError, match="must be one of swiglu, geglu, gelu, relu2, silu"):
        HybridConfig("-", mlp={"activation": "tanh"})
    with pytest.raises(ValueError, match="did you mean 'n_heads'"):
        HybridConfig("*", attention={"n_head": 4})
    with pytest.raises(ValueError, match="must be <= n_experts=4"):
        HybridConfig("E", moe={"n_experts": 4, "top_k": 5})


def test_from_dict_unknown_key_suggests_the_closest():
    with pytest.raises(ValueError, match="d_modle: unknown config field; did you mean 'd_model'"):
        HybridConfig.from_dict({"pattern": "M", "d_modle": 64})


def test_to_dict_round_trip():
    config = HybridConfig(
        ["M", {"block": "attention", "window": 16}, "E"],
        moe={"n_experts": 4},
        layer_overrides={2: {"top_k": 1}},
        **SMALL,
    )
    again = HybridConfig.from_dict(config.to_dict())
    assert again.layers == config.layers
    assert again.layer_options == config.layer_options
    assert again.fingerprint() == config.fingerprint()
    assert HybridConfig("M-", **SMALL).fingerprint() != HybridConfig("M*", **SMALL).fingerprint()


def test_user_block_registered_from_its_own_module(tmp_path, monkeypatch):
    (tmp_path / "lab_blocks.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            import torch
            from hybrid import Block, register_block

            @dataclass
            class ScaleOptions:
                factor: float = 2.0

                def resolve(self, d_model, where):
                    if self.factor <= 0:
                        raise ValueError(f"{where}.factor: must be > 0")
                    return self

            @register_block("scale", symbol="X", options=ScaleOptions, role="feedforward")
            class Scale(Block):
                def __init__(self, d_model, options, layer_idx):
                    super().__init__(d_model, options, layer_idx)
                    self.weight = torch.nn.Parameter(torch.ones(d_model))

                def forward(self, hidden):
                    return hidden * self.weight * self.options.factor
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = HybridConfig("M-X", modules=["lab_blocks"], blocks={"scale": {"factor": 3.0}}, **SMALL)
    assert config.layers == ["mamba2", "mlp", "scale"]
    assert config.layer_options[2].factor == 3.0
    model = HybridLM(config)
    assert model(torch.randint(0, 32, (1, 5))).logits.shape == (1, 5, 32)
    with pytest.raises(ValueError, match=r"blocks\.scale\.factor"):
        HybridConfig("X", modules=["lab_blocks"], blocks={"scale": {"factor": -1.0}}, **SMALL)
    sys.modules.pop("lab_blocks", None)


def test_registering_a_taken_symbol_fails():
    from dataclasses import dataclass

    from hybrid import Block, register_block

    @dataclass
    class NoOptions:
        def resolve(self, d_model, where):
            return self

    with pytest.raises(ValueError, match="already uses"):

        @register_block("another_mamba", symbol="M", options=NoOptions)
        class AnotherMamba(Block):
            pass
