"""docs/reliability.md is scripts/torture.py's table of the committed reliability.json, and that
run found nothing wrong (a failure found later must be fixed, and the run redone, before the
report is committed)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.scripts.script_module import load_script

ROOT = Path(__file__).resolve().parents[2]


def torture():
    return load_script("torture")


def report() -> dict:
    return json.loads((ROOT / "docs/reliability.json").read_text())


def test_committed_markdown_is_the_table_of_the_committed_json():
    assert (ROOT / "docs/reliability.md").read_text() == torture().markdown(report())


def test_the_committed_run_found_nothing_wrong():
    from tests.cli.test_user_errors import CASES
    from tests.core.test_api_errors import API_CASES

    kills, inputs, damage = report()["kills"], report()["inputs"], report()["damage"]
    assert kills["kills_done"] >= 20 and kills["last_ckpt_loadable"] == kills["kills_done"]
    assert kills["kills_with_a_write_in_progress"] > 0
    assert kills["steps_compared"] == kills["steps_expected"] > 0
    assert kills["steps_with_other_losses"] == [] and kills["steps_missing"] == []
    assert (inputs["cases"], inputs["passed"], inputs["failures"]) == (len(CASES), len(CASES), [])
    assert (inputs["api_cases"], inputs["api_failures"]) == (len(API_CASES), [])
    assert inputs["cases"] + inputs["api_cases"] >= 50
    for counts in damage.values():
        assert counts["silently_different"] == 0 and counts["other"] == []
