"""hybrid: build, train and evaluate hybrid transformer / state-space language models."""

from hybrid.config import HybridConfig
from hybrid.model import HybridLM, HybridOutput
from hybrid.pattern import (
    parse_pattern,
    pattern_from_periods,
    pattern_from_ratios,
    pattern_string,
    periods_from_pattern,
    ratios_from_pattern,
)
from layers.base import Block, BlockOutput
from layers.registry import get_block, register_block, registered_blocks

__version__ = "0.1.0"

__all__ = [
    "Block",
    "BlockOutput",
    "HybridConfig",
    "HybridLM",
    "HybridOutput",
    "get_block",
    "parse_pattern",
    "pattern_from_periods",
    "pattern_from_ratios",
    "pattern_string",
    "periods_from_pattern",
    "ratios_from_pattern",
    "register_block",
    "registered_blocks",
]
