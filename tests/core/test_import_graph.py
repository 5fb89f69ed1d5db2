"""The project's import graph has no cycle (that ``layers/`` never imports ``hybrid`` is
tests/layers/test_layering.py).

Every ``import`` / ``from ... import`` statement of every module under ``hybrid/`` and
``layers/`` counts, at module level or inside a function (a lazy import that only hides a
cycle is still one) or under ``if TYPE_CHECKING``. An edge goes to the module named, or to the
package whose ``__init__`` provides the name; parent packages initialised on the way are not
edges (every module would otherwise form a cycle with its package's ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("hybrid", "layers")


def project_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is_package) for every module of the project."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """Module -> the project modules its import statements name."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    edges.add(full if full in modules else known(source))
        edges.discard(None)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import():
    """The walker itself: relative, lazy, package-level and TYPE_CHECKING imports are edges."""
    graph = import_graph(project_modules())
    assert "hybrid.inference.cache" in graph["hybrid.model"]  # absolute, module level
    assert "layers.registry" in graph["hybrid.model"]
    assert "hybrid.model" in graph["hybrid.inference.cache_io"]  # under TYPE_CHECKING
    assert "hybrid.cli.eval" in graph["hybrid.cli.main"]  # inside a function
    assert "layers.ops.conv" in graph["layers.ops"]  # relative, from a package's __init__


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(project_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
