"""The ``hybrid`` command line. User errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid", description="Build, train and evaluate hybrid transformer / SSM models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser(
        "info",
        help="parameters and inference-cache bytes per sublayer",
        description="Per-sublayer table of a pattern or a recipe's model: parameters, active "
        "parameters (MoE: top-k experts) and inference-cache bytes per sequence.",
    )
    info.add_argument("source", metavar="PATTERN_OR_RECIPE", help='e.g. "M-M*-ME" or a YAML file')
    info.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. attention.n_heads=8")
    info.add_argument("--context", type=int, default=32768, help="context length (tokens)")
    info.add_argument("--d-model", type=int, default=None, help="width (pattern only; default 512)")
    info.add_argument("--vocab-size", type=int, default=None, help="vocabulary (default 32000)")
    info.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="cache dtype")
    return parser


def run_info(args: argparse.Namespace) -> None:
    from hybrid.info import describe, format_info, load_model_config

    if args.context < 1:
        raise ValueError(f"--context: must be a positive integer; got {args.context}")
    config = load_model_config(
        args.source, args.overrides, d_model=args.d_model, vocab_size=args.vocab_size
    )
    print(format_info(describe(config, args.context, DTYPES[args.dtype])))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (``info M* --context 8 d_model=64``), which argparse's
    # positional handling cannot interleave, so the leftovers are taken as overrides.
    args, leftover = parser.parse_known_args(argv)
    unknown = [arg for arg in leftover if arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *leftover]
    try:
        {"info": run_info}[args.command](args)
    except ValueError as error:
        print(f"hybrid {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
