"""What ``hybrid info`` reports: parameters and inference-cache bytes, sublayer by sublayer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.model import HybridLM
from hybrid.overrides import apply_overrides
from hybrid.recipe import Recipe, parse_recipe, read_recipe_file, vocab_size
from layers.registry import get_block


@dataclass
class SublayerInfo:
    """One row of the report."""

    index: int
    block: str
    symbol: str
    parameters: int
    active_parameters: int
    cache_bytes: int


@dataclass
class ModelInfo:
    """The whole report for one config at one context length."""

    config: HybridConfig
    context: int
    dtype: torch.dtype
    rows: list[SublayerInfo]
    total_parameters: int
    active_parameters: int
    embedding_parameters: int

    @property
    def cache_bytes(self) -> int:
        return sum(row.cache_bytes for row in self.rows)


def load_model_config(
    source: str, overrides: list[str] | None = None, **defaults: Any
) -> HybridConfig:
    """A config from a recipe file (its ``model`` section) or a pattern string.

    ``defaults`` (e.g. ``vocab_size``, ``d_model``) fill fields the source leaves unset;
    ``overrides`` are dotted ``key=value`` strings applied last: relative to the model
    (``d_model=256``), or for a recipe also full recipe paths as ``hybrid train`` takes them
    (``model.d_model=256``, ``data.mqar.vocab_size=256``).

    Raises:
        ValueError: unreadable recipe, or an invalid config (one line naming the field).
    """
    path = Path(source)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        recipe = read_recipe_file(path)
        if "model" in recipe:  # full recipe paths, as `hybrid train` takes them, apply first
            sections = set(Recipe.model_fields)
            full = [o for o in overrides or [] if o.partition("=")[0].split(".")[0] in sections]
            recipe = apply_overrides(recipe, full)
            overrides = [o for o in overrides or [] if o not in full]
        data = recipe.get("model", recipe)
        if not isinstance(data, dict):
            raise ValueError(f"{source}: model: expected a mapping")
        if "model" in recipe and "vocab_size" not in data:
            data = {**data, "vocab_size": vocab_size(parse_recipe(recipe))}
    else:
        data = {"pattern": source}
    data = {**{k: v for k, v in defaults.items() if v is not None}, **data}
    return HybridConfig.from_dict(apply_overrides(data, overrides or []))


def describe(config: HybridConfig, context: int, dtype: torch.dtype = torch.bfloat16) -> ModelInfo:
    """Count parameters (built on the meta device: no memory) and cache bytes per sequence."""
    with torch.device("meta"):
        model = HybridLM(config)
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
                ),
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
    )


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def human_count(count: int) -> str:
    """12345678 -> '12.35M'."""
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= threshold:
            return f"{count / threshold:.2f}{suffix}"
    return str(count)


def format_info(info: ModelInfo) -> str:
    """The report as a text table plus totals."""
    config = info.config
    dtype_name = str(info.dtype).removeprefix("torch.")
    header = f"{'idx':>4}  {'sym':^3}  {'block':<10} {'params':>10} {'active':>10} {'cache':>12}"
    lines = [
        f"pattern {config.pattern_string}  ({len(config.layers)} sublayers, d_model "
        f"{config.d_model}, vocab {config.vocab_size})",
        "",
        header,
        "-" * len(header),
    ]
    for row in info.rows:
        lines.append(
            f"{row.index:>4}  {row.symbol:^3}  {row.block:<10} {human_count(row.parameters):>10} "
            f"{human_count(row.active_parameters):>10} {human_bytes(row.cache_bytes):>12}"
        )
    lines += [
        "-" * len(header),
        f"total parameters:   {info.total_parameters:,} ({human_count(info.total_parameters)}; "
        f"embeddings {human_count(info.embedding_parameters)})",
        f"active parameters:  {info.active_parameters:,} ({human_count(info.active_parameters)}; "
        "MoE counts top-k experts)",
        f"inference cache per sequence at {info.context:,} tokens: "
        f"{human_bytes(info.cache_bytes)} ({info.cache_bytes:,} bytes; KV and conv state in "
        f"{dtype_name}, SSM state in float32)",
    ]
    return "\n".join(lines)
