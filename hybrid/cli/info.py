"""``hybrid info PATTERN_OR_RECIPE``: the accounting of :mod:`hybrid.accounting` as a table."""

from __future__ import annotations

from hybrid.accounting import ModelInfo
from hybrid.units import human_bytes, human_count


def post_norm_line(indices: list[int]) -> list[str]:
    """The line naming the post-norm sublayers (none when every sublayer is pre-norm)."""
    if not indices:
        return []
    return [f"post-norm sublayers {', '.join(map(str, indices))}: x + norm(block(x))"]


def format_info(info: ModelInfo) -> str:
    """The report as a text table plus totals."""
    config = info.config
    dtype_name = str(info.dtype).removeprefix("torch.")
    scales = " (+ scales)" if info.kv_dtype == "int8" else ""
    kv = "KV and " if info.kv_dtype == dtype_name else f"KV in {info.kv_dtype}{scales}, "
    width = max([len("block"), *(len(row.block) for row in info.rows)])  # the longest name
    header = (
        f"{'idx':>4}  {'sym':^3}  {'block':<{width}} {'params':>10} {'active':>10} {'cache':>12}"
    )
    lines = [
        f"pattern {config.pattern_string}  ({len(config.layers)} sublayers, d_model "
        f"{config.d_model}, vocab {config.vocab_size})",
        *post_norm_line(config.post_norm_sublayers),
        "",
        header,
        "-" * len(header),
    ]
    for row in info.rows:
        lines.append(
            f"{row.index:>4}  {row.symbol:^3}  {row.block:<{width}} "
            f"{human_count(row.parameters):>10} {human_count(row.active_parameters):>10} "
            f"{human_bytes(row.cache_bytes):>12}"
        )
    lines += [
        "-" * len(header),
        f"total parameters:   {info.total_parameters:,} ({human_count(info.total_parameters)}; "
        f"embeddings {human_count(info.embedding_parameters)})",
        f"active parameters:  {info.active_parameters:,} ({human_count(info.active_parameters)}; "
        "MoE counts top-k experts)",
        f"inference cache per sequence at {info.context:,} tokens: "
        f"{human_bytes(info.cache_bytes)} ({info.cache_bytes:,} bytes; {kv}conv state in "
        f"{dtype_name}, SSM state in {info.state_dtype})",
    ]
    return "\n".join(lines)
