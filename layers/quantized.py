"""Weights stored in 8 or 4 bits with scales, for inference: the storage and the modules.

torchao does the arithmetic (``choose_qparams_affine``, ``quantize_affine``,
``dequantize_affine``); what it lacks on CPU in 0.18 is kept here: int4 codes packed two per
byte (its CPU int4 weights are int8-sized) and stacked MoE expert weights (its configs handle
``nn.Linear`` only). torchao's own ``Int8WeightOnlyConfig`` is an opt-in for int8
``nn.Linear`` layers (see :mod:`hybrid.quantize`).

Schemes, for a weight (..., out, in) quantized along its last dimension:

- ``int8``: symmetric, one float32 scale per output row; ``w = q * scale``, q in [-127, 127].
- ``int4``: asymmetric, one float16 scale and one uint4 zero point per group of
  ``group_size`` inputs; ``w = (q - zero) * scale``, q in [0, 15], two codes per byte (even
  input index in the low nibble). 4.75 bits per weight with groups of 32.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32  # llama.cpp's Q4 block; torchao's default is 128


def torchao_primitives() -> Any:
    """``torchao.quantization.quant_primitives``, imported quietly (torchao logs a warning for
    each CUDA-only extension it cannot load on a CPU build).

    Raises:
        ImportError: one line saying how to install torchao.
    """
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import quant_primitives
    except ImportError:
        raise ImportError(
            "quantization needs torchao: pip install 'hybrid[quant]' (or pip install torchao)"
        ) from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return quant_primitives


def check_group_size(group_size: int, width: int, where: str) -> None:
    """One-line error unless ``group_size`` is a positive even divisor of ``width``."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(f"group_size: must be an even integer >= 2; got {group_size!r}")
    if group_size % 2 or width % group_size:
        raise ValueError(
            f"group_size: {group_size} does not divide the input width {width} of {where} "
            "(int4 groups must tile each row; pick a divisor, e.g. 32)"
        )


class QuantizedWeight(nn.Module):
    """A weight (..., out, in) held as int8 / packed int4 codes with scales (buffers).

    Buffers: ``qdata`` (..., out, in) int8 for int8, (..., out, in / 2) uint8 for int4;
    ``scale`` (..., out, 1) float32 for int8, (..., out, in / group_size) float16 for int4;
    ``zero`` (..., out, in / group_size) uint8 for int4 (absent for int8).
    """

    def __init__(
        self, weight: torch.Tensor, scheme: str, group_size: int = DEFAULT_GROUP_SIZE
    ) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"quantize: unknown scheme {scheme!r}; choose one of {SCHEMES}")
        prims = torchao_primitives()
        self.scheme, self.shape, self.dtype = scheme, tuple(weight.shape), weight.dtype
        width = weight.shape[-1]
        w = weight.detach().float().reshape(-1, width)  # (rows, in)
        if scheme == "int8":
            self.group_size = width
            block = (1, width)
            scale, zero = prims.choose_qparams_affine(
                w, prims.MappingType.SYMMETRIC, block, torch.int8, -127, 127
            )  # zero: all zeros for a symmetric mapping
            q = prims.quantize_affine(w, block, scale, zero, torch.int8, -127, 127)
            self.register_buffer("qdata", q.reshape(self.shape))
            self.register_buffer("scale", scale.float().reshape(*self.shape[:-1], 1))
            self.zero = None
        else:
            self.group_size = group_size
            block = (1, group_size)
            scale, zero = prims.choose_qparams_affine(
                w, prims.MappingType.ASYMMETRIC, block, torch.uint8, 0, 15,
                scale_dtype=torch.float16, zero_point_dtype=torch.uint8,
            )  # fmt: skip
            q = prims.quantize_affine(w, block, scale, zero, torch.uint8, 0, 15)
            packed = q[:, 0::2] | (q[:, 1::2] << 4)
            groups = width // group_size
            self.register_buffer("qdata", packed.reshape(*self.shape[:-1], width // 2))
            self.register_buffer("scale", scale.reshape(*self.shape[:-1], groups))
            self.register_buffer("zero", zero.to(torch.uint8).reshape(*self.shape[:-1], groups))

    def codes(self) -> torch.Tensor:
        """The integer codes (..., out, in): int8 in [-127, 127] or uint8 in [0, 15]."""
        if self.scheme == "int8":
            return self.qdata
        low, high = self.qdata & 15, self.qdata >> 4
        return torch.stack([low, high], -1).flatten(-2)

    def dequantize(self, index: int | torch.Tensor | None = None) -> torch.Tensor:
        """The float weight (in the dtype it was quantized from), all of it or ``self[index]``
        along the first dimension (an expert, or embedding rows)."""
        pick = (lambda t: t) if index is None else (lambda t: None if t is None else t[index])
        qdata, scale, zero = pick(self.qdata), pick(self.scale), pick(self.zero)
        if self.scheme == "int8":
            return (qdata.to(torch.float32) * scale).to(self.dtype)
        codes = torch.stack([qdata & 15, qdata >> 4], -1).flatten(-2)  # (..., in)
        grouped = codes.unflatten(-1, (-1, self.group_size)).to(torch.float32)
        weight = (grouped - zero[..., None].float()) * scale[..., None].float()
        return weight.flatten(-2).to(self.dtype)

    def __getitem__(self, index: int | torch.Tensor) -> torch.Tensor:
        return self.dequantize(index)

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def numel(self) -> int:
        """Elements of the float weight it stands for."""
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zero points."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"{self.scheme}, shape={self.shape}{group}"


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with a :class:`QuantizedWeight`: dequantize, then matmul.

    Shapes: (..., in_features) -> (..., out_features).
    """

    def __init__(self, linear: nn.Linear, scheme: str, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = QuantizedWeight(linear.weight, scheme, group_size)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> Any:
        """A layer over an existing quantized weight (a tied output head)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = weight.shape
        layer.weight, layer.bias = weight, bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.scheme == "int8":  # (x @ q^T) * scale: the row scale goes on the outputs
            y = F.linear(x, weight.qdata.to(x.dtype)) * weight.scale.squeeze(-1).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, weight.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` with a :class:`QuantizedWeight`: only the looked-up rows are
    dequantized. Shapes: ids (...) -> (..., embedding_dim)."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.dequantize(ids)
