"""Helpers that block (and model) options use to build and check themselves.

Every check fails with a one-line ``ValueError("{where}: {message}")``, so an invalid config names
the field at fault and what it allows.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
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
    hints = field_types(options_class)
    for key, value in values.items():
        check_type(value, hints[key], f"{where}.{key}")
    return options_class(**values)


def merge_options(options: Any, overrides: dict[str, Any], where: str) -> Any:
    """A copy of ``options`` with ``overrides`` applied (unknown keys fail like build_options)."""
    build_options(type(options), overrides, where)  # key and type checks only
    return dataclasses.replace(options, **overrides)


@functools.cache
def field_types(options_class: type) -> dict[str, Any]:
    """The resolved type annotation of each field of a dataclass."""
    return typing.get_type_hints(options_class)


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return {"int": "an integer", "float": "a finite number", "bool": "true or false",
                "str": "a string", "dict": "a mapping", "list": "a list"}.get(
            annotation.__name__, annotation.__name__)  # fmt: skip
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} numbers" if all(a is float for a in args) else "a list"
        return "a list of numbers" if args == (float,) else "a list"
    return str(annotation)


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (plain data from YAML / JSON / Python) fits ``annotation``; types this
    does not know (``Any``, classes of options) are accepted, their own checks decide."""
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if annotation in (str, dict, list):
        return isinstance(value, annotation)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False
            pairs = zip(value, args, strict=True)
        else:
            pairs = ((item, args[0] if args else Any) for item in value)
        # Inside lists, numbers may be infinite (dt_limit's upper end), never NaN.
        return all(_matches_item(item, arg) for item, arg in pairs)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _matches_item(value: Any, annotation: Any) -> bool:
    if annotation is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and not math.isnan(value)
    return _matches(value, annotation)


def check_type(value: Any, annotation: Any, where: str) -> None:
    """Fail with one line naming ``where`` unless ``value`` fits the field's annotation
    (numbers must be finite; bools are not numbers)."""
    if _matches(value, annotation):
        return
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        allowed = " or ".join(_type_name(arg) for arg in args)
    else:
        allowed = _type_name(annotation)
    raise ValueError(f"{where}: must be {allowed}, got {value!r}")


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
