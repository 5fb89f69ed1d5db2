"""``python -m hybrid.eval.lm_eval_cli [lm_eval options]``: lm-eval's own command line, with
our ``hybrid`` model registered.

lm-eval (0.4.13) fills its model registry only from its own ``lm_eval.models`` table and from
modules that were imported; it scans no entry points and has no plugin option, so a plain
``lm_eval --model hybrid`` cannot know our model. This module imports
:mod:`hybrid.eval.lm_eval_model` (which registers ``hybrid``) and then runs lm-eval's
unchanged command line with the given arguments::

    python -m hybrid.eval.lm_eval_cli --model hybrid --model_args checkpoint=runs/quickstart \\
        --tasks hellaswag,piqa --batch_size 8 --limit 100

Bad ``--model_args`` of ``--model hybrid`` (unknown key, missing checkpoint, ...) print one
line and exit 2, checked before lm-eval indexes its tasks; every other error is lm-eval's own.
The command is what lm-eval's ``lm_eval`` runs (its ``cli_evaluate``: ``HarnessCLI`` parses,
``setup_logging``, ``execute``) with that check after the parsing.
"""

from __future__ import annotations

import sys

INSTALL_HINT = "install it with: pip install -e '.[eval]' (or pip install 'lm-eval>=0.4.13')"
PROG = "python -m hybrid.eval.lm_eval_cli"


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging

        from hybrid.eval.lm_eval_model import ModelArgsError, check_model_args
    except ImportError as error:
        if getattr(error, "name", None) and not str(error.name).startswith("lm_eval"):
            raise
        print(f"{PROG}: error: lm-eval >= 0.4.13 is needed ({error}); {INSTALL_HINT}",
              file=sys.stderr)  # fmt: skip
        return 2
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]  # lm-eval's parser reads sys.argv itself
    try:
        parser = HarnessCLI()
        args = parser.parse_args()
        if getattr(args, "model", None) == "hybrid":  # fail before lm-eval indexes its tasks
            check_model_args(getattr(args, "model_args", None) or {})
        setup_logging()
        parser.execute(args)
    except ModelArgsError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except SystemExit as exit:  # argparse's --help (0) and usage errors (2)
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
