"""The failure tests as figures: kill -9 during training, the malformed-input catalogue, and
damaged files. Writes docs/reliability.{json,md}.

1. kills: a small training run (every step checkpointed) is killed with SIGKILL at random
   moments, ``--kills`` times, each time resumed with ``--resume``; after each kill
   ``last.ckpt`` must load, and at the end the logged losses must equal those of a run never
   killed, step for step (CPU training here is deterministic, so "equal" is exact).
2. inputs: every case of the catalogue in tests/cli/test_user_errors.py through the real
   ``hybrid`` process: exit code 2, one line on stderr naming the field or file, no
   traceback, no file written or changed.
3. damage: a model directory's weights, an inference cache file and a training checkpoint,
   each with one bit flipped at a random offset or truncated at a random length,
   ``--damages`` times per file and kind: loading must fail with a one-line ValueError or
   give exactly the original content; never other numbers, never another exception.

Usage: python scripts/torture.py [--kills 20] [--damages 40] [--seed 0] [--out docs]
About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybrid import HybridConfig, HybridLM  # noqa: E402
from hybrid.checkpoint import load_pretrained, read_training_checkpoint, save_pretrained  # noqa: E402
from hybrid.checksum import structure_digest  # noqa: E402
from hybrid.inference.cache_io import load_cache, save_cache  # noqa: E402
from hybrid.provenance import cpu_description  # noqa: E402

HYBRID = [sys.executable, "-m", "hybrid.cli"]
RECIPE = {
    "name": "torture",
    "seed": 1,
    "model": {
        "pattern": "M*E",
        "d_model": 32,
        "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 16},
        "attention": {"n_heads": 2},
        "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 32},
        "tie_embeddings": True,
    },
    "data": {
        "source": {"format": "text", "paths": ["{stdlib}/json/*.py"]},
        "val_fraction": 0.2,
        "seq_len": 32,
    },
    "optim": {"lr": 3e-3},
    "schedule": {"warmup_steps": 2},
    "trainer": {"max_steps": 200, "micro_batch_size": 4, "val_every": 1000, "val_batches": 1,
                "log_every": 1, "threads": 1},
    "logging": {"wandb": False},
    "checkpoint": {"every_steps": 1, "keep": 1},
    "eval": {"max_new_tokens": 0},
}  # fmt: skip


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_API_KEY", None)
    return env


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss over every launch's CSV (a later launch's row wins)."""
    import csv

    result = {}
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv"),
                       key=lambda p: int(p.parent.name.split("_")[1])):  # fmt: skip
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    result[int(row["step"])] = float(row["train/loss"])
    return result


def torture_kills(work: Path, kills: int, rng: random.Random) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    data = {**RECIPE, "output_dir": str(work / "runs"), "data": {**RECIPE["data"],
            "cache_dir": str(work / "cache")}}  # fmt: skip
    recipe.write_text(yaml.safe_dump(data))
    started = time.perf_counter()
    done = subprocess.run([*HYBRID, "train", str(recipe), "name=whole", "--no-progress"],
                          capture_output=True, text=True, env=environment())  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"torture: the uninterrupted run failed:\n{done.stderr[-2000:]}")
    whole_seconds = time.perf_counter() - started
    expected = losses(work / "runs" / "whole")

    run = work / "runs" / "killed"
    last = run / "checkpoints" / "last.ckpt"
    loadable, during_write, steps = 0, 0, []
    for index in range(kills):
        resume = ["--resume"] if last.exists() else []
        process = subprocess.Popen(
            [*HYBRID, "train", str(recipe), "name=killed", "--no-progress", *resume],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment(),
        )  # fmt: skip
        # Wait for this launch's first checkpoint (a new last.ckpt), then kill either at a random
        # moment up to 1.5 s later or, every other kill, the moment a checkpoint write begins.
        before = last.stat().st_mtime_ns if last.exists() else None
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if last.exists() and last.stat().st_mtime_ns != before:
                break
            time.sleep(0.01)
        if index % 2:
            deadline = time.monotonic() + 10
            while not any(last.parent.glob(".*.tmp")) and time.monotonic() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is not None:  # finished before the kill: the run is too short
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        during_write += any(last.parent.glob(".*.tmp"))
        try:
            checkpoint = read_training_checkpoint(last)
            loadable += 1
            steps.append(int(torch.load(last, weights_only=True)["global_step"]))
            del checkpoint
        except ValueError as error:
            print(f"torture: after a kill, {last} does not load: {error}", file=sys.stderr)
    done = subprocess.run([*HYBRID, "train", str(recipe), "name=killed", "--resume",
                           "--no-progress"], capture_output=True, text=True,
                          env=environment())  # fmt: skip
    got = losses(run)
    compared = sorted(set(expected) & set(got))
    differing = [step for step in compared if got[step] != expected[step]]
    return {
        "kills_requested": kills,
        "kills_done": len(steps),
        "last_ckpt_loadable": loadable,
        "kills_with_a_write_in_progress": during_write,
        "steps_at_kills": steps,
        "final_resume_exit_code": done.returncode,
        "steps_expected": len(expected),
        "steps_logged": len(got),
        "steps_missing": sorted(set(expected) - set(got)),
        "steps_compared": len(compared),
        "steps_with_other_losses": differing,
        "max_abs_loss_difference": max((abs(got[s] - expected[s]) for s in compared), default=0),
        "uninterrupted_run_seconds": round(whole_seconds, 1),
    }


