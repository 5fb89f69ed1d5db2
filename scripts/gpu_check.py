"""One prepared GPU check: the GPU tests and the benchmarks on a CUDA machine, in a time budget.

Runs, in order, each as its own process with its own time limit cut to what is left of
``--budget`` (default 480 s, for a lent machine's 15 minutes with start-up included):

    environment   device name, torch / triton / mamba-ssm / causal-conv1d versions, kernels found
    pytest-gpu    python3 -m pytest -m gpu (kernel paths against the CPU path)
    bench-blocks  scripts/bench_blocks.py --device cuda (and mamba_ssm's MambaLMHeadModel)
    bench-train   scripts/bench_blocks.py --train --device cuda
    bench-decode  scripts/bench_decode.py --device cuda (ms/token against context length)
    bench-decode-graph  the same with --step cuda-graph (the step replayed as a CUDA graph)
    bench-vs-hf   scripts/bench_vs_hf.py --device cuda (kernels on both sides)

and writes into ``--out`` (default docs/gpu): each step's log, the benchmarks' JSON + markdown,
and ``summary.json`` / ``summary.md`` (date, device, versions, each step's status and time),
rewritten after every step so that whatever finished is kept when a later step fails, times
out or the machine is taken back; a step that fails does not stop the next. ``--only`` picks
steps; ``--dry-run`` prints the plan. Without a CUDA device it refuses in one line (exit 2).
Exit status: 0 when every step ran and passed, 1 otherwise.

    bash scripts/gpu_check.sh                     # installs the GPU extra first, then this
    python3 scripts/gpu_check.py --only pytest-gpu bench-blocks --budget 300
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybrid.atomic import atomic_write_text  # noqa: E402

PYTHON = sys.executable
LOG_TAIL = 2000  # characters of a failed step's log kept in the summary


@dataclass
class Step:
    """One command of the check: ``{out}`` in its arguments becomes the output directory."""

    name: str
    command: list[str]
    timeout_s: float
    help: str


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed (exit N) | timed out | skipped (budget) | error: ...
    seconds: float = 0.0
    log: str | None = None
    tail: str | None = None


@dataclass
class Report:
    """What ``summary.json`` holds."""

    started: str
    environment: dict[str, Any]
    budget_s: float
    steps: list[StepResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "environment": self.environment,
            "budget_s": self.budget_s,
            "steps": [vars(step) for step in self.steps],
        }


def python(arguments: str) -> list[str]:
    """``python3 ARGUMENTS`` as a command (arguments split on spaces)."""
    return [PYTHON, *arguments.split()]


STEPS = [
    Step(
        "pytest-gpu",
        python("-m pytest -q -m gpu -p no:cacheprovider"),
        150,
        "the GPU tests: kernel paths against the CPU path",
    ),
    Step(
        "bench-blocks",
        python("scripts/bench_blocks.py --device cuda --out {out}/bench_blocks"),
        60,
        "forward tokens/s per block family; the hybrid against MambaLMHeadModel",
    ),
    Step(
        "bench-train",
        python("scripts/bench_blocks.py --train --device cuda --out {out}/bench_blocks_train"),
        60,
        "training step per block family",
    ),
    Step(
        "train-fsdp2",
        [
            "bash",
            "-c",
            f"{PYTHON} -m hybrid.cli train recipes/quickstart.yaml trainer.strategy=fsdp "
            "trainer.max_steps=20 trainer.val_every=10 logging.wandb=false "
            "output_dir={out}/runs name=fsdp2 --no-progress && "
            f"{PYTHON} -m hybrid.cli train recipes/quickstart.yaml trainer.strategy=fsdp "
            "trainer.max_steps=30 trainer.val_every=10 logging.wandb=false "
            "output_dir={out}/runs name=fsdp2 --resume --no-progress && "
            f"{PYTHON} -m hybrid.cli generate --checkpoint {{out}}/runs/fsdp2 "
            "--prompt 'def ' --max-new-tokens 32",
        ],
        120,
        "FSDP2 (trainer.strategy: fsdp) on one GPU: train, --resume, generate from it",
    ),
    Step(
        "bench-decode",
        python("scripts/bench_decode.py --device cuda --threads 0 --out {out}/bench_decode"),
        90,
        "decode ms/token against context length",
    ),
    Step(
        "bench-decode-graph",
        python(
            "scripts/bench_decode.py --device cuda --threads 0 --step cuda-graph "
            "--no-speculative --out {out}/bench_decode_cuda_graph"
        ),
        45,
        "the same decode with the static step replayed as a CUDA graph",
    ),
    Step(
        "bench-vs-hf",
        python("scripts/bench_vs_hf.py --device cuda --rounds 1"),
        150,
        "prefill, training and decode against transformers (docs/bench_vs_hf_cuda.json)",
    ),
]


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Date, machine, device and the versions that decide which kernels run."""
    import torch

    from layers.ops.kernels import causal_conv1d_ops, mamba_ssm_ops

    cuda = torch.cuda.is_available()
    return {
        "date": datetime.now(timezone.utc).date().isoformat(),
        "device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: package_version(name) for name in ("triton", "mamba-ssm", "causal-conv1d")},
        "transformers": package_version("transformers"),
        "mamba_ssm_kernels": mamba_ssm_ops() is not None,
        "causal_conv1d_kernels": causal_conv1d_ops() is not None,
    }


