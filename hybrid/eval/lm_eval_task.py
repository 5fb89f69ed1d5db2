"""``hybrid eval lm-eval --tasks a,b``: EleutherAI lm-evaluation-harness tasks on a checkpoint.

The checkpoint is wrapped as :class:`hybrid.eval.lm_eval_model.HybridEvalLM` and handed to
lm-eval's ``simple_evaluate``. The standard zero-shot tasks of the Mamba, Jamba and Samba
papers (``lambada_openai``, ``hellaswag``, ``piqa``, ``arc_easy``, ``arc_challenge``,
``winogrande``) download their data from the Hugging Face dataset hub; offline they fail
with one line naming the task. A local task is a YAML file under ``--include-path DIR``
(``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).

The tasks are found and their data loaded before the checkpoint is (:func:`check_arguments`),
so an unknown task or unreachable dataset costs no model loading. lm-eval is imported only
here, only when this task runs.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid.eval import inference

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from hybrid.model import HybridLM
    from hybrid.tokenizer import Tokenizer

INSTALL_HINT = "pip install -e '.[eval]' (or pip install 'lm-eval>=0.4.13')"
HUB_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
"""The zero-shot suite the Mamba / Jamba / Samba papers report (data from the dataset hub)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hybrid eval lm-eval`` options."""
    parser.add_argument(
        "--tasks", required=True, metavar="A,B",
        help="lm-eval task, group or tag names (or YAML files), comma-separated; e.g. "
        + ",".join(HUB_TASKS),
    )  # fmt: skip
    parser.add_argument(
        "--num-fewshot", type=int, default=None, metavar="N",
        help="few-shot examples per prompt (default: each task's own, mostly 0)",
    )  # fmt: skip
    parser.add_argument(
        "--limit", type=float, default=None, metavar="N",
        help="documents per task: a count, or a fraction below 1 (for quick checks only)",
    )  # fmt: skip
    parser.add_argument(
        "--include-path", action="append", default=None, metavar="DIR",
        help="a folder (or file) of extra task YAMLs; may be repeated",
    )  # fmt: skip
    parser.add_argument(
        "--max-length", type=int, default=None, metavar="TOKENS",
        help="context window: longer contexts lose their left part (default: the checkpoint's "
        "training length, else 2048; at most --max-context)",
    )  # fmt: skip
    parser.add_argument(
        "--max-gen-toks", type=int, default=None, metavar="N",
        help="new tokens per generation request unless its task says (default 256)",
    )  # fmt: skip


def _lm_eval_version() -> str:
    """The installed lm-eval's version; ValueError with the install command when missing."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError(f"lm-eval is not installed; install it with: {INSTALL_HINT}") from None
    return lm_eval.__version__


def task_names(text: str) -> list[str]:
    """``--tasks a,b`` as a list (blanks dropped, order kept, no repeats).

    Raises:
        ValueError: no task named.
    """
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError("--tasks: give at least one task name")
    return names


@functools.lru_cache(maxsize=4)
def task_manager(include: tuple[str, ...], defaults: bool) -> TaskManager:
    """lm-eval's task index of ``include`` (plus its built-in tasks when ``defaults``).

    Indexing the built-in tasks reads some 15,000 YAML files (seconds), so it is done only when
    a task is not in ``include``, and once per process.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def find_tasks(names: list[str], include: list[str]) -> tuple[TaskManager, dict[str, list[str]]]:
    """The task index that knows every name, and each name's tasks (a glob may match many).

    Raises:
        ValueError: an unknown name, with close matches when there are some.
    """
    manager = task_manager(tuple(include), False) if include else None
    if manager is None or not all(_matches(manager, name) for name in names):
        manager = task_manager(tuple(include), True)
    found = {}
    for name in names:
        matches = _matches(manager, name)
        if not matches:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"--tasks: unknown task {name!r}{hint} (lm_eval ls tasks lists them; a local "
                "YAML task needs --include-path DIR)"
            )
        found[name] = matches
    return manager, found


def _matches(manager: TaskManager, name: str) -> list[str]:
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return [str(Path(name).resolve())]
    return manager.match_tasks([name])


def load_tasks(manager: TaskManager, found: dict[str, list[str]]) -> list[Any]:
    """The lm-eval Task / Group objects of the names, their datasets loaded.

    Raises:
        ValueError: one line naming the task whose data could not be loaded; for a dataset
            on the hub without network, saying that it needs the hub.
    """
    loaded: list[Any] = []
    for name, matches in found.items():
        for match in matches:
            try:
                result = manager.load([match])
            except Exception as error:  # datasets / lm-eval raise many types for bad task data
                raise ValueError(_load_error(match if match == name else name, error)) from None
            loaded.extend(result["groups"].values() or result["tasks"].values())
    return loaded


def _load_error(name: str, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, ConnectionError) or "on the Hub" in reason:
        return (
            f"--tasks: {name}: its dataset needs the Hugging Face dataset hub, which cannot be "
            f"reached ({reason}); run it with network access (or a datasets cache that holds "
            "it), or run a local YAML task offline with --include-path DIR"
        )
    return f"--tasks: {name}: could not be loaded ({type(error).__name__}: {reason})"


def _max_length(args: argparse.Namespace) -> int | None:
    """``--max-length``, capped by ``--max-context``; None: the model's default."""
    if args.max_length is None:
        return args.max_context
    if args.max_context is not None and args.max_length > args.max_context:
        raise ValueError(
            f"--max-length: {args.max_length} exceeds --max-context {args.max_context}"
        )
    return args.max_length


