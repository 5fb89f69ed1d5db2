"""Dotted ``key=value`` overrides of nested mappings (``attention.n_heads=8``), and the YAML
loader every recipe goes through."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, except that ``1e-6`` and ``3E+4`` (exponent without a dot)
    are floats, as in YAML 1.2 and JSON, instead of strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely (no object construction), with ``1e-6`` read as a float."""
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b.c=value`` set; values are parsed as YAML scalars.

    Raises:
        ValueError: an override without ``=`` or that descends into a non-mapping.
    """
    result = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r}: expected key=value (e.g. d_model=256)")
        try:
            value = load_yaml(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ValueError(f"override {override!r}: {prefix} is not a mapping")
            node = child
        node[parts[-1]] = value
    return result
