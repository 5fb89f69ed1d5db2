"""The CPU description and allocator settings that timings record."""

from __future__ import annotations

import torch

from hybrid.provenance import allocator_settings, cpu_description


def test_cpu_description_names_the_vector_width_and_threads():
    text = cpu_description()
    assert text.startswith("CPU ")
    assert f"({torch.backends.cpu.get_cpu_capability()})" in text
    assert text.endswith(f", {torch.get_num_threads()} threads")
    assert cpu_description(threads=7).endswith(", 7 threads")


def test_allocator_settings_are_the_malloc_tunables_set(monkeypatch):
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4000000000")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    monkeypatch.setenv("MALLOCATED", "not a tunable")
    settings = allocator_settings()
    assert settings["MALLOC_MMAP_THRESHOLD_"] == "4000000000"
    assert settings["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=1"
    assert "MALLOCATED" not in settings and "MALLOC_TRIM_THRESHOLD_" not in settings
