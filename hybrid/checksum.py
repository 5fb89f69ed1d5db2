"""A checksum over tensor data, for the file formats that carry none (safetensors checks its
header, not the bytes of its tensors): a flipped bit in a weight or a cache state must fail
loading with a clear error, never give silently wrong numbers.

The digest is SHA-256 over every tensor in name order: its name, dtype, shape and raw bytes.
Safetensors files (model weights, inference caches) store it in their metadata under
:data:`METADATA_KEY`; training checkpoints store :func:`structure_digest` of their whole
content under :data:`CHECKPOINT_KEY`. Files written before either existed load unchecked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

METADATA_KEY = "hybrid_sha256"
CHECKPOINT_KEY = "hybrid_sha256"  # the same digest of a whole .ckpt's content, stored inside it


def _update(digest: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        data = tensor.contiguous().cpu().reshape(-1).view(torch.uint8)
        digest.update(memoryview(data.numpy()))


def structure_digest(content: Any) -> str:
    """Hex SHA-256 of nested dicts / lists / tuples of tensors and plain values (a Lightning
    checkpoint): every key, every value's repr and every tensor's bytes, in order. torch's
    zip format checks no CRC on load, so without this a flipped bit changes weights, optimizer
    moments or the step count silently."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(b"T")
            _update(digest, value)
        elif isinstance(value, dict):
            digest.update(f"{{{len(value)}".encode())
            for key, item in value.items():
                digest.update(f"{key!r}:".encode())
                feed(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"[{type(value).__name__}{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed(content)
    return digest.hexdigest()


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of ``tensors`` (names, dtypes, shapes and bytes; CPU copies are made of
    tensors elsewhere)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(f"{name}|".encode())
        _update(digest, tensors[name])
    return digest.hexdigest()


def verify_digest(tensors: Mapping[str, torch.Tensor], expected: str | None, where: str) -> None:
    """Fail with one line naming ``where`` if ``expected`` is given and ``tensors`` differ.

    Raises:
        ValueError: ``"{where}: tensor data do not match their checksum (the file is damaged)"``.
    """
    if expected is not None and tensor_digest(tensors) != expected:
        raise ValueError(f"{where}: tensor data do not match their checksum (the file is damaged)")
