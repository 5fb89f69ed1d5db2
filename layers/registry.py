"""The block registry: every block a pattern can name, with its one-character symbol.

A block is registered once, with a decorator, from any module::

    from hybrid import register_block

    @register_block("retnet", symbol="R", options=RetNetOptions)
    class RetNet(Block): ...

after which the pattern ``"R-R*-"`` and the list ``["retnet", "mlp", ...]`` both build it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from layers.base import Block

BlockRole = Literal["mixer", "feedforward"]

# Characters the pattern language reserves for layout (ignored inside patterns).
SEPARATORS = frozenset(" \t\n|")


@dataclass(frozen=True)
class BlockSpec:
    """What the registry knows about one block family."""

    name: str
    symbol: str
    block_class: type[Block]
    options_class: type
    role: BlockRole


_BLOCKS: dict[str, BlockSpec] = {}


def register_block(
    name: str, *, symbol: str, options: type, role: BlockRole = "mixer"
) -> Callable[[type[Block]], type[Block]]:
    """Class decorator that adds a block to the registry under ``name`` and ``symbol``.

    ``options`` is a dataclass whose fields are the block's configurable options (each with a
    default); ``role`` says whether the block mixes tokens ("mixer") or acts per token
    ("feedforward"), which the Jamba-style period layout needs.
    """
    if not name.isidentifier():
        raise ValueError(f"block name {name!r} must be a Python identifier")
    if len(symbol) != 1 or symbol in SEPARATORS or symbol in "[]":
        raise ValueError(
            f"block symbol {symbol!r} must be one non-blank character other than '|', '[', ']'"
        )
    if role not in ("mixer", "feedforward"):
        raise ValueError(f"block role {role!r} must be 'mixer' or 'feedforward'")

    def decorator(block_class: type[Block]) -> type[Block]:
        for spec in _BLOCKS.values():
            same_class = spec.block_class.__qualname__ == block_class.__qualname__ and (
                spec.block_class.__module__ == block_class.__module__
            )
            if (spec.name == name or spec.symbol == symbol) and not same_class:
                raise ValueError(
                    f"cannot register block {name!r} with symbol {symbol!r}: "
                    f"{spec.name!r} already uses {'that name' if spec.name == name else 'it'}"
                )
        _BLOCKS[name] = BlockSpec(name, symbol, block_class, options, role)
        block_class.block_name = name
        return block_class

    return decorator


def registered_blocks() -> dict[str, BlockSpec]:
    """All registered blocks by name, in registration order."""
    return dict(_BLOCKS)


def known_blocks_text() -> str:
    """One-line listing of the registry, for error messages: ``M=mamba2, *=attention, ...``."""
    return ", ".join(f"{spec.symbol}={spec.name}" for spec in _BLOCKS.values())


def get_block(name_or_symbol: str, *, where: str = "pattern") -> BlockSpec:
    """Look a block up by registry name or one-character symbol.

    Raises:
        ValueError: one line naming ``where`` and listing the known blocks.
    """
    if name_or_symbol in _BLOCKS:
        return _BLOCKS[name_or_symbol]
    for spec in _BLOCKS.values():
        if spec.symbol == name_or_symbol:
            return spec
    close = difflib.get_close_matches(name_or_symbol, list(_BLOCKS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"{where}: unknown block {name_or_symbol!r}{hint}; known blocks: {known_blocks_text()}"
    )
