"""The README's Python examples run as written, in order, in a fresh process.

The examples share one namespace, as a reader who pastes them one after another would. What
a block uses without defining (prompt ids, a draft model, a transformers directory) is set up
before it, small; ``torch.compile`` is replaced by the identity (compiling is tested in
tests/inference and takes tens of seconds on CPU).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Set-up run before the example block that starts with the given line.
SETUP = {
    "cache = model.allocate_cache(": """
        prompt_ids = torch.randint(0, 32000, (2, 100))
        next_ids = torch.randint(0, 32000, (2, 1))
    """,
    "out = model.generate(": """
        ids = prompt_ids[:, :12]
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # the second prompt is left-padded
        eos = 0
        target = model
        draft = hybrid.HybridLM(hybrid.HybridConfig(pattern="M-", vocab_size=32000, d_model=64))
    """,
    "from hybrid.convert import from_hf, to_hf": """
        from hybrid.convert import to_hf as _to_hf
        _small = hybrid.HybridConfig(pattern="M-*-", vocab_size=64, d_model=32,
                                     mamba2={"d_state": 8, "headdim": 8}, attention={"n_heads": 2})
        _to_hf(hybrid.HybridLM(_small), "path/to/bamba-9b", model_type="bamba")
    """,
}


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_every_example_block_is_known():
    """A new block that needs set-up gets an entry in SETUP (or defines what it uses)."""
    blocks = readme_blocks()
    assert len(blocks) >= 6
    starts = [block.lstrip().splitlines()[0] for block in blocks]
    for key in SETUP:
        assert any(start.startswith(key) for start in starts), f"no README block starts {key!r}"


def test_readme_examples_run(tmp_path):
    parts = ["import torch\ntorch.compile = lambda function, **options: function\n"]
    for block in readme_blocks():
        first = block.lstrip().splitlines()[0]
        parts += [textwrap.dedent(code) for key, code in SETUP.items() if first.startswith(key)]
        parts.append(block)
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(parts) + "\nprint('README examples ran')\n")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "README examples ran" in result.stdout
