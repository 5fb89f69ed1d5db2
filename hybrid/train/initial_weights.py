"""``init_from``: the weights a run starts from (fine-tuning), checked against its model."""

from __future__ import annotations

from pathlib import Path

import torch

from hybrid.config import HybridConfig
from hybrid.recipe import Recipe


def check_init_source(source: str) -> None:
    """Fails early (before data preparation) when ``init_from`` names nothing.

    Raises:
        ValueError: one line naming the path.
    """
    from hybrid.checkpoint import resolve_checkpoint

    if not resolve_checkpoint(source).exists():
        raise ValueError(f"{source}: no such checkpoint, run or model directory")


def initial_weights(
    source: str, config: HybridConfig, *, trust_remote_code: bool = False
) -> dict[str, torch.Tensor]:
    """The state dict of the model at ``source`` (anything :func:`hybrid.checkpoint.load_model`
    reads: a run directory, our model directory, a ``hybrid train`` ``.ckpt``, a transformers
    directory), for a model built from ``config``.

    Only the parameter names and shapes must agree: options that hold no weights (a window, the
    RoPE base, a norm's epsilon) may change, as when fine-tuning for longer contexts.
    ``trust_remote_code``: as in :func:`hybrid.checkpoint.load_model`.

    Raises:
        ValueError: one line naming ``source`` and the first parameter that does not fit.
    """
    from hybrid.checkpoint import load_model
    from hybrid.model import HybridLM

    model = load_model(source, trust_remote_code=trust_remote_code)
    state = model.state_dict()
    with torch.device("meta"):
        expected = HybridLM(config).state_dict()
    ours, theirs = config.pattern_string, model.config.pattern_string
    missing = [name for name in expected if name not in state]
    if missing:
        raise ValueError(
            f"{source}: its model ({theirs}) has no '{missing[0]}', which the recipe's model "
            f"({ours}) needs; the model section must give the same layers"
        )
    extra = [name for name in state if name not in expected]
    if extra:
        raise ValueError(
            f"{source}: its model ({theirs}) has '{extra[0]}', which the recipe's model "
            f"({ours}) lacks; the model section must give the same layers"
        )
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise ValueError(
                f"{source}: '{name}' is {tuple(state[name].shape)} there and "
                f"{tuple(tensor.shape)} in the recipe's model; the model sections "
                f"{'or the tokenizers ' if name in ('embedding.weight', 'lm_head.weight') else ''}"
                "differ"
            )
    return state


def source_tokenizer(source: str) -> Path | None:
    """The ``tokenizer.json`` that came with ``source``: in the model directory it resolves to,
    in a run directory, or in the run directory of a ``.ckpt``; None if there is none (a
    byte-level run)."""
    from hybrid.checkpoint import resolve_checkpoint

    resolved = resolve_checkpoint(source)
    directory_read = resolved.parent.parent if resolved.is_file() else resolved
    for directory in (directory_read, Path(source)):
        if (directory / "tokenizer.json").is_file():
            return directory / "tokenizer.json"
    return None


def with_source_tokenizer(recipe: Recipe) -> Recipe:
    """A BPE recipe without ``tokenizer.path`` fine-tunes with the tokenizer that came with its
    ``init_from`` (:func:`source_tokenizer`), rather than training a new one whose ids would
    mean other strings to the loaded embeddings."""
    if recipe.tokenizer.kind != "bpe" or recipe.tokenizer.path is not None:
        return recipe
    found = source_tokenizer(recipe.init_from)
    if found is None:
        return recipe
    return recipe.model_copy(
        update={"tokenizer": recipe.tokenizer.model_copy(update={"path": str(found)})}
    )
