"""Helpers that block (and model) options use to build and check themselves.

Every check fails with a one-line ``ValueError("{where}: {message}")``, so an invalid config names
the field at fault and what it allows.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any


def build_options(options_class: type, values: dict[str, Any] | Any, where: str) -> Any:
    """Make an options dataclass from a mapping, naming ``where`` in errors.

    ``values`` may already be an instance of ``options_class``. Unknown keys fail with the
    closest valid key suggested.
    """
    if isinstance(values, options_class):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of options, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(options_class)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{where}.{key}: unknown option; {hint}valid: {', '.join(names)}")
    return options_class(**values)


def merge_options(options: Any, overrides: dict[str, Any], where: str) -> Any:
    """A copy of ``options`` with ``overrides`` applied (unknown keys fail like build_options)."""
    build_options(type(options), overrides, where)  # key check only
    return dataclasses.replace(options, **overrides)


def require(condition: bool, where: str, message: str) -> None:
    """Raise a one-line ``ValueError("{where}: {message}")`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"{where}: {message}")


def require_positive_int(value: Any, where: str) -> None:
    """Fail unless ``value`` is an int > 0 (bools rejected)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    require(ok, where, f"must be a positive integer, got {value!r}")


def require_finite_number(value: Any, where: str) -> float:
    """``value`` as a float; fails unless it is a finite real number (bools and strings
    rejected)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    require(ok, where, f"must be a finite number, got {value!r}")
    return float(value)


def require_choice(value: Any, choices: tuple[str, ...], where: str) -> None:
    """Fail unless ``value`` is one of ``choices``, listing them."""
    require(value in choices, where, f"must be one of {', '.join(choices)}; got {value!r}")
