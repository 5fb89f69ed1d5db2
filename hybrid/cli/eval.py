"""``hybrid eval TASK --checkpoint PATH [options]``: run one evaluation task on a checkpoint,
write ``results.json`` and PNG plots, optionally log them to W&B.

The task's module is imported only once the task is known (see :mod:`hybrid.eval.tasks`);
its options are parsed by a parser built from the common options below plus its own. User
errors print one line to stderr and return 2, before any model work where possible.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from hybrid.checkpoint import load_model, resolve_checkpoint
from hybrid.cli.parsing import (
    DTYPES,
    TRUST_HELP,
    OneLineParser,
    add_precision_arguments,
    apply_precision,
    resolve_device,
)
from hybrid.eval.checkpoints import default_out_dir
from hybrid.eval.inference import DEFAULT_CHUNK_SIZE, check_positive
from hybrid.eval.results import RESULTS_FILE, run_meta, save_results
from hybrid.eval.tasks import Task, available_tasks, load_task
from hybrid.outputs import require_output_dir
from hybrid.tokenizer import load_tokenizer

USAGE = "hybrid eval TASK --checkpoint PATH [options]"


def task_list(tasks: dict[str, Task]) -> str:
    """The tasks, one a line with its description."""
    width = max(len(name) for name in tasks)
    return "\n".join(f"  {name:<{width}}  {task.help}" for name, task in sorted(tasks.items()))


def build_parser(task: Task, module: ModuleType) -> OneLineParser:
    """The common options plus the task's own."""
    parser = OneLineParser(
        prog=f"hybrid eval {task.name}",
        description=f"{task.help}. Writes results.json and PNG plots to --out.",
    )
    common = parser.add_argument_group("common options")
    common.add_argument(
        "--checkpoint", required=task.needs_checkpoint, metavar="PATH",
        help="a run directory, a .ckpt file or a model directory",
    )  # fmt: skip
    common.add_argument(
        "--out", default=None, metavar="DIR",
        help="output directory (default: RUN/eval/TASK for a run directory, else eval/TASK "
        "next to the checkpoint)",
    )  # fmt: skip
    common.add_argument("--seed", type=int, default=0, help="seed of the random items (0)")
    common.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    common.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="TOKENS",
        help=f"prefill chunk through the cache; bounds memory (default {DEFAULT_CHUNK_SIZE})",
    )  # fmt: skip
    common.add_argument("--batch-size", type=int, default=1, help="sequences at once (1)")
    common.add_argument(
        "--max-context", type=int, default=None, metavar="TOKENS",
        help="refuse contexts longer than this (default: only what the device memory allows)",
    )  # fmt: skip
    common.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto)")
    common.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights")
    add_precision_arguments(common)
    common.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads (default: torch's; 1 for decode, whose timings need it)",
    )  # fmt: skip
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--wandb", action="store_true", help="log results and plots to W&B")
    common.add_argument("--wandb-mode", choices=("offline", "online"), default="offline",
                        help="offline needs no account; sync later with wandb sync")  # fmt: skip
    common.add_argument("--wandb-project", default="hybrid", help="W&B project (hybrid)")
    common.add_argument("--wandb-name", default=None, help="W&B run name")
    module.add_arguments(parser.add_argument_group(f"{task.name} options"))
    return parser


def check_common(args: argparse.Namespace) -> None:
    """Common options that need no model."""
    check_positive("--chunk-size", [args.chunk_size])
    check_positive("--batch-size", [args.batch_size])
    if args.max_context is not None:
        check_positive("--max-context", [args.max_context])
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: must be a positive integer; got {args.threads}")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise ValueError(f"--checkpoint: {args.checkpoint}: no such file or directory")