def torture_inputs() -> dict:
    from tests.cli.test_user_errors import CASES, snapshot

    failures, passed = [], 0
    for case in CASES:
        with tempfile.TemporaryDirectory() as directory:
            tmp = Path(directory)
            try:
                argv = case.setup(tmp)
            except BaseException as error:  # a case that needs an optional package
                failures.append(f"{case.name}: setup: {type(error).__name__}: {error}")
                continue
            before = snapshot(tmp)
            done = subprocess.run([*HYBRID, *argv], capture_output=True, text=True, cwd=tmp,
                                  env=environment())  # fmt: skip
            lines = done.stderr.strip().splitlines()
            problems = []
            if done.returncode != 2:
                problems.append(f"exit code {done.returncode}")
            if len(lines) != 1:
                problems.append(f"{len(lines)} lines on stderr")
            if "Traceback" in done.stderr + done.stdout:
                problems.append("a traceback")
            if lines and not re.search(case.message, lines[-1]):
                problems.append(f"message {lines[-1]!r}")
            if snapshot(tmp) != before:
                problems.append("files written or changed")
            if problems:
                failures.append(f"{case.name}: {', '.join(problems)}")
            else:
                passed += 1
    from tests.core.test_api_errors import API_CASES, check_api_case

    api_failures = []
    for case in API_CASES:
        with tempfile.TemporaryDirectory() as directory:
            problems = check_api_case(case, Path(directory))
        if problems:
            api_failures.append(f"{case.name}: {', '.join(problems)}")
    return {
        "cases": len(CASES),
        "passed": passed,
        "failures": failures,
        "api_cases": len(API_CASES),
        "api_passed": len(API_CASES) - len(api_failures),
        "api_failures": api_failures,
    }


def damaged_copies(path: Path, kind: str, trials: int, rng: random.Random, work: Path):
    """Yield copies of ``path`` with one bit flipped or truncated, at random offsets."""
    data = path.read_bytes()
    for trial in range(trials):
        broken = bytearray(data)
        if kind == "flip":
            position = rng.randrange(len(broken))
            broken[position] ^= 1 << rng.randrange(8)
        else:
            broken = broken[: rng.randrange(len(broken))]
        copy = work / f"{trial}_{path.name}"
        copy.write_bytes(bytes(broken))
        yield copy


def torture_damage(work: Path, trials: int, rng: random.Random, ckpt: Path | None) -> dict:
    torch.manual_seed(0)
    config = HybridConfig("M*-", vocab_size=64, d_model=32, attention={"n_heads": 2},
                          mamba2={"d_state": 8, "headdim": 8, "chunk_size": 16})  # fmt: skip
    model = HybridLM(config).eval()
    save_pretrained(model, work / "model")
    cache = model.allocate_cache(2, 32)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 9)), cache=cache)
    save_cache(cache, work / "cache.safetensors")
    reference_weights = structure_digest(dict(model.state_dict()))
    reference_cache = structure_digest(
        [entry.tensors() if entry is not None else None for entry in cache.entries]
    )

    def load_weights(path: Path) -> str:
        directory = work / "damaged_model"
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(work / "model", directory)
        shutil.copy(path, directory / "model.safetensors")
        return structure_digest(dict(load_pretrained(directory).state_dict()))

    def load_cache_file(path: Path) -> str:
        loaded = load_cache(model, path)
        return structure_digest(
            [entry.tensors() if entry is not None else None for entry in loaded.entries]
        )

    files = {
        "model.safetensors": (work / "model" / "model.safetensors", load_weights,
                              reference_weights),
        "cache.safetensors": (work / "cache.safetensors", load_cache_file, reference_cache),
    }  # fmt: skip
    if ckpt is not None and ckpt.is_file():
        shutil.copy(ckpt, work / "last.ckpt")

        def load_ckpt(path: Path) -> str:
            read_training_checkpoint(path)  # checks the digest
            return structure_digest(torch.load(path, weights_only=True))

        files["last.ckpt"] = (
            work / "last.ckpt",
            load_ckpt,
            structure_digest(torch.load(work / "last.ckpt", weights_only=True)),
        )
    results = {}
    for name, (path, load, reference) in files.items():
        for kind in ("flip", "truncate"):
            counts = {"clear_error": 0, "identical": 0, "silently_different": 0, "other": []}
            scratch = work / f"damage_{name}_{kind}"
            scratch.mkdir()
            for copy in damaged_copies(path, kind, trials, rng, scratch):
                try:
                    digest = load(copy)
                except ValueError as error:
                    one_line = "\n" not in str(error) and str(copy.name) in str(error)
                    if one_line or "damaged_model" in str(error):
                        counts["clear_error"] += 1
                    else:
                        counts["other"].append(f"unclear: {str(error)[:200]}")
                except Exception as error:  # anything but our ValueError is a defect
                    counts["other"].append(f"{type(error).__name__}: {str(error)[:200]}")
                else:
                    counts["identical" if digest == reference else "silently_different"] += 1
                copy.unlink()
            results[f"{name} {kind}"] = counts
    return results


