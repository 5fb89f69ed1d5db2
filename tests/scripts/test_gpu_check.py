"""scripts/gpu_check.py's CPU-side logic: its arguments, its refusal without CUDA, and a run
that keeps every finished step's results when later ones fail, time out or run out of budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.scripts.script_module import SCRIPTS, load_script


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def python_step(gpu_check, name: str, code: str, timeout_s: float = 60):
    return gpu_check.Step(name, [sys.executable, "-c", code], timeout_s, f"the {name} step")


def test_a_run_keeps_what_finished_and_reports_each_step(gpu_check, tmp_path):
    out = tmp_path / "gpu"
    steps = [
        python_step(gpu_check, "writes", f"open({str(out / 'bench.json')!r}, 'w').write('{{}}')"),
        python_step(gpu_check, "fails", "import sys; print('boom'); sys.exit(3)"),
        python_step(gpu_check, "hangs", "import time; time.sleep(60)", timeout_s=1),
        python_step(gpu_check, "passes", "print('fine')"),
    ]
    lines = []
    report = gpu_check.run_steps(steps, out, 120, {"date": "2026-12-03", "device": "test"},
                                 progress=lambda *a, **k: lines.append(a[0]))  # fmt: skip
    statuses = [step.status for step in report.steps]
    assert statuses == ["ok", "failed (exit 3)", "timed out (1 s)", "ok"]
    assert (out / "bench.json").read_text() == "{}"
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == statuses
    assert summary["environment"]["device"] == "test"
    assert "boom" in summary["steps"][1]["tail"] and summary["steps"][0]["tail"] is None
    assert (out / "logs" / "passes.log").read_text().strip() == "fine"
    markdown = (out / "summary.md").read_text()
    assert "| fails | failed (exit 3) |" in markdown and "## fails: end of its log" in markdown
    assert any(line.startswith("[2/4] fails: failed") for line in lines)


def test_steps_past_the_budget_are_skipped_and_the_summary_says_so(gpu_check, tmp_path):
    out = tmp_path / "gpu"
    steps = [
        python_step(gpu_check, "slow", "import time; time.sleep(60)"),
        python_step(gpu_check, "never", "print('ran')"),
    ]
    report = gpu_check.run_steps(steps, out, 6, {}, progress=lambda *a, **k: None)
    assert report.steps[0].status.startswith("timed out")  # cut to the budget, not 60 s
    assert report.steps[0].seconds < 30
    assert report.steps[1].status == "skipped (budget)"
    assert not (out / "logs" / "never.log").exists()


def test_the_summary_is_on_disk_before_the_first_step_ends(gpu_check, tmp_path):
    """Killed during step one, a run still leaves a summary naming its environment."""
    out = tmp_path / "gpu"
    seen = {}

    def progress(line, **_):
        if line.endswith("..."):
            seen["summary"] = json.loads((out / "summary.json").read_text())

    gpu_check.run_steps([python_step(gpu_check, "one", "pass")], out, 60, {"device": "x"},
                        progress=progress)  # fmt: skip
    assert seen["summary"]["environment"] == {"device": "x"} and seen["summary"]["steps"] == []


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    result = run_script("--dry-run", "--only", "pytest-gpu", "bench-decode", "--out",
                        str(tmp_path / "o"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("pytest-gpu (at most")
    assert "bench-decode" in result.stdout and "bench-blocks" not in result.stdout
    assert str(tmp_path / "o" / "bench_decode") in result.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "nope"], "gpu_check: error: --only: unknown step 'nope'"),
        (["--budget", "0"], "gpu_check: error: --budget: must be positive"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    result = run_script(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    result = run_script("--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.startswith("gpu_check: error: no CUDA device")
    assert not (tmp_path / "o").exists()
