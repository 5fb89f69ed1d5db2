"""The ``hybrid`` command: its parser and the ``info``, ``train``, ``generate`` and ``convert``
subcommands (``eval`` is :mod:`hybrid.cli.eval`). User errors print one line and exit 2, never
a traceback."""

from __future__ import annotations

import argparse
import sys

import torch

from hybrid.cli.parsing import (
    DTYPES,
    KV_DTYPES,
    TRUST_HELP,
    OneLineParser,
    add_precision_arguments,
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="hybrid", description="Build, train and evaluate hybrid transformer / SSM models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser(
        "info",
        help="parameters and inference-cache bytes per sublayer",
        description="Per-sublayer table of a pattern's, a recipe's or a checkpoint's model: "
        "parameters, active "
        "parameters (MoE: top-k experts) and inference-cache bytes per sequence.",
    )
    info.add_argument(
        "source", metavar="SOURCE",
        help='a pattern ("M-M*-ME"), a recipe YAML file, or a checkpoint directory (ours, a run '
        "directory, or a transformers model)",
    )  # fmt: skip
    info.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. attention.n_heads=8")
    info.add_argument("--context", type=int, default=32768, help="context length (tokens)")
    info.add_argument("--d-model", type=int, default=None, help="width (pattern only; default 512)")
    info.add_argument("--vocab-size", type=int, default=None, help="vocabulary (default 32000)")
    info.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="cache dtype")
    info.add_argument(
        "--kv-dtype", choices=KV_DTYPES, default=None,
        help="attention keys / values: int8 (per-token, per-head float16 scales) or a float "
        "dtype (default: --dtype)",
    )  # fmt: skip
    info.add_argument(
        "--state-dtype", choices=sorted(DTYPES), default=None,
        help="SSM states (default float32)",
    )  # fmt: skip
    train = commands.add_parser(
        "train",
        help="train a model from a YAML recipe (Lightning; W&B + CSV tracking)",
        description="Train from a recipe. Any recipe field can be overridden with a dotted "
        "KEY=VALUE after the recipe (e.g. optim.lr=3e-4 trainer.max_steps=100); values are "
        "YAML scalars. The run directory is {output_dir}/{name}.",
    )
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=3e-4")
    train.add_argument(
        "--resume", action="store_true", help="continue the run from its checkpoints/last.ckpt"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--trust-remote-code", action="store_true",
        help="let the init_from checkpoint's config import the modules it lists (runs their "
        "code; the recipe's own modules need no flag)",
    )  # fmt: skip
    generate = commands.add_parser(
        "generate",
        help="stream a continuation of a prompt from a checkpoint",
        description="Load a checkpoint directory (config.json + model.safetensors, and "
        "tokenizer.json if present, else byte-level) and stream a continuation of --prompt.",
    )
    generate.add_argument("--checkpoint", required=True, help="checkpoint directory")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--min-p", type=float, default=0.0)
    generate.add_argument("--repetition-penalty", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    add_precision_arguments(generate)
    generate.add_argument(
        "--compile", action="store_true",
        help="compile the decode step with torch.compile first (pays for long generations; "
        "the default eager step needs no wait)",
    )  # fmt: skip
    convert = commands.add_parser(
        "convert",
        help="convert between transformers model directories and ours",
        description="--from-hf DIR: a transformers directory (llama, mamba, falcon_mamba, "
        "mamba2, bamba, jamba, nemotron_h, qwen3_next, lfm2, falcon_h1, granitemoehybrid, "
        "olmo_hybrid, kimi_linear) to our checkpoint; --to-hf PATH --model-type TYPE: ours (a "
        "model or run directory, or a training .ckpt) to transformers.",
    )
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR", help="transformers model directory")
    direction.add_argument(
        "--to-hf", metavar="PATH", help="our model directory, run directory or .ckpt file"
    )
    convert.add_argument("--model-type", help="transformers model type (with --to-hf)")
    convert.add_argument("--out", required=True, help="directory to write")
    convert.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    commands.add_parser(
        "eval",
        help="long-context evaluations of a checkpoint: passkey, niah, ppl, decode, ...",
        description="hybrid eval TASK --checkpoint PATH [options]; hybrid eval --help lists the "
        "tasks, hybrid eval TASK --help a task's options.",
        add_help=False,
    )
    return parser


def run_convert(args: argparse.Namespace) -> None:
    from hybrid.checkpoint import load_model, resolve_checkpoint, save_pretrained
    from hybrid.convert import copy_tokenizer, from_hf, to_hf
    from hybrid.outputs import require_output_dir
    from hybrid.tokenizer import HFTokenizer, load_tokenizer

    require_output_dir(args.out, "--out")
    if args.from_hf:
        save_pretrained(from_hf(args.from_hf), args.out)
        copy_tokenizer(args.from_hf, args.out)
        print(f"wrote {args.out} (config.json, model.safetensors)")
        return
    if not args.model_type:
        raise ValueError("--model-type: required with --to-hf (e.g. bamba)")
    # Any checkpoint generate reads: a model directory, a run directory, a .ckpt file.
    source = resolve_checkpoint(args.to_hf)
    to_hf(load_model(source, trust_remote_code=args.trust_remote_code), args.out,
          args.model_type)  # fmt: skip
    if source.is_dir():
        copy_tokenizer(source, args.out)
    else:  # a training checkpoint: the tokenizer stored in it, if any
        tokenizer = load_tokenizer(source)
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save(args.out)
    print(f"wrote {args.out} ({args.model_type}: config.json, model.safetensors)")


def run_generate(args: argparse.Namespace) -> None:
    from hybrid.checkpoint import load_model
    from hybrid.cli.parsing import apply_precision, resolve_device
    from hybrid.inference.sampling import SamplingConfig
    from hybrid.tokenizer import load_tokenizer

    sampling = SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )
    args.device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.checkpoint)
    model = load_model(
        args.checkpoint, device=args.device, trust_remote_code=args.trust_remote_code
    )
    apply_precision(model, args)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt: empty after tokenization")
    input_ids = torch.tensor([ids], device=args.device)
    model.require_cache_fits(1, len(ids) + args.max_new_tokens)  # before the prompt is echoed
    decoder = tokenizer.decoder()
    if args.compile:
        model.compiled_decode_step()  # says it compiles (stderr) before the prompt is echoed
    print(args.prompt, end="", flush=True)
    tokens = model.stream(
        input_ids, args.max_new_tokens, sampling=sampling, seed=args.seed, compile=args.compile
    )
    for token in tokens:
        print(decoder.feed(int(token[0])), end="", flush=True)
    print()


