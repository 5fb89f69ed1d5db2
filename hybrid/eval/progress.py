"""Work items in batches, behind a tqdm progress bar (on stderr)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")


def batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    """Consecutive slices of ``items`` of ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def progress_bar(total: int, description: str, enabled: bool) -> tqdm:
    """A progress bar over ``total`` work items (a silent one when not ``enabled``)."""
    return tqdm(total=total, desc=description, unit="item", disable=not enabled, leave=False)
