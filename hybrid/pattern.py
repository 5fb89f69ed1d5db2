"""One pattern language for every hybrid layout.

A model is a sequence of pre-norm residual sublayers, one block each (Megatron-LM's view).
Three ways of writing a layout resolve to the same sublayer list:

- a pattern string of registry symbols: ``"M-M*-ME"`` (mamba2, mlp, mamba2, attention, mlp,
  mamba2, moe); blanks and ``|`` are ignored, so ``"M-M* | -ME"`` is the same;
- an explicit list of block names or symbols, each optionally with per-layer option overrides:
  ``["mamba2", {"block": "attention", "window": 512}, "mlp"]``;
- Jamba-style periods (:func:`pattern_from_periods`), where a "layer" is a mixer followed by a
  feed-forward, or Megatron-style ratios (:func:`pattern_from_ratios`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from layers.registry import SEPARATORS, get_block

PatternItem = str | dict[str, Any] | tuple[str, dict[str, Any]]
Pattern = str | Sequence[PatternItem]


def parse_pattern(pattern: Pattern) -> list[tuple[str, dict[str, Any]]]:
    """Resolve any accepted pattern form to ``[(block_name, overrides), ...]``.

    Raises:
        ValueError: empty pattern, unknown symbol or name (listing the known ones), or an
            item of the wrong form; the message names ``pattern`` or ``pattern[i]``.
    """
    if isinstance(pattern, str):
        return _parse_symbols(pattern)
    if not isinstance(pattern, Sequence) or not pattern:
        raise ValueError(
            "pattern: must be a non-empty string of block symbols or list of block names; "
            f"got {pattern!r}"
        )
    layers = []
    for index, item in enumerate(pattern):
        where = f"pattern[{index}]"
        if isinstance(item, str):
            name, overrides = item, {}
        elif isinstance(item, dict):
            if "block" not in item:
                raise ValueError(f"{where}: a mapping needs a 'block' key; got keys {list(item)}")
            overrides = {key: value for key, value in item.items() if key != "block"}
            name = item["block"]
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict):
            name, overrides = item[0], dict(item[1])
        else:
            raise ValueError(
                f"{where}: expected a block name, {{'block': name, ...options}} or "
                f"(name, options); got {item!r}"
            )
        if not isinstance(name, str):
            raise ValueError(f"{where}: block name must be a string; got {name!r}")
        layers.append((get_block(name, where=where).name, overrides))
    return layers


def _parse_symbols(pattern: str) -> list[tuple[str, dict[str, Any]]]:
    """A symbol string; ``[...]`` puts the mixers inside side by side in one sublayer."""
    layers: list[tuple[str, dict[str, Any]]] = []
    group: list[str] | None = None
    position = 0  # index among the symbols, brackets not counted (what errors name)
    for char in pattern:
        if char in SEPARATORS:
            continue
        if char == "[":
            if group is not None:
                raise ValueError(f"pattern[{position}]: '[' inside '[...]': groups do not nest")
            group = []
        elif char == "]":
            if group is None:
                raise ValueError(f"pattern[{position}]: ']' without an opening '['")
            if len(group) < 2:
                raise ValueError(
                    f"pattern[{position}]: '[...]' needs at least two mixers side by side; got "
                    f"{''.join(get_block(name).symbol for name in group) or 'none'}"
                )
            layers.append(("parallel", {"mixers": group}))
            group = None
        else:
            name = get_block(char, where=f"pattern[{position}]").name
            position += 1
            if group is None:
                layers.append((name, {}))
            else:
                group.append(name)
    if group is not None:
        raise ValueError("pattern: '[' is never closed with ']'")
    if not layers:
        raise ValueError("pattern: must name at least one block; got an empty pattern")
    return layers


def pattern_string(block_names: Sequence[str], options: Sequence[Any] | None = None) -> str:
    """The symbol string of a list of registry names (overrides are not expressible);
    with the resolved ``options``, parallel sublayers show as ``[...]`` of their mixers."""
    symbols = []
    for index, name in enumerate(block_names):
        if name == "parallel" and options is not None:
            inner = [get_block(mixer).symbol for mixer, _ in options[index].mixers]
            symbols.append("[" + "".join(inner) + "]")
        else:
            symbols.append(get_block(name).symbol)
    return "".join(symbols)


def _check_period(period: int | None, offset: int, name: str) -> None:
    if period is None:
        return
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"{name}_layer_period: must be a positive integer; got {period!r}")
    if not isinstance(offset, int) or not 0 <= offset < period:
        raise ValueError(
            f"{name}_layer_offset: must be an integer in [0, {name}_layer_period={period}); "
            f"got {offset!r}"
        )


def pattern_from_periods(
    n_layers: int,
    attn_layer_period: int | None,
    attn_layer_offset: int = 0,
    expert_layer_period: int | None = None,
    expert_layer_offset: int = 0,
    *,
    mixer: str = "mamba1",
) -> str:
    """Jamba's layout: layer ``i`` is a mixer then a feed-forward, two sublayers.

    The mixer is attention where ``i % attn_layer_period == attn_layer_offset`` and ``mixer``
    elsewhere; the feed-forward is ``moe`` where ``i % expert_layer_period ==
    expert_layer_offset`` and ``mlp`` elsewhere. A period of None means never.

    >>> pattern_from_periods(8, 8, 4, 2, 1)  # one Jamba block
    'S-SES-SE*-SES-SE'
    """
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers: must be a positive integer; got {n_layers!r}")
    _check_period(attn_layer_period, attn_layer_offset, "attn")
    _check_period(expert_layer_period, expert_layer_offset, "expert")
    mixer_spec = get_block(mixer, where="mixer")
    if mixer_spec.role != "mixer":
        raise ValueError(f"mixer: {mixer!r} is a {mixer_spec.role} block, not a token mixer")
    attn, mlp, moe = (get_block(name).symbol for name in ("attention", "mlp", "moe"))
    symbols = []
    for i in range(n_layers):
        is_attn = attn_layer_period is not None and i % attn_layer_period == attn_layer_offset
        is_moe = expert_layer_period is not None and i % expert_layer_period == expert_layer_offset
        symbols.append((attn if is_attn else mixer_spec.symbol) + (moe if is_moe else mlp))
    return "".join(symbols)


def _find_period(flags: list[bool]) -> tuple[int | None, int]:
    """Smallest (period, offset) with flags[i] == (i % period == offset); (None, 0) if none set.

    A single set flag gets the period ``len(flags)``, as Jamba writes one attention per block.
    """
    if not any(flags):
        return None, 0
    n = len(flags)
    if flags.count(True) == 1:  # any long period fits; the whole length is the natural one
        return n, flags.index(True)
    for period in range(1, n + 1):
        offset = flags.index(True)
        if offset < period and all(flag == (i % period == offset) for i, flag in enumerate(flags)):
            return period, offset
    raise ValueError("pattern: its positions are not periodic, so Jamba periods cannot express it")


def periods_from_pattern(pattern: Pattern) -> dict[str, Any]:
    """Inverse of :func:`pattern_from_periods`: the keyword arguments that rebuild ``pattern``.

    Raises:
        ValueError: if the pattern is not alternating mixer / feed-forward with one non-attention
            mixer kind and periodic attention and MoE positions.
    """
    names = [name for name, _ in parse_pattern(pattern)]
    if len(names) % 2:
        raise ValueError("pattern: Jamba periods need (mixer, feed-forward) pairs; odd length")
    mixers, feedforwards = names[0::2], names[1::2]
    if any(get_block(n).role != "mixer" for n in mixers) or any(
        n not in ("mlp", "moe") for n in feedforwards
    ):
        raise ValueError("pattern: Jamba periods need alternating mixer and mlp/moe sublayers")
    other_mixers = sorted({n for n in mixers if n != "attention"})
    if len(other_mixers) > 1:
        raise ValueError(
            f"pattern: Jamba periods allow one non-attention mixer; got {other_mixers}"
        )
    attn_period, attn_offset = _find_period([n == "attention" for n in mixers])
    expert_period, expert_offset = _find_period([n == "moe" for n in feedforwards])
    return {
        "n_layers": len(mixers),
        "attn_layer_period": attn_period,
        "attn_layer_offset": attn_offset,
        "expert_layer_period": expert_period,
        "expert_layer_offset": expert_offset,
        "mixer": other_mixers[0] if other_mixers else "mamba1",
    }


def _spread(slots: list[int], count: int, section: float) -> list[int]:
    """Pick ``count`` of ``slots`` spread evenly, as Megatron-LM's allocator does.

    The walk starts an accumulator at ``section`` (the run length wanted between picks), takes
    a slot when the accumulator is below 0.5 (then adds ``section``), else subtracts one.
    """
    picked, accumulator = [], section
    for slot in slots:
        if len(picked) == count:
            break
        if accumulator < 0.5:
            picked.append(slot)
            accumulator += section
        else:
            accumulator -= 1
    return picked


def pattern_from_ratios(
    n_sublayers: int, attention: float = 0.0, mlp: float = 0.0, *, mixer: str = "mamba2"
) -> str:
    """Megatron-LM's hybrid allocation from target ratios.

    ``round(n * attention)`` attention sublayers are spread so that the stack starts and ends
    with ``mixer`` sections; then ``round(n * mlp)`` of the remaining mixer slots become MLPs,
    spread the same way.

    >>> pattern_from_ratios(56, attention=0.08, mlp=0.5)
    'M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-'
    """
    if not isinstance(n_sublayers, int) or n_sublayers < 1:
        raise ValueError(f"n_sublayers: must be a positive integer; got {n_sublayers!r}")
    for name, ratio in (("attention", attention), ("mlp", mlp)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{name}: ratio must be in [0, 1]; got {ratio}")
    n_attention, n_mlp = round(n_sublayers * attention), round(n_sublayers * mlp)
    for name, ratio, count in (("attention", attention, n_attention), ("mlp", mlp, n_mlp)):
        if ratio > 0 and count == 0:
            raise ValueError(
                f"{name}: ratio {ratio} gives round({n_sublayers} * {ratio}) = 0 sublayers; "
                "raise the ratio or the sublayer count"
            )
    if n_attention + n_mlp > n_sublayers:
        raise ValueError(
            f"attention, mlp: ratios {attention} + {mlp} need {n_attention} + {n_mlp} sublayers, "
            f"more than n_sublayers={n_sublayers}"
        )
    mixer_symbol = get_block(mixer, where="mixer").symbol
    symbols = [mixer_symbol] * n_sublayers
    if n_attention:
        # Attention splits the mixers into n_attention + 1 equal sections.
        section = (n_sublayers - n_attention) / (n_attention + 1)
        for i in _spread(list(range(n_sublayers)), n_attention, section):
            symbols[i] = get_block("attention").symbol
    if n_mlp:
        mixer_slots = [i for i, s in enumerate(symbols) if s == mixer_symbol]
        section = (len(mixer_slots) - n_mlp) / n_mlp
        for i in _spread(mixer_slots, n_mlp, section):
            symbols[i] = get_block("mlp").symbol
    return "".join(symbols)


def ratios_from_pattern(pattern: Pattern) -> dict[str, Any]:
    """Inverse of :func:`pattern_from_ratios`: the arguments that rebuild ``pattern``.

    Raises:
        ValueError: if the pattern uses blocks other than one mixer, attention and mlp, or its
            positions are not the ones Megatron-LM's allocation produces.
    """
    names = [name for name, _ in parse_pattern(pattern)]
    mixers = sorted(set(names) - {"attention", "mlp"})
    if len(mixers) > 1:
        raise ValueError(f"pattern: ratios allow one mixer besides attention; got {mixers}")
    mixer = mixers[0] if mixers else "mamba2"
    n = len(names)
    arguments = {
        "n_sublayers": n,
        "attention": names.count("attention") / n,
        "mlp": names.count("mlp") / n,
        "mixer": mixer,
    }
    rebuilt = pattern_from_ratios(**arguments)
    if rebuilt != pattern_string(names):
        raise ValueError(
            f"pattern: not a Megatron ratio allocation (the same ratios give {rebuilt!r})"
        )
    return arguments
