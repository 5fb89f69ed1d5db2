"""The CPU description that timings record."""

from __future__ import annotations

import torch

from hybrid.provenance import cpu_description


def test_cpu_description_names_the_vector_width_and_threads():
    text = cpu_description()
    assert text.startswith("CPU ")
    assert f"({torch.backends.cpu.get_cpu_capability()})" in text
    assert text.endswith(f", {torch.get_num_threads()} threads")
