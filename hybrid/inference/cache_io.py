"""Save a :class:`HybridCache` to one safetensors file and load it back into a model.

This lets one process prefill a prompt and another continue decoding from the saved state
(prefill/decode disaggregation), or park a long conversation on disk.

File layout:

- tensors ``layers.{i}.{field}`` — every tensor field of sublayer ``i``'s cache entry
  (``keys``, ``values``, ``key_index``, ``valid`` for attention; ``conv_state``,
  ``ssm_state`` for Mamba), contiguous, on CPU, in their own dtypes;
- tensor ``real_lengths`` — (batch,) int64;
- metadata key ``hybrid_cache`` — a JSON header: format name and version, the model config's
  fingerprint, ``batch_size``, ``max_seqlen``, ``length``, the cache ``dtype`` (that of keys,
  values and conv states), ``kv_dtype`` (``"int8"`` or a float dtype when keys and values
  differ from ``dtype``) and ``state_dtype`` (SSM states; both absent in older files) and,
  per sublayer, its entry type name and non-tensor fields (e.g. ``KVCache.window``), or null
  for stateless sublayers.

The file is written to a temporary name in the same directory and renamed over ``path``,
so a crash never leaves a partial file and an existing file is only replaced by a complete
one. Loading only reads the file. Metadata key ``hybrid_sha256`` holds a SHA-256 over the
tensor data (:mod:`hybrid.checksum`), so flipped bits inside tensors fail loading as surely as
truncation and a broken header do (files written before it load unchecked).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hybrid.atomic import atomic_write
from hybrid.checksum import METADATA_KEY, tensor_digest, verify_digest
from hybrid.inference.cache import CachePrecision, HybridCache
from layers.base import CacheEntry

if TYPE_CHECKING:
    from hybrid.model import HybridLM

FORMAT = "hybrid-cache"
VERSION = 1
HEADER_KEY = "hybrid_cache"


def save_cache(cache: HybridCache, path: str | Path) -> None:
    """Write ``cache`` to the safetensors file ``path``, atomically (temp file + rename).

    Raises:
        ValueError: an entry has a non-tensor field that JSON cannot hold.
        OSError: the directory is not writable (``path`` is left as it was).
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any] | None] = []
    for index, entry in enumerate(cache.entries):
        if entry is None:
            layers.append(None)
            continue
        layers.append({"type": type(entry).__name__, "fields": _plain_fields(entry, index)})
        for name, tensor in entry.tensors().items():
            tensors[f"layers.{index}.{name}"] = tensor
    tensors["real_lengths"] = cache.real_lengths
    header = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": cache.fingerprint,
        "batch_size": cache.batch_size,
        "max_seqlen": cache.max_seqlen,
        "length": cache.length,
        "dtype": cache.precision.names()["dtype"] or _cache_dtype(cache),
        "kv_dtype": cache.precision.names()["kv_dtype"],
        "state_dtype": cache.precision.names()["state_dtype"],
        "layers": layers,
    }
    tensors = _cpu_unshared(tensors)
    metadata = {HEADER_KEY: json.dumps(header), METADATA_KEY: tensor_digest(tensors)}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def load_cache(
    model: HybridLM, path: str | Path, *, device: torch.device | str | None = None
) -> HybridCache:
    """Read a cache written by :func:`save_cache` into a fresh cache of ``model``.

    ``device``: where the cache tensors go (default: the model's device).

    Raises:
        ValueError: one line starting with ``path``: missing file, not a (complete)
            safetensors file, missing header or another format version, a cache from a model
            with another config, or layers / entry types / tensors that do not match.
    """
    where = str(path)
    if not os.path.exists(path):
        raise ValueError(f"{where}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"{where}: not a regular file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            header = _parse_header(metadata, where)
            fingerprint = model.config.fingerprint()
            if header["fingerprint"] != fingerprint:
                raise ValueError(
                    f"{where}: cache was written by a model with another config (fingerprint "
                    f"{header['fingerprint']}, this model {fingerprint})"
                )
            n_layers = len(model.config.layers)
            if len(header["layers"]) != n_layers:
                raise ValueError(
                    f"{where}: cache has {len(header['layers'])} layers, the model {n_layers}"
                )
            names = set(file.keys())

            def allocate(device: str | None = None) -> HybridCache:
                try:
                    return model.allocate_cache(
                        header["batch_size"],
                        header["max_seqlen"],
                        header["dtype"],
                        # explicit, so the model's own cache_precision does not apply
                        kv_dtype=header.get("kv_dtype") or header["dtype"],
                        state_dtype=header.get("state_dtype")
                        or torch.promote_types(header["dtype"] or torch.float32, torch.float32),
                        device=device,
                    )
                except ValueError as error:
                    raise ValueError(f"{where}: cannot allocate the saved cache: {error}") from None

            # The header's sizes against the stored tensors' shapes, before any memory is
            # taken: an edited batch_size or max_seqlen must not allocate what it claims.
            _check_shapes(file, names, allocate("meta"), where)
            cache = allocate()
            if device is not None:
                _move_cache(cache, torch.device(device))
            expected = {"real_lengths"}
            for index, (entry, saved) in enumerate(
                zip(cache.entries, header["layers"], strict=True)
            ):
                expected |= _load_entry(file, names, entry, saved, index, where)
            if names != expected:
                raise ValueError(
                    f"{where}: tensors differ from the header: unexpected "
                    f"{sorted(names - expected)}, missing {sorted(expected - names)}"
                )
            real_lengths = file.get_tensor("real_lengths")
            stored = {name: file.get_tensor(name) for name in names}
            verify_digest(stored, metadata.get(METADATA_KEY), where)
    except (SafetensorError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{where}: not a readable safetensors cache file ({message})") from None

    if real_lengths.shape != (cache.batch_size,) or real_lengths.dtype != torch.long:
        raise ValueError(
            f"{where}: real_lengths: saved {tuple(real_lengths.shape)} {real_lengths.dtype}, "
            f"expected ({cache.batch_size},) torch.int64"
        )
    cache.real_lengths.copy_(real_lengths)
    cache.length = header["length"]
    return cache


def _plain_fields(entry: CacheEntry, index: int) -> dict[str, Any]:
    """The non-tensor dataclass fields of ``entry``, checked to survive JSON unchanged."""
    fields = entry.plain_fields()
    try:
        if json.loads(json.dumps(fields)) == fields:
            return fields
    except (TypeError, ValueError):
        pass
    raise ValueError(
        f"layers[{index}]: {type(entry).__name__} has non-tensor fields JSON cannot hold: {fields}"
    )


def _cache_dtype(cache: HybridCache) -> str | None:
    """Name of the dtype the cache was allocated with (keys, values, conv states).

    It is the narrowest floating dtype among the entries' tensors: SSM states are kept in
    float32 (or wider), everything else floating is in the allocation dtype. None when no
    entry holds a floating tensor (the model's dtype is then as good as any).
    """
    dtypes = {
        tensor.dtype
        for entry in cache.entries
        if entry is not None
        for tensor in entry.tensors().values()
        if tensor.is_floating_point()
    }
    if not dtypes:
        return None
    narrowest = min(dtypes, key=lambda dtype: (torch.finfo(dtype).bits, str(dtype)))
    return str(narrowest).removeprefix("torch.")


def _cpu_unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors, none sharing storage (safetensors refuses shared)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(pointer)
        out[name] = tensor
    return out


def _parse_header(metadata: dict[str, str], where: str) -> dict[str, Any]:
    """The JSON header, with its format, version and field types checked."""
    if HEADER_KEY not in metadata:
        raise ValueError(f"{where}: no {HEADER_KEY!r} header; not a file written by save_cache")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: corrupt cache header ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{where}: header is not a {FORMAT!r} header")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{where}: cache format version {header.get('version')!r}; this code reads {VERSION}"
        )
    types = {
        "fingerprint": str,
        "batch_size": int,
        "max_seqlen": int,
        "length": int,
        "layers": list,
        "dtype": (str, type(None)),
    }
    for key, kind in types.items():
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise ValueError(f"{where}: corrupt cache header: bad or missing {key!r}")
    if not 0 <= header["length"] <= header["max_seqlen"]:
        raise ValueError(
            f"{where}: corrupt cache header: length {header['length']} outside "
            f"[0, max_seqlen={header['max_seqlen']}]"
        )
    for key in ("kv_dtype", "state_dtype"):  # absent from files of earlier versions
        if not isinstance(header.get(key), (str, type(None))):
            raise ValueError(f"{where}: corrupt cache header: bad {key!r}")
        try:
            CachePrecision.of(**{key: header.get(key)})
        except ValueError as error:
            raise ValueError(f"{where}: corrupt cache header: {error}") from None
    if header["dtype"] is not None:
        dtype = getattr(torch, header["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{where}: corrupt cache header: unknown dtype {header['dtype']!r}")
        header["dtype"] = dtype
    for index, layer in enumerate(header["layers"]):
        valid = layer is None or (
            isinstance(layer, dict)
            and isinstance(layer.get("type"), str)
            and isinstance(layer.get("fields"), dict)
        )
        if not valid:
            raise ValueError(f"{where}: corrupt cache header: layers[{index}] is {layer!r}")
    return header


def _move_cache(cache: HybridCache, device: torch.device) -> None:
    """Move every tensor of ``cache`` to ``device`` in place."""
    for entry in cache.entries:
        if entry is not None:
            for name, tensor in entry.tensors().items():
                entry.set_tensor(name, tensor.to(device))
    cache.real_lengths = cache.real_lengths.to(device)


def _check_shapes(file: Any, names: set[str], expected: HybridCache, where: str) -> None:
    """Fail unless every stored tensor has the shape a cache of the header's sizes has."""
    shapes = {"real_lengths": (expected.batch_size,)}
    for index, entry in enumerate(expected.entries):
        if entry is not None:
            for name, tensor in entry.tensors().items():
                shapes[f"layers.{index}.{name}"] = tuple(tensor.shape)
    for name, shape in shapes.items():
        if name not in names:
            continue  # reported with the other missing tensors
        stored = tuple(file.get_slice(name).get_shape())
        if stored != shape:
            raise ValueError(
                f"{where}: {name} holds shape {stored}, but the header's batch_size "
                f"{expected.batch_size} and max_seqlen {expected.max_seqlen} give {shape}"
            )


def _load_entry(
    file: Any,
    names: set[str],
    entry: CacheEntry | None,
    saved: dict[str, Any] | None,
    index: int,
    where: str,
) -> set[str]:
    """Fill ``entry`` from ``file`` (after checking its type and settings match ``saved``).

    Returns the tensor names it used.
    """
    own_type = "no entry" if entry is None else type(entry).__name__
    saved_type = "no entry" if saved is None else saved["type"]
    layer = f"{where}: layers[{index}]"
    if saved_type != own_type:
        raise ValueError(f"{layer}: saved cache entry is {saved_type}, the model's is {own_type}")
    if entry is None or saved is None:
        return set()
    own_fields = _plain_fields(entry, index)
    if saved["fields"] != own_fields:
        raise ValueError(
            f"{layer}: {own_type} settings differ: saved {saved['fields']}, model {own_fields}"
        )
    prefix = f"layers.{index}."
    used = {name for name in names if name.startswith(prefix)}
    order = [*entry.tensors(), *sorted(name[len(prefix) :] for name in used)]  # fields first
    tensors = {
        field: file.get_tensor(prefix + field)
        for field in dict.fromkeys(order)
        if prefix + field in used
    }
    try:
        entry.load_tensors(tensors)
    except ValueError as error:
        raise ValueError(f"{layer} ({own_type}): {error}") from None
    return used
