"""Blocks a hybrid model is built from, registered by name and pattern symbol.

Importing this package registers the built-ins: ``mamba2`` (M), ``mamba1`` (S),
``gated_deltanet`` (D), ``kda`` (K), ``short_conv`` (C), ``attention`` (*),
``latent_attention`` (L), ``mlp`` (-), ``moe`` (E).
"""

from layers import (  # noqa: F401  (registers the blocks)
    attention,
    gated_deltanet,
    kda,
    latent_attention,
    mamba1,
    mamba2,
    mlp,
    moe,
    parallel,
    short_conv,
)
from layers.base import Block, BlockOutput
from layers.registry import BlockSpec, get_block, register_block, registered_blocks

__all__ = ["Block", "BlockOutput", "BlockSpec", "get_block", "register_block", "registered_blocks"]
