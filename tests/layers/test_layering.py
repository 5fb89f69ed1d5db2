"""``layers/`` stands alone: no module in it imports ``hybrid``, at module level, inside a
function or by ``importlib.import_module("hybrid...")`` (docstring examples do not count: only
the code is read)."""

from __future__ import annotations

import ast
from pathlib import Path

LAYERS = Path(__file__).resolve().parents[2] / "layers"  # this checkout's, whatever is installed


def imported_names(node: ast.AST) -> list[str]:
    """The absolute module names an import statement or a literal dynamic import names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""] if node.level == 0 else []
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def hybrid_imports(source: str) -> list[int]:
    """Line numbers of the imports in ``source`` that reach the hybrid package."""
    return sorted(
        node.lineno
        for node in ast.walk(ast.parse(source))
        if any(name == "hybrid" or name.startswith("hybrid.") for name in imported_names(node))
    )


def test_the_check_sees_every_form_of_import():
    source = (
        '"""from hybrid import register_block"""\n'
        "import hybrid\n"
        "import os, hybrid.model as m\n"
        "from hybrid.cache import HybridCache\n"
        "def f():\n"
        "    from hybrid import HybridLM\n"
        "import hybrid_tools\n"
        "from .hybrid import x\n"
        "g = importlib.import_module('hybrid.cli')\n"
        "print('import hybrid')\n"
    )
    assert hybrid_imports(source) == [2, 3, 4, 6, 9]


def test_layers_never_import_hybrid():
    files = sorted(LAYERS.rglob("*.py"))
    assert LAYERS / "ops" / "ssd" / "dispatch.py" in files  # the walk reaches subpackages
    offenders = [
        f"{path.relative_to(LAYERS.parent)}:{line}"
        for path in files
        for line in hybrid_imports(path.read_text())
    ]
    assert not offenders, f"layers/ imports hybrid: {offenders}"
