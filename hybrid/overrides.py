"""Dotted ``key=value`` overrides of nested mappings (``attention.n_heads=8``)."""

from __future__ import annotations

import copy
from typing import Any

import yaml


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
            value = yaml.safe_load(raw) if raw else ""
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
