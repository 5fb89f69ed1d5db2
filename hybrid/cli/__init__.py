"""The ``hybrid`` command line: ``hybrid info | train | generate | convert | eval``.

:mod:`hybrid.cli.main` parses and dispatches, :mod:`hybrid.cli.eval` runs ``hybrid eval TASK``,
:mod:`hybrid.cli.info` prints ``hybrid info``'s table, :mod:`hybrid.cli.parsing` holds the
one-line-error parser and the dtype names. Subcommands import their heavy dependencies
(Lightning, the evaluation tasks) only when they run.
"""

from hybrid.cli.main import main

__all__ = ["main"]
