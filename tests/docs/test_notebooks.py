"""The notebooks execute top to bottom (with small settings), so they never rot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def execute(name: str, tmp_path: Path, **env: str) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
        )
        client.execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_quickstart_notebook_runs(tmp_path):
    execute("quickstart.ipynb", tmp_path, HYBRID_NOTEBOOK_STEPS="4", MPLBACKEND="Agg")


def test_long_context_notebook_runs(tmp_path):
    os.environ.pop("HYBRID_RUN", None)
    execute("long_context.ipynb", tmp_path, MPLBACKEND="Agg")
