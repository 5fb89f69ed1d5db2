"""What every ``hybrid`` subcommand parses with: a parser whose errors are one line on stderr
and exit code 2, and the table of dtype names the options take."""

from __future__ import annotations

import argparse
from typing import NoReturn

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = ("int8", *DTYPES)  # --kv-dtype: int8 keys / values with scales, or a float dtype


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2 (no usage
    block; ``--help`` still prints it). Its subcommand parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def add_precision_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--quantize``, ``--group-size``, ``--kv-dtype`` and ``--state-dtype`` (generate, eval)."""
    parser.add_argument(
        "--quantize", choices=("int8", "int4"), default=None,
        help="weight-only quantization of the projections (torchao): int8 (per-row scales) "
        "or int4 (group-wise scales and zero points)",
    )  # fmt: skip
    parser.add_argument(
        "--group-size", type=int, default=None, metavar="N",
        help="inputs per int4 scale (default 32; must divide every quantized width)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-dtype", choices=KV_DTYPES, default=None,
        help="attention cache keys / values: int8 (per-token, per-head scales) or a float dtype "
        "(default: the weights')",
    )  # fmt: skip
    parser.add_argument(
        "--state-dtype", choices=sorted(DTYPES), default=None,
        help="SSM cache states (default float32; bfloat16 halves them)",
    )  # fmt: skip


def apply_precision(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, object]:
    """Quantize ``model`` and set its cache precision as the options say; returns them (for
    results metadata). One-line ``ValueError`` naming the option on bad values."""
    from hybrid.inference.cache import CachePrecision
    from hybrid.quantize import quantize

    if args.quantize is None and args.group_size is not None:
        raise ValueError("--group-size: only with --quantize int4")
    if args.quantize is not None:
        if args.quantize == "int8" and args.group_size is not None:
            raise ValueError("--group-size: int8 uses one scale per output row; it is for int4")
        try:
            quantize(model, args.quantize, group_size=args.group_size)
        except ValueError as error:
            message = str(error)
            if message.startswith("group_size:"):
                message = "--group-size:" + message.removeprefix("group_size:")
            raise ValueError(message) from None
    model.cache_precision = CachePrecision.of(kv_dtype=args.kv_dtype, state_dtype=args.state_dtype)
    return {
        "quantize": args.quantize,
        "group_size": getattr(getattr(model, "quantization", None), "group_size", None),
        "kv_dtype": args.kv_dtype,
        "state_dtype": args.state_dtype,
    }


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device: {name}: this machine has {torch.cuda.device_count()} GPUs")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {name!r}: only cpu and cuda devices are supported")
    return device


TRUST_HELP = (
    "allow the checkpoint's config to import the Python modules it lists (modules: ...), which "
    "runs their code; only for checkpoints you trust"
)