def summary_markdown(report: Report) -> str:
    env = report.environment
    lines = [
        f"# GPU check, {env.get('date')}",
        "",
        f"Device: {env.get('device')} (CUDA {env.get('cuda')}); torch {env.get('torch')}, "
        f"triton {env.get('triton')}, mamba-ssm {env.get('mamba-ssm')}, causal-conv1d "
        f"{env.get('causal-conv1d')}, transformers {env.get('transformers')}. Kernels "
        f"importable: mamba-ssm {env.get('mamba_ssm_kernels')}, causal-conv1d "
        f"{env.get('causal_conv1d_kernels')}. Budget {report.budget_s:.0f} s.",
        "",
        "| step | status | seconds | log |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.log or ''} |" for s in report.steps]
    for step in report.steps:
        if step.tail:
            lines += ["", f"## {step.name}: end of its log", "", "```", step.tail, "```"]
    return "\n".join(lines) + "\n"


def write_summary(report: Report, out: Path) -> None:
    atomic_write_text(out / "summary.json", json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(report))


def run_step(step: Step, out: Path, timeout_s: float) -> StepResult:
    """Run one step with its output in ``out/logs/NAME.log``; never raises for the step's own
    failure."""
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [part.replace("{out}", str(out)) for part in step.command]
    start = time.monotonic()
    try:
        with open(log, "wb") as file:  # a log, read by people: written as it goes
            completed = subprocess.run(
                command, cwd=ROOT, stdout=file, stderr=subprocess.STDOUT, timeout=timeout_s
            )
        status = "ok" if completed.returncode == 0 else f"failed (exit {completed.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out ({timeout_s:.0f} s)"
    except OSError as error:
        status = f"error: {error}"
    seconds = time.monotonic() - start
    tail = None
    if status != "ok" and log.is_file():
        tail = log.read_text(errors="replace")[-LOG_TAIL:]
    return StepResult(step.name, status, seconds, str(log.relative_to(out)), tail)


def run_steps(
    steps: list[Step], out: Path, budget_s: float, env: dict[str, Any], progress=print
) -> Report:
    """Run ``steps`` in order within ``budget_s`` seconds, rewriting the summary after each."""
    out.mkdir(parents=True, exist_ok=True)
    report = Report(datetime.now(timezone.utc).isoformat(timespec="seconds"), env, budget_s)
    write_summary(report, out)
    deadline = time.monotonic() + budget_s
    for number, step in enumerate(steps, 1):
        left = deadline - time.monotonic()
        if left < 5:
            result = StepResult(step.name, "skipped (budget)")
        else:
            progress(f"[{number}/{len(steps)}] {step.name}: {step.help} ...", flush=True)
            result = run_step(step, out, min(step.timeout_s, left))
        progress(f"[{number}/{len(steps)}] {step.name}: {result.status} "
                 f"({result.seconds:.0f} s)", flush=True)  # fmt: skip
        report.steps.append(result)
        write_summary(report, out)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0].strip()
    )
    parser.add_argument("--out", default="docs/gpu", help="output directory (default docs/gpu)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all steps")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run these steps only")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [step.name for step in STEPS]
    unknown = [name for name in args.only or [] if name not in names]
    if unknown:
        print(f"gpu_check: error: --only: unknown step {unknown[0]!r}; steps: "
              f"{', '.join(names)}", file=sys.stderr)  # fmt: skip
        return 2
    if args.budget <= 0:
        print(f"gpu_check: error: --budget: must be positive; got {args.budget}", file=sys.stderr)
        return 2
    steps = [step for step in STEPS if not args.only or step.name in args.only]
    out = Path(args.out).resolve()
    if args.dry_run:
        for step in steps:
            command = " ".join(step.command).replace("{out}", str(out))
            print(f"{step.name} (at most {step.timeout_s:.0f} s): {command}")
        print(f"budget {args.budget:.0f} s; results in {out}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: error: no CUDA device visible to torch {torch.__version__}; "
              "nothing was run", file=sys.stderr)  # fmt: skip
        return 2
    env = environment()
    print(f"gpu_check: {env['device']}, torch {env['torch']}, kernels: mamba-ssm "
          f"{env['mamba_ssm_kernels']}, causal-conv1d {env['causal_conv1d_kernels']}")  # fmt: skip
    report = run_steps(steps, out, args.budget, env)
    print(f"gpu_check: summary in {out / 'summary.md'}")
    return 0 if all(step.status == "ok" for step in report.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
