"""Training on packed rows: document boundaries in the loss, activation checkpointing."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml

from hybrid.config import HybridConfig
from hybrid.model import HybridLM
from hybrid.recipe import validate_recipe
from hybrid.train.module import HybridLightningModule
from layers.attention import Attention, AttentionOptions
from layers.registry import register_block
from tests.train.conftest import TINY_RECIPE

EOS = 256


def module_for(boundaries: str = "reset", **trainer) -> HybridLightningModule:
    data = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    data["data"]["document_boundaries"] = boundaries
    data["model"]["pattern"] = "M-S*E"
    data["trainer"].update(trainer)
    recipe = validate_recipe(data)
    torch.manual_seed(0)
    return HybridLightningModule(recipe.hybrid_config(257), recipe, None, eos_id=EOS)


def packed_batch() -> torch.Tensor:
    """Two rows of 41 ids (inputs: the first 40): end-of-document ids inside them."""
    torch.manual_seed(1)
    rows = torch.randint(0, 256, (2, 41))
    rows[0, [7, 8, 25]] = EOS  # an empty document between two end-of-document ids
    rows[1, [3, 40]] = EOS  # the last one is only a target
    return rows


def test_loss_with_reset_is_the_token_weighted_mean_of_the_documents_losses():
    """Each document is its ids from an end-of-document id (the one that closed the previous
    document) to the next; run alone, its tokens' cross-entropies summed over all documents
    and divided by the tokens gives the packed loss."""
    module = module_for("reset")
    batch = packed_batch()
    with torch.no_grad():
        packed, _, _ = module._loss(batch)
        total, count = 0.0, 0
        for row in batch:
            inputs, targets = row[:-1], row[1:]
            starts = [0, *[t for t in range(1, len(inputs)) if inputs[t] == EOS], len(inputs)]
            for s, e in itertools.pairwise(starts):
                logits = module.model(inputs[None, s:e]).logits[0]
                total += float(F.cross_entropy(logits.double(), targets[s:e], reduction="sum"))
                count += e - s
    assert count == batch[:, 1:].numel()  # every target is kept
    assert float(packed) == pytest.approx(total / count, rel=1e-5)
    # With "none" the rows are single sequences: the logits after a boundary differ.
    leaky = module_for("none")
    assert leaky.document_ids(batch[:, :-1]) is None
    with torch.no_grad():
        inputs = batch[:, :-1]
        apart = module.model(inputs, seq_idx=module.document_ids(inputs)).logits
        across = module.model(inputs).logits
    torch.testing.assert_close(apart[:, :3], across[:, :3])  # before the first boundary
    assert (apart[0, 26:] - across[0, 26:]).abs().max() > 1e-3


def test_rows_without_boundaries_take_the_plain_path():
    module = module_for("reset")
    rows = torch.randint(0, 256, (2, 33))
    rows[:, 0] = EOS  # at the very start it opens the only document
    assert module.document_ids(rows[:, :-1]) is None
    rows[1, 9] = EOS
    assert module.document_ids(rows[:, :-1])[1, 8:10].tolist() == [1, 2]


def saved_bytes(model: HybridLM, ids: torch.Tensor) -> tuple[int, dict]:
    """Bytes autograd keeps for the backward of one training loss, and the gradients."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss
    loss.backward()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients_with_less_saved(every):
    torch.manual_seed(0)
    config = HybridConfig(
        "M-S*E-M-", vocab_size=61, d_model=32, attention={"n_heads": 2},
        mamba2={"d_state": 8, "headdim": 8, "chunk_size": 8}, mamba1={"d_state": 4},
        moe={"n_experts": 4, "top_k": 2, "expert_hidden_size": 32},
    )  # fmt: skip
    model = HybridLM(config).train()
    ids = torch.randint(0, 61, (2, 48))
    plain_bytes, plain_grads = saved_bytes(model, ids)
    checkpointed = copy.deepcopy(model)
    checkpointed.enable_activation_checkpointing(every)
    kept_bytes, grads = saved_bytes(checkpointed, ids)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name  # bit for bit
    assert kept_bytes < (0.25 if every == 1 else 0.6) * plain_bytes, (kept_bytes, plain_bytes)


def test_recipe_turns_checkpointing_on():
    assert module_for(activation_checkpointing=True).model.checkpoint_every == 1
    assert module_for(activation_checkpointing=3).model.checkpoint_every == 3
    assert module_for().model.checkpoint_every == 0


@dataclass
class OnceOptions(AttentionOptions):
    pass


@register_block("once_attention", symbol="O", options=OnceOptions)
class OnceAttention(Attention):
    """A mixer whose forward must not run twice (say, it draws from a stream)."""

    recomputable = False


def test_checkpointing_a_block_that_cannot_be_rerun_is_refused():
    model = HybridLM(HybridConfig("M-O-", vocab_size=61, d_model=32, mamba2={"headdim": 8}))
    with pytest.raises(ValueError, match=r"^activation_checkpointing: layers\[2\] \(block 'once_"):
        model.enable_activation_checkpointing(1)
    model.enable_activation_checkpointing(4)  # every 4th sublayer: only layers[0]
    assert model.checkpoint_every == 4
    with pytest.raises(ValueError, match=r"^activation_checkpointing: must be a number"):
        model.enable_activation_checkpointing(-1)


def test_moe_balance_over_the_global_batch_from_the_recipe():
    from layers.moe import MoE

    moe = [b for b in module_for(moe_balance="global").model.blocks if isinstance(b, MoE)]
    assert moe and all(block.global_balance for block in moe)
    assert not any(b.global_balance for b in module_for().model.blocks if isinstance(b, MoE))


def test_fsdp_is_fsdp2_through_lightnings_model_parallel_strategy():
    """Built here (no GPU to run it): data-parallel over every device, full checkpoints."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from hybrid.train.run import _strategy

    data = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    data["trainer"].update(strategy="fsdp", devices=4, num_nodes=2, accelerator="gpu")
    strategy = _strategy(validate_recipe(data))
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (8, 1)
    assert strategy._save_distributed_checkpoint is False
    module_for().configure_model()  # no device mesh (not under that strategy): nothing done


def test_recipe_compiles_the_model_in_place():
    module = module_for(compile=True)
    assert module.model._compiled_call_impl is not None  # nn.Module.compile: same state keys
    assert "embedding.weight" in module.model.state_dict()