def run_train(args: argparse.Namespace) -> int:
    from hybrid.recipe import load_recipe
    from hybrid.train.module import NonFiniteLossError
    from hybrid.train.run import last_checkpoint, perplexity, train

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        result = train(
            recipe, resume=args.resume, progress_bar=not args.no_progress,
            trust_remote_code=args.trust_remote_code,
        )  # fmt: skip
    except NonFiniteLossError as error:
        last = last_checkpoint(recipe)
        kept = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint was written"
        print(f"hybrid train: error: {error}; {kept}", file=sys.stderr)
        return 1
    if result.interrupted:
        by = f" by {result.signal_name}" if result.signal_name else ""
        print(
            f"interrupted{by} at step {result.steps}; saved {last_checkpoint(recipe)}; continue "
            f"with: hybrid train {args.recipe} {' '.join(args.overrides)} --resume".replace(
                "  ", " "
            ),
            file=sys.stderr,
        )
        # The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
        return 143 if result.signal_name == "SIGTERM" else 130
    if result.val_loss is not None:
        print(
            f"step {result.steps}: validation loss {result.val_loss:.4f} nats/token "
            f"(perplexity {perplexity(result.val_loss):.2f}); unigram baseline "
            f"{result.unigram_val_loss:.4f} nats/token"
        )
    if result.sample is not None:
        print(f"sample:\n{result.sample}")
    if result.loss_curve is not None:
        print(f"loss curve: {result.loss_curve}")
    print(f"run directory: {result.run_dir}")
    if result.wandb_offline_dir is not None:
        print(f"W&B ran offline; upload the run with: wandb sync {result.wandb_offline_dir}")
    return 0


def run_info(args: argparse.Namespace) -> None:
    from hybrid.accounting import describe
    from hybrid.cli.info import format_info
    from hybrid.recipe import load_model_config

    if args.context < 1:
        raise ValueError(f"--context: must be a positive integer; got {args.context}")
    config = load_model_config(
        args.source, args.overrides, d_model=args.d_model, vocab_size=args.vocab_size
    )
    info = describe(
        config, args.context, DTYPES[args.dtype], kv_dtype=args.kv_dtype,
        state_dtype=args.state_dtype,
    )  # fmt: skip
    print(format_info(info))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # its task decides its options: parsed by hybrid.cli.eval
        from hybrid.cli.eval import main as run_eval

        return run_eval(argv[1:])
    parser = build_parser()
    # Overrides may come after options (``info M* --context 8 d_model=64``), which argparse's
    # positional handling cannot interleave, so the leftovers are taken as overrides.
    args, leftover = parser.parse_known_args(argv)
    unknown = [arg for arg in leftover if arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *leftover]
    try:
        commands = {
            "info": run_info,
            "generate": run_generate,
            "convert": run_convert,
            "train": run_train,
        }
        status = commands[args.command](args)
    except ValueError as error:
        print(f"hybrid {args.command}: error: {error}", file=sys.stderr)
        return 2
    return status or 0