def run_task(task: Task, module: ModuleType, args: argparse.Namespace, argv: list[str]) -> dict:
    """Check, load, run, write: the whole of one ``hybrid eval`` command. Returns the results.

    Raises:
        ValueError: bad input (one line), before the model is loaded where it can be told.
    """
    check_common(args)
    if hasattr(module, "check_arguments"):
        module.check_arguments(args)
    device = resolve_device(args.device)
    threads = args.threads or getattr(module, "DEFAULT_THREADS", None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return evaluate_and_write(task, module, args, argv, device)
    finally:
        torch.set_num_threads(previous_threads)


def evaluate_and_write(
    task: Task, module: ModuleType, args: argparse.Namespace, argv: list[str], device: torch.device
) -> dict:
    """Load the checkpoint, run the task, write ``results.json`` and the plots, log to W&B."""
    model = tokenizer = None
    out = Path(args.out) if args.out else Path("eval") / task.name
    if args.out:
        require_output_dir(out, "--out")  # before the checkpoint loads
    meta: dict[str, Any] = {"command": shlex.join(["hybrid", "eval", *argv])}
    if args.checkpoint is not None:
        tokenizer = load_tokenizer(args.checkpoint)
        model = load_model(
            args.checkpoint, device=device, dtype=DTYPES[args.dtype],
            trust_remote_code=args.trust_remote_code,
        )  # fmt: skip
        meta["precision"] = apply_precision(model, args)
        out = Path(args.out) if args.out else default_out_dir(args.checkpoint, task.name)
        meta["checkpoint"] = str(args.checkpoint)
        meta["checkpoint_resolved"] = str(resolve_checkpoint(args.checkpoint).resolve())
    require_output_dir(out, "--out")  # before the evaluation, not after it
    started = time.perf_counter()
    results = module.evaluate(args, model, tokenizer, not args.no_progress)
    meta["seconds"] = round(time.perf_counter() - started, 3)
    results["meta"] = {**meta, **run_meta(model, tokenizer)}
    path = save_results(results, out / RESULTS_FILE)
    images = draw_plots(results, out)
    print(summarize(results))
    print(f"wrote {path}" + "".join(f", {image.name}" for image in images))
    if args.wandb:
        from hybrid.eval.wandb_log import log_results

        source = Path(args.checkpoint).resolve().name if args.checkpoint else None
        name = args.wandb_name or "-".join(filter(None, ["eval", task.name, source]))
        try:
            local = log_results(
                results, images, directory=out, mode=args.wandb_mode,
                project=args.wandb_project, name=name,
            )  # fmt: skip
        except Exception as error:  # wandb raises its own types (no login, no network, ...)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"--wandb: logging failed ({reason}); results are in {out}") from None
        if args.wandb_mode == "offline":
            print(f"W&B ran offline; upload the run with: wandb sync {local}")
    return results


def draw_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """The task's PNG plots, or none (with a note) when matplotlib is missing."""
    try:
        from hybrid.eval.plots import draw

        return draw(results, out)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []


SUMMARY_COLUMNS = {
    "passkey": ("length", "depth", "accuracy"),
    "niah": ("variant", "length", "accuracy", "recall"),
    "ppl": ("length", "mean_loss", "perplexity"),
    "decode": ("context", "ms_per_token", "cache_bytes"),
    "lm-eval": ("task", "metric", "filter", "value", "stderr"),
}


def summarize(results: dict[str, Any]) -> str:
    """The results' rows as a small text table (the columns that matter for the task)."""
    columns = SUMMARY_COLUMNS.get(results["task"])
    rows = results.get("rows") or []
    if not columns or not rows:
        return f"{results['task']}: done"
    cells = [[_format(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    """``hybrid eval`` with ``argv`` (the arguments after ``eval``); returns the exit code."""
    argv = list(sys.argv[2:] if argv is None else argv)
    tasks = available_tasks()
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            print(f"hybrid eval: error: give a task: {USAGE}; tasks: {', '.join(sorted(tasks))}",
                  file=sys.stderr)  # fmt: skip
            return 2
        print(f"usage: {USAGE}\n\ntasks:\n{task_list(tasks)}\n\n"
              "hybrid eval TASK --help lists a task's options.")  # fmt: skip
        return 0
    name = argv[0]
    if name not in tasks:
        print(f"hybrid eval: error: unknown task {name!r}; valid tasks: "
              f"{', '.join(sorted(tasks))} ({USAGE})", file=sys.stderr)  # fmt: skip
        return 2
    task, module = tasks[name], load_task(name)
    missing = [f for f in ("add_arguments", "evaluate") if not hasattr(module, f)]
    if missing:
        print(f"hybrid eval: error: task {name!r} has no command-line entry point yet "
              f"({task.module} lacks {', '.join(missing)})", file=sys.stderr)  # fmt: skip
        return 2
    try:
        args = build_parser(task, module).parse_args(argv[1:])
    except SystemExit as exit:  # --help (0) or a one-line argparse error (2)
        return int(exit.code or 0)
    try:
        run_task(task, module, args, argv)
    except ValueError as error:
        print(f"hybrid eval {name}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hybrid eval {name}: interrupted", file=sys.stderr)
        return 130
    return 0