def markdown(report: dict) -> str:
    meta, kills, inputs, damage = (report[k] for k in ("meta", "kills", "inputs", "damage"))
    lines = [
        "# Reliability",
        "",
        f"`python scripts/torture.py` ({meta['date']}, {meta['machine']}, torch "
        f"{meta['torch']}, seed {meta['seed']}); the numbers are in reliability.json.",
        "",
        "## kill -9 during training, then --resume",
        "",
        "| kills | last.ckpt loadable after the kill | kills with a checkpoint write in progress "
        "| steps compared with a run never killed | steps with other losses | steps missing |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {kills['kills_done']} | {kills['last_ckpt_loadable']} | "
        f"{kills['kills_with_a_write_in_progress']} | {kills['steps_compared']} of "
        f"{kills['steps_expected']} | {len(kills['steps_with_other_losses'])} | "
        f"{len(kills['steps_missing'])} |",
        "",
        f"Killed at steps {', '.join(map(str, kills['steps_at_kills']))} (the step of "
        f"`last.ckpt` after each kill; every other kill came the moment a checkpoint write "
        f"began); the final `--resume` exited {kills['final_resume_exit_code']}. Largest loss "
        f"difference from the run never killed: {kills['max_abs_loss_difference']}.",
        "",
        "## Malformed input",
        "",
        f"CLI (tests/cli/test_user_errors.py, through the `hybrid` process): {inputs['passed']} "
        f"of {inputs['cases']} cases: exit code 2, one line naming the "
        "field or file, no traceback, nothing written.",
        "",
        *[f"- failed: {failure}" for failure in inputs["failures"]],
        *([""] if inputs["failures"] else []),
        f"Python API (tests/core/test_api_errors.py): {inputs['api_passed']} of "
        f"{inputs['api_cases']} calls raise a one-line ValueError naming the argument, field "
        "or file, and write nothing.",
        "",
        *[f"- failed: {failure}" for failure in inputs["api_failures"]],
        *([""] if inputs["api_failures"] else []),
        "## Damaged files (one bit flipped, or truncated, at a random offset)",
        "",
        "| file | damage | trials | clear one-line error | loaded, identical | loaded, other "
        "numbers | other exception |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, counts in damage.items():
        name, kind = key.rsplit(" ", 1)
        trials = (
            counts["clear_error"]
            + counts["identical"]
            + counts["silently_different"]
            + len(counts["other"])
        )
        lines.append(
            f"| {name} | {kind} | {trials} | {counts['clear_error']} | {counts['identical']} | "
            f"{counts['silently_different']} | {len(counts['other'])} |"
        )
    lines += [
        "",
        "A flipped bit that loads identical content lies outside the data (e.g. in a JSON "
        "header's padding or a metadata string that no loader reads).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--damages", type=int, default=40, help="trials per file and kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        kills = torture_kills(work / "kills", args.kills, rng)
        print("kills:", json.dumps(kills), flush=True)
        inputs = torture_inputs()
        print("inputs:", json.dumps(inputs), flush=True)
        (work / "damage").mkdir()
        ckpt = work / "kills" / "runs" / "whole" / "checkpoints" / "last.ckpt"
        damage = torture_damage(work / "damage", args.damages, rng, ckpt)
        print("damage:", json.dumps(damage), flush=True)
    report = {
        "meta": {
            "date": date.today().isoformat(),
            "machine": cpu_description(os.cpu_count()),
            "torch": torch.__version__,
            "seed": args.seed,
            "kills": args.kills,
            "damages": args.damages,
        },
        "kills": kills,
        "inputs": inputs,
        "damage": damage,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "reliability.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
