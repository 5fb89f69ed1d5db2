"""lm-evaluation-harness integration: the ``hybrid`` lm-eval model against plain references
(a full forward, no cache, no padding), batched against one-by-one, and ``hybrid eval lm-eval``
/ ``python -m hybrid.eval.lm_eval_cli`` end to end on local YAML tasks, offline.

The scoring tests run a float64 model, so the cached, chunked, left-padded path and the plain
forward agree to rounding (~1e-15) and greedy choices never hinge on float32 noise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import get_model, model_registry

from hybrid import HybridConfig, HybridLM
from hybrid.checkpoint import save_pretrained
from hybrid.cli.eval import main as eval_main
from hybrid.eval import lm_eval_cli, load_results
from hybrid.eval.lm_eval_model import HybridEvalLM, ModelArgsError
from hybrid.tokenizer import ByteTokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "pattern": "M*ES-",  # every block family: Mamba-2, attention, MoE, Mamba-1, MLP
    "vocab_size": 257,
    "d_model": 32,
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
    "mamba1": {"d_state": 4},
    "attention": {"n_heads": 2},
    "moe": {"n_experts": 4, "expert_hidden_size": 16},
}
TOLERANCE = 1e-9  # float64: the two paths agree to ~1e-15
EOS = ByteTokenizer.eos_id
REQUESTS = [  # (context, continuation): lengths differ, so a batch is left-padded
    ("The cat", " sat on the mat"),
    ("Once upon a time there was a", " princess"),
    ("Hi", "!"),
    ("", "An empty context"),
    ("A context longer than the window of sixty-four tokens, so it loses its left part", " ok"),
]
MAX_LENGTH = 64


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: the tiny model gains nothing from more, and on a busy machine two
    threads wait on each other (tens of times slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(HybridConfig(**CONFIG)).eval().double()


def make_lm(model: HybridLM, **options) -> HybridEvalLM:
    """The lm-eval model; prefill chunks of 5 tokens, so padding fills whole chunks."""
    settings = {"max_length": MAX_LENGTH, "chunk_size": 5, **options}
    lm = HybridEvalLM(model, tokenizer=ByteTokenizer(), **settings)
    lm.progress = False
    return lm


def instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def direct_loglikelihood(model: HybridLM, context: list[int], continuation: list[int]):
    """Sum of log-softmax of the continuation tokens from one plain forward, and whether
    each is the argmax."""
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    pairs = list(zip(positions, continuation, strict=True))
    total = sum(float(logprobs[p, t]) for p, t in pairs)
    return total, all(int(logprobs[p].argmax()) == t for p, t in pairs)


def expected_ids(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The ids lm-eval scores: an empty context is the end-of-document token; the window keeps
    the last MAX_LENGTH + 1 tokens (the last one is only predicted)."""
    tokenizer = ByteTokenizer()
    ctx, cont = tokenizer.encode(context) or [EOS], tokenizer.encode(continuation)
    return (ctx + cont)[-(MAX_LENGTH + 1) : -len(cont)], cont


def greedy_tokens(model: HybridLM, context: list[int], steps: int) -> list[int]:
    """Greedy next tokens from plain forwards over the whole sequence, up to end-of-document."""
    sequence, new = list(context), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([sequence])).logits[0, -1].argmax())
            new.append(token)
            if token == EOS:
                break
            sequence.append(token)
    return new


# --- (a) log-likelihoods equal a direct computation ---------------------------------------


def test_loglikelihood_equals_a_plain_forward(model):
    results = make_lm(model).loglikelihood(instances("loglikelihood", REQUESTS))
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, results, strict=True):
        expected, expected_greedy = direct_loglikelihood(
            model, *expected_ids(context, continuation)
        )
        assert abs(logprob - expected) <= TOLERANCE, (context, logprob, expected)
        assert greedy == expected_greedy
    assert len(expected_ids(*REQUESTS[-1])[0]) < len(REQUESTS[-1][0])  # it was cut


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(model):
    context = ByteTokenizer().encode("The cat")
    greedy = greedy_tokens(model, context, 6)
    assert EOS not in greedy
    other = [*greedy[:-1], (greedy[-1] + 1) % 256]
    lm = make_lm(model)
    (_, yes), (_, no) = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])
    assert yes and not no
    assert direct_loglikelihood(model, context, greedy)[1]


# --- (b) left-padded batches equal one-by-one ---------------------------------------------