def check_arguments(args: argparse.Namespace) -> None:
    """Checks that need no model: lm-eval installed, options in range, every task known and its
    data loaded (kept in ``args.lm_eval_tasks`` for :func:`evaluate`)."""
    _lm_eval_version()
    names = task_names(args.tasks)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot: must be 0 or more; got {args.num_fewshot}")
    if args.limit is not None and (
        args.limit <= 0 or (args.limit >= 1 and args.limit != int(args.limit))
    ):
        raise ValueError(
            f"--limit: must be a positive count or a fraction below 1; got {args.limit:g}"
        )
    for option, value in (("--max-length", args.max_length), ("--max-gen-toks", args.max_gen_toks)):
        if value is not None:
            inference.check_positive(option, [value])
    max_length = _max_length(args)
    if max_length is not None and args.max_gen_toks is not None and args.max_gen_toks >= max_length:
        raise ValueError(
            f"--max-gen-toks: {args.max_gen_toks} leaves no room for a context in a window of "
            f"{max_length} tokens"
        )
    include = [str(Path(p).resolve()) for p in args.include_path or []]
    for path in include:
        if not Path(path).exists():
            raise ValueError(f"--include-path: {path}: no such file or directory")
    manager, found = find_tasks(names, include)
    args.lm_eval_tasks = (manager, load_tasks(manager, found))


def evaluate(
    args: argparse.Namespace, model: HybridLM, tokenizer: Tokenizer, progress: bool
) -> dict[str, Any]:
    """``hybrid eval lm-eval``: lm-eval's ``simple_evaluate`` on the checkpoint.

    Returns ``{"task", "settings", "accuracy", "rows", "lm_eval"}``: ``rows`` has one record
    per (task, metric, filter) with its value and standard error (the W&B table),
    ``accuracy`` each task's ``acc``, ``lm_eval`` lm-eval's own results (its ``results``,
    ``configs``, ``versions``, ``n-shot``, ``n-samples``, ...).
    """
    from lm_eval import simple_evaluate

    from hybrid.eval.lm_eval_model import DEFAULT_MAX_GEN_TOKS, HybridEvalLM, default_max_length

    if not hasattr(args, "lm_eval_tasks"):
        check_arguments(args)
    manager, tasks = args.lm_eval_tasks
    options: dict[str, Any] = {"max_length": _max_length(args)}
    lm = HybridEvalLM(
        model, tokenizer=tokenizer, batch_size=args.batch_size, chunk_size=args.chunk_size,
        max_gen_toks=args.max_gen_toks or DEFAULT_MAX_GEN_TOKS, seed=args.seed,
        max_length=options["max_length"] or default_max_length(args.checkpoint),
    )  # fmt: skip
    lm.progress = progress
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    output = simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
        task_manager=manager, log_samples=False,
    )  # fmt: skip
    raw = _json_ready({k: v for k, v in output.items() if k != "samples"})
    rows = metric_rows(raw)
    return {
        "task": "lm-eval",
        "settings": {
            "tasks": task_names(args.tasks),
            "num_fewshot": args.num_fewshot,
            "limit": limit,
            "include_path": args.include_path,
            "batch_size": lm.batch_size,
            "max_length": lm.max_length,
            "max_gen_toks": lm.max_gen_toks,
            "chunk_size": lm.chunk_size,
            "generation_seed": lm.seed,
            "lm_eval_version": _lm_eval_version(),
            "padding": "left, with an attention mask",
        },
        "accuracy": {
            row["task"]: row["value"]
            for row in rows
            if row["metric"] == "acc" and row["filter"] == "none"
        },
        "rows": rows,
        "lm_eval": raw,
    }


def metric_rows(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per (task or group, metric, filter) of lm-eval's ``results``."""
    rows = []
    groups = set(raw.get("groups") or {})
    for name, metrics in (raw.get("results") or {}).items():
        for key, value in metrics.items():
            metric, comma, where = key.partition(",")  # "acc,none": metric acc, filter none
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{where}")
            rows.append(
                {
                    "task": name,
                    "metric": metric,
                    "filter": where,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "samples": (raw.get("n-samples") or {}).get(name, {}).get("effective"),
                    "num_fewshot": (raw.get("n-shot") or {}).get(name),
                    "group": name in groups,
                }
            )
    return rows


def _json_ready(value: Any) -> Any:
    """``value`` with what JSON cannot hold (functions in task configs, numpy numbers, ...)
    turned into text or numbers, as lm-eval writes its own results."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))
