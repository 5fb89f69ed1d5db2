"""Long-context evaluations of a checkpoint: passkey retrieval, RULER-style needles in a
haystack, perplexity against context length and position, and decode cost.

Each task is a plain function (``run_passkey``, ``run_niah``, ``run_ppl``, ``run_decode``)
that takes a model and a tokenizer and returns a JSON-ready dict; :mod:`hybrid.eval.plots`
draws those dicts, :func:`load_results` reads them back from ``results.json``, and
``hybrid eval TASK`` (:mod:`hybrid.cli.eval`) ties it together with a progress bar, plots
and W&B. Importing this package imports no task module.

    hybrid eval passkey --checkpoint runs/quickstart --lengths 256 512 1024 --trials 5
    hybrid eval niah --checkpoint runs/quickstart --lengths 1024 2048 --variants single vt
    hybrid eval ppl --checkpoint runs/quickstart/checkpoints/last.ckpt --multiples 1 2 4 8
    hybrid eval decode --checkpoint runs/quickstart --contexts 1024 4096 16384 --wandb
"""

from hybrid.eval.results import load_results, save_results
from hybrid.eval.tasks import TASKS, available_tasks

__all__ = ["TASKS", "available_tasks", "load_results", "save_results"]
