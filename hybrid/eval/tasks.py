"""The evaluation tasks ``hybrid eval`` knows, by name; a task's module is imported only when
that task runs, and a task is listed only when its module exists.

A task module provides:

- ``add_arguments(parser)``: its own command-line options (the common ones, ``--checkpoint``,
  ``--out``, ``--seed``, ``--chunk-size``, ``--batch-size``, ``--max-context``, ... are added
  by :mod:`hybrid.cli.eval`);
- ``evaluate(args, model, tokenizer, progress) -> dict``: runs the task from the parsed options
  and returns its results, JSON-ready: ``task``, ``settings``, and lists of flat records
  (``rows``, ``samples``, ...) that become W&B tables; bad input raises ``ValueError`` with one
  line naming the option, before any model work;
- optionally ``check_arguments(args)`` (checks that need no model, run before loading it) and
  ``DEFAULT_THREADS`` (CPU threads when ``--threads`` is not given).

A task registered with ``needs_checkpoint=False`` gets ``model=None, tokenizer=None`` (for
tasks that train their own models). Its plots are registered in
:data:`hybrid.eval.plots.PLOTS`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Task:
    """One evaluation: its name, the module that implements it, a one-line description."""

    name: str
    module: str
    help: str
    needs_checkpoint: bool = True  # the runner loads --checkpoint and passes model + tokenizer


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("passkey", "hybrid.eval.passkey", "passkey retrieval: accuracy over lengths x depths"),
        Task(
            "niah",
            "hybrid.eval.niah",
            "RULER-style needles: single, multi-key, multi-value, multi-query, variable tracking",
        ),
        Task("ppl", "hybrid.eval.ppl", "perplexity vs context length (1x..8x train) and position"),
        Task("decode", "hybrid.eval.decode", "decode ms/token and cache bytes vs context length"),
        Task("mqar", "hybrid.eval.mqar", "multi-query associative recall (Zoology)"),
        Task(
            "lm-eval",
            "hybrid.eval.lm_eval_task",
            "EleutherAI lm-evaluation-harness tasks (hellaswag, piqa, ...; local YAML tasks)",
        ),
    )
}


def available_tasks() -> dict[str, Task]:
    """The tasks whose module is present (found without importing it)."""
    return {name: task for name, task in TASKS.items() if importlib.util.find_spec(task.module)}


def load_task(name: str) -> ModuleType:
    """The module of task ``name``.

    Raises:
        ValueError: an unknown task, naming the valid ones.
    """
    tasks = available_tasks()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(tasks))}")
    return importlib.import_module(tasks[name].module)
