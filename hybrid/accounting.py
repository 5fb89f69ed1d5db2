"""Parameter and inference-cache accounting of a config, sublayer by sublayer, without
allocating the model (it is built on the meta device), and the units its numbers are written
in. ``hybrid info`` prints it (:mod:`hybrid.cli.info`); the decode evaluation and the
benchmarks size caches with it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid.config import HybridConfig
from hybrid.model import HybridLM
from layers.registry import get_block


@dataclass
class SublayerInfo:
    """One sublayer's numbers."""

    index: int
    block: str
    symbol: str
    parameters: int
    active_parameters: int
    cache_bytes: int


@dataclass
class ModelInfo:
    """The numbers of one config at one context length, per sublayer and in total."""

    config: HybridConfig
    context: int
    dtype: torch.dtype
    rows: list[SublayerInfo]
    total_parameters: int
    active_parameters: int
    embedding_parameters: int
    kv_dtype: str = ""  # what keys / values are stored in (the cache dtype unless int8 etc.)
    state_dtype: str = "float32"

    @property
    def cache_bytes(self) -> int:
        return sum(row.cache_bytes for row in self.rows)


def describe(
    config: HybridConfig,
    context: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    kv_dtype: torch.dtype | str | None = None,
    state_dtype: torch.dtype | str | None = None,
) -> ModelInfo:
    """Count parameters (built on the meta device: no memory) and cache bytes per sequence.

    ``kv_dtype`` / ``state_dtype`` as in :meth:`HybridLM.allocate_cache` (e.g. ``"int8"``
    keys and values with their scales): the bytes are then those of a cache allocated on the
    meta device, entry by entry.
    """
    with torch.device("meta"):
        model = HybridLM(config)
    allocated = None
    if kv_dtype is not None or state_dtype is not None:
        cache = model.allocate_cache(1, context, dtype, kv_dtype=kv_dtype, state_dtype=state_dtype)
        allocated = cache.layer_nbytes()
        names = cache.precision.names()
    rows = []
    for index, (name, options, block) in enumerate(
        zip(config.layers, config.layer_options, model.blocks, strict=True)
    ):
        spec = get_block(name)
        sublayer_params = sum(p.numel() for p in model.sublayers[index].parameters())
        norm_params = sublayer_params - sum(p.numel() for p in block.parameters())
        rows.append(
            SublayerInfo(
                index=index,
                block=name,
                symbol=spec.symbol,
                parameters=sublayer_params,
                active_parameters=block.active_parameters() + norm_params,
                cache_bytes=spec.block_class.inference_state_bytes(
                    config.d_model, options, context, dtype
                )
                if allocated is None
                else allocated[index],
            )
        )
    return ModelInfo(
        config=config,
        context=context,
        dtype=dtype,
        rows=rows,
        total_parameters=model.num_parameters(),
        active_parameters=model.num_parameters(active=True),
        embedding_parameters=model.num_parameters() - model.num_parameters(embeddings=False),
        kv_dtype=(names["kv_dtype"] if allocated else None) or str(dtype).removeprefix("torch."),
        state_dtype=(names["state_dtype"] if allocated else None)
        or str(torch.promote_types(dtype, torch.float32)).removeprefix("torch."),
    )