@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_loglikelihood_equals_one_by_one(model, batch_size):
    requests = instances("loglikelihood", REQUESTS)
    batched = make_lm(model, batch_size=batch_size).loglikelihood(requests)
    alone = make_lm(model, batch_size=1)
    for request, (logprob, greedy) in zip(requests, batched, strict=True):
        single, single_greedy = alone.loglikelihood([request])[0]
        assert abs(logprob - single) <= TOLERANCE and greedy == single_greedy


def test_float32_batches_match_one_by_one_to_float32_rounding(model):
    lm32 = HybridEvalLM(
        HybridLM(HybridConfig(**CONFIG)).eval().float().requires_grad_(False),
        tokenizer=ByteTokenizer(), batch_size=5, max_length=MAX_LENGTH, chunk_size=5,
    )  # fmt: skip
    lm32.model.load_state_dict(model.state_dict())
    lm32.progress = False
    requests = instances("loglikelihood", REQUESTS)
    batched = lm32.loglikelihood(requests)
    for request, (logprob, _) in zip(requests, batched, strict=True):
        assert logprob == pytest.approx(lm32.loglikelihood([request])[0][0], abs=1e-4)


# --- (c) rolling log-likelihoods ----------------------------------------------------------


def test_loglikelihood_rolling_equals_the_direct_sum_over_the_text(model):
    tokenizer = ByteTokenizer()
    short = "hello world"  # fits in the window: one forward over EOS + text
    long = "A text of sixty or so bytes, longer than the sixteen-token window."
    lm = make_lm(model, batch_size=3, max_length=16)
    results = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(short,), (long,)]))
    ids = tokenizer.encode(short)
    assert results[0] == pytest.approx(direct_loglikelihood(model, [EOS], ids)[0], abs=TOLERANCE)
    windows = [
        lm_utils.make_disjoint_window(pair)
        for pair in lm_utils.get_rolling_token_windows(tokenizer.encode(long), EOS, 16, 1)
    ]
    assert len(windows) > 3 and sum(len(pred) for _, pred in windows) == len(long)
    expected = sum(direct_loglikelihood(model, ctx, pred)[0] for ctx, pred in windows)
    assert results[1] == pytest.approx(expected, abs=TOLERANCE)


# --- (d) generation -----------------------------------------------------------------------


def reference_generation(model: HybridLM, context: str, until: list[str], max_gen_toks: int):
    """(text, tokens consumed): greedy tokens from plain forwards, decoded until a stop string
    appears or end-of-document, the text cut before the first stop string."""
    tokenizer = ByteTokenizer()
    decoder, text, used = tokenizer.decoder(), "", 0
    for token in greedy_tokens(model, tokenizer.encode(context), max_gen_toks):
        used += 1
        if token == EOS:
            break
        text += decoder.feed(token)
        if any(stop in text for stop in until):
            break
    for stop in until:
        text = text.split(stop)[0]
    return text, used


def count_decode_steps(monkeypatch, model: HybridLM) -> list[int]:
    calls: list[int] = []
    step = model.decode_step

    def counted(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(model, "decode_step", counted)
    return calls


def test_generate_until_stops_at_stop_strings_and_max_gen_toks(model, monkeypatch):
    contexts = ["The cat", "ab", "Once upon a time there was"]
    first = reference_generation(model, contexts[0], [], 12)[0]
    stop = first[3:5]  # a string the greedy continuation of the first context contains
    assert len(stop) == 2
    stopped = {"until": [stop], "max_gen_toks": 12}
    capped = {"until": [], "max_gen_toks": 5}
    arguments = [(c, stopped) for c in contexts] + [(c, capped) for c in contexts]
    expected = [reference_generation(model, c, [stop], 12) for c in contexts]
    expected += [reference_generation(model, c, [], 5) for c in contexts]
    requests = instances("generate_until", arguments)

    batched = make_lm(model, batch_size=3).generate_until(requests)
    assert batched == [text for text, _ in expected]
    assert stop not in batched[0] and first.startswith(batched[0])
    alone = make_lm(model, batch_size=1)
    for request, (text, used) in zip(requests, expected, strict=True):
        calls = count_decode_steps(monkeypatch, model)
        assert alone.generate_until([request]) == [text]
        assert len(calls) == used - 1  # the first new token comes from the prefill
    assert expected[0][1] < 12  # the stop string ended it early
    assert all(used == 5 for _, used in expected[3:])  # no stop: max_gen_toks tokens


def test_generate_until_rejects_an_unsupported_generation_kwarg(model):
    request = instances("generate_until", [("Hi", {"until": ["."], "num_beams": 4})])
    with pytest.raises(ValueError, match="unsupported generation kwarg 'num_beams'"):
        make_lm(model).generate_until(request)


# --- the registry -------------------------------------------------------------------------


def test_hybrid_is_registered_beside_lm_evals_own_models():
    """Importing our module registers `hybrid` and keeps lm-eval's own models (its registry
    loads them only while it is empty)."""
    assert get_model("hybrid") is HybridEvalLM and issubclass(HybridEvalLM, LM)
    assert {"hf", "dummy", "mamba_ssm"} <= set(model_registry)


# --- (e), (f) end to end on local tasks ---------------------------------------------------

QUESTIONS = [
    ("The cat sat on the", ["mat", "sky", "moon"], 0),
    ("A bird can", ["swim", "fly", "bark"], 1),
    ("The dog ate the", ["car", "song", "bone"], 2),
    ("Two plus two is", ["four", "five", "ten"], 0),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A float32 model directory with a byte-level BPE tokenizer.json."""
    folder = tmp_path_factory.mktemp("lm_eval") / "ckpt"
    text = " ".join(q + " " + " ".join(c) for q, c, _ in QUESTIONS) * 4
    tokenizer = train_bpe([text], 300, 100_000)
    torch.manual_seed(1)
    model = HybridLM(HybridConfig(**{**CONFIG, "vocab_size": tokenizer.vocab_size}))
    save_pretrained(model, folder)
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Local lm-eval tasks over jsonl files: multiple choice and generation."""
    folder = tmp_path_factory.mktemp("tasks")
    cache = folder / "hf_cache"
    (folder / "mc.jsonl").write_text(
        "".join(json.dumps({"q": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS)
    )
    (folder / "gen.jsonl").write_text(
        "".join(json.dumps({"q": q, "answer": c[a]}) + "\n" for q, c, a in QUESTIONS)
    )
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}"
        f"dataset_kwargs:\n  data_files: {{test: {folder / 'mc.jsonl'}}}\n  cache_dir: {cache}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}"
        f"dataset_kwargs:\n  data_files: {{test: {folder / 'gen.jsonl'}}}\n  cache_dir: {cache}\n"
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return folder


def run_eval(capsys, *argv) -> tuple[int, str, str]:
    code = eval_main(["lm-eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_hybrid_eval_lm_eval_runs_a_multiple_choice_task(capsys, checkpoint, task_dir):
    code, out, err = run_eval(
        capsys, "--checkpoint", checkpoint, "--tasks", "tiny_mc", "--include-path", task_dir,
        "--batch-size", 3, "--limit", 4, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    folder = checkpoint.parent / "eval" / "lm-eval"
    assert f"wrote {folder / 'results.json'}" in out and "tiny_mc" in out
    results = load_results(folder)
    assert results["task"] == "lm-eval" and results["settings"]["limit"] == 4
    rows = {(row["task"], row["metric"]): row for row in results["rows"]}
    accuracy = rows["tiny_mc", "acc"]["value"]
    assert rows["tiny_mc", "acc"]["samples"] == 4 and rows["tiny_mc", "acc"]["stderr"] >= 0
    assert results["accuracy"] == {"tiny_mc": accuracy}
    assert results["lm_eval"]["results"]["tiny_mc"]["acc,none"] == accuracy
    assert results["meta"]["tokenizer"]["kind"] == "HFTokenizer"
    # The accuracy is the argmax over the choices' log-likelihoods, scored here directly.
    lm = HybridEvalLM(checkpoint, max_length=2048)
    lm.progress = False
    correct = 0
    for question, choices, label in QUESTIONS:
        scores = lm.loglikelihood(
            instances("loglikelihood", [(question, f" {c}") for c in choices])
        )
        correct += max(range(len(choices)), key=lambda i: scores[i][0]) == label
    assert accuracy == correct / len(QUESTIONS)


def offline_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def test_lm_eval_command_line_with_model_hybrid(tmp_path, checkpoint, task_dir):
    """lm-eval's own command line (`python -m hybrid.eval.lm_eval_cli`, which registers the
    `hybrid` model first), on a multiple-choice and a generation task."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "hybrid.eval.lm_eval_cli", "--model", "hybrid",
        "--model_args", f"checkpoint={checkpoint},max_length=256", "--tasks", "tiny_mc,tiny_gen",
        "--include_path", str(task_dir), "--limit", "2", "--batch_size", "2", "--device", "cpu",
        "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny_mc" in done.stdout and "tiny_gen" in done.stdout
    [written] = out.rglob("results_*.json")
    results = json.loads(written.read_text())["results"]
    assert set(results) == {"tiny_mc", "tiny_gen"}
    assert 0 <= results["tiny_mc"]["acc,none"] <= 1
    assert 0 <= results["tiny_gen"]["exact_match,none"] <= 1


# --- (g) bad input: one line, exit 2 ------------------------------------------------------


def assert_one_line_error(code: int, err: str, start: str, *words: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), err
    for word in words:
        assert word in lines[0]


def test_unknown_task(capsys, checkpoint, task_dir):
    code, _, err = run_eval(
        capsys, "--checkpoint", checkpoint, "--tasks", "tiny_mc,hellaswg",
        "--include-path", task_dir,
    )  # fmt: skip
    assert_one_line_error(code, err, "hybrid eval lm-eval: error: --tasks:", "'hellaswg'",
                          "hellaswag")  # fmt: skip


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_eval(capsys, "--checkpoint", tmp_path / "none", "--tasks", "tiny_mc")
    assert_one_line_error(code, err, "hybrid eval lm-eval: error: --checkpoint:", "none")


def test_a_hub_task_offline_names_the_task_and_the_hub(capsys, monkeypatch, checkpoint, task_dir):
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_eval(capsys, "--checkpoint", checkpoint, "--tasks", "lambada_openai",
                            "--include-path", task_dir)  # fmt: skip
    assert_one_line_error(code, err, "hybrid eval lm-eval: error: --tasks: lambada_openai:",
                          "dataset hub", "--include-path")  # fmt: skip


def test_lm_eval_missing_is_one_line_with_the_install_command(capsys, monkeypatch, checkpoint):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails
    code, _, err = run_eval(capsys, "--checkpoint", checkpoint, "--tasks", "tiny_mc")
    assert_one_line_error(code, err, "hybrid eval lm-eval: error: lm-eval is not installed",
                          "pip install -e '.[eval]'")  # fmt: skip
    assert lm_eval_cli.main(["--model", "hybrid", "--tasks", "x"]) == 2
    assert "lm-eval >= 0.4.13 is needed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model_args", "words"),
    [
        ("checkpoint={ckpt},bogus=1", ["unknown key 'bogus'", "checkpoint, device"]),
        ("checkpoint={missing}", ["no such file or directory"]),
        ("dtype=float32", ["checkpoint=PATH is required"]),
        ("checkpoint={ckpt},batch_size=auto", ["batch_size=auto is not supported"]),
        ("checkpoint={ckpt},max_length=0", ["max_length must be a positive integer"]),
    ],
)
def test_bad_model_args_are_one_line(capsys, tmp_path, checkpoint, model_args, words):
    argv = ["--model", "hybrid", "--tasks", "tiny_mc", "--model_args",
            model_args.format(ckpt=checkpoint, missing=tmp_path / "missing")]  # fmt: skip
    code = lm_eval_cli.main(argv)
    start = "python -m hybrid.eval.lm_eval_cli: error: model_args:"
    assert_one_line_error(code, capsys.readouterr().err, start, *words)


def test_model_args_errors_from_the_python_api(checkpoint):
    with pytest.raises(ModelArgsError, match="unknown key 'pretrained'"):
        HybridEvalLM.create_from_arg_string(f"pretrained={checkpoint}")
    with pytest.raises(ModelArgsError, match="max_gen_toks must be a positive integer"):
        HybridEvalLM(checkpoint, max_gen_toks=-1)
    lm = HybridEvalLM.create_from_arg_string(
        f"checkpoint={checkpoint},batch_size=3", {"batch_size": 1, "device": "cpu"}
    )  # --model_args wins over lm-eval's own flags
    assert lm.batch_size == 3 and lm.device.type == "cpu"


def test_a_checkpoints_modules_are_imported_only_with_trust_remote_code(
    checkpoint, tmp_path, monkeypatch
):
    """The module writes a file when imported: without trust_remote_code it never runs."""
    module = "lab_blocks_for_lm_eval_trust_test"
    (tmp_path / f"{module}.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_suffix('.ran').write_text('ran')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "modules": [module]}))
    ran = tmp_path / f"{module}.ran"
    with pytest.raises(ModelArgsError, match="trust_remote_code=True"):
        HybridEvalLM.create_from_arg_string(f"checkpoint={copy}")
    with pytest.raises(ModelArgsError, match="trust_remote_code must be True or False"):
        HybridEvalLM.create_from_arg_string(f"checkpoint={copy},trust_remote_code=maybe")
    assert not ran.exists()
    lm = HybridEvalLM.create_from_arg_string(f"checkpoint={copy},trust_remote_code=True")
    assert ran.exists() and lm.model.config.modules == [module]
