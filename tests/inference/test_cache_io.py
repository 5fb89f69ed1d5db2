"""Saving and loading the inference cache: prefill in one process and decode in another gives
the single-process tokens; wrong configs, corrupt and missing files fail clearly; saves are
atomic; a bf16 cache keeps float32 SSM state."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model

import hybrid.inference.cache_io
from hybrid import HybridConfig, HybridLM
from hybrid.inference.cache_io import load_cache, save_cache

PATTERN = ["M", {"block": "attention", "window": 5}, "S", "*", "E"]
BASE = {
    "vocab_size": 40,
    "d_model": 32,
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
    "mamba1": {"d_state": 4},
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "kda": {"n_heads": 2, "head_k_dim": 8, "chunk_size": 8},
    "latent_attention": {"n_heads": 2, "kv_lora_rank": 16},
    "moe": {"n_experts": 4, "expert_hidden_size": 16},
}
MAX_SEQLEN = 32
N_DECODE = 8

# Run in a fresh interpreter: rebuild the model from its config and weights, load the cache
# and greedy-decode, starting from the token the prefill process picked.
DECODE_SCRIPT = """
import json, sys
import torch
from safetensors.torch import load_model
from hybrid import HybridConfig, HybridLM
from hybrid.inference.cache_io import load_cache

config_path, weights_path, cache_path, first_path, n_steps, out_path = sys.argv[1:]
model = HybridLM(HybridConfig.from_dict(json.load(open(config_path)))).eval()
load_model(model, weights_path)
cache = load_cache(model, cache_path)
token = torch.tensor(json.load(open(first_path)))[:, None]
tokens = [token[:, 0].tolist()]
with torch.no_grad():
    for _ in range(int(n_steps) - 1):
        token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token[:, 0].tolist())
json.dump({"tokens": tokens, "length": cache.length,
           "real_lengths": cache.real_lengths.tolist()}, open(out_path, "w"))
"""


def make_model(seed=0, pattern=PATTERN, **overrides):
    torch.manual_seed(seed)
    return HybridLM(HybridConfig(pattern, **{**BASE, **overrides})).eval()


def left_pad(sequences):
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[0] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask


@torch.no_grad()
def prefill(model, ids, mask=None, dtype=None):
    """A cache holding the prompt, and the greedy first tokens (batch,)."""
    cache = model.allocate_cache(ids.shape[0], MAX_SEQLEN, dtype)
    logits = model(ids, cache=cache, attention_mask=mask).logits
    return cache, logits[:, -1].argmax(-1)


@torch.no_grad()
def greedy(model, cache, first, n_steps):
    """[first, then n_steps - 1 greedy tokens], each a list over the batch."""
    token, tokens = first[:, None], [first.tolist()]
    for _ in range(n_steps - 1):
        token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token[:, 0].tolist())
    return tokens


def saved_cache(tmp_path, model=None, name="cache.safetensors"):
    model = model or make_model()
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    cache, _ = prefill(model, ids)
    path = tmp_path / name
    save_cache(cache, path)
    return model, cache, path


def rewrite(path, edit_header=None, edit_tensors=None):
    """Re-save ``path`` with its JSON header / tensor dict edited (to forge bad files)."""
    with safe_open(str(path), framework="pt") as file:
        header = json.loads(file.metadata()["hybrid_cache"])
        tensors = {name: file.get_tensor(name) for name in sorted(file.keys())}
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata={"hybrid_cache": json.dumps(header)})


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left_padded"])
def test_prefill_and_decode_in_another_process_match_one_process(tmp_path, padded):
    model = make_model(seed=1)
    gen = torch.Generator().manual_seed(2)
    if padded:
        lengths = (13, 4, 1, 9)
        ids, mask = left_pad([torch.randint(1, 40, (n,), generator=gen).tolist() for n in lengths])
    else:
        ids, mask = torch.randint(0, 40, (2, 12), generator=gen), None

    cache, first = prefill(model, ids, mask)
    expected = greedy(model, cache.copy(), first, N_DECODE)  # single process

    save_cache(cache, tmp_path / "cache.safetensors")
    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    (tmp_path / "first.json").write_text(json.dumps(first.tolist()))
    (tmp_path / "decode.py").write_text(DECODE_SCRIPT)
    args = ["config.json", "model.safetensors", "cache.safetensors", "first.json"]
    subprocess.run(
        [sys.executable, "decode.py", *args, str(N_DECODE), "out.json"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    got = json.loads((tmp_path / "out.json").read_text())

    assert got["tokens"] == expected
    prompt = ids.shape[1]
    real = mask.sum(1).tolist() if padded else [prompt] * ids.shape[0]
    assert got["length"] == prompt + N_DECODE - 1
    assert got["real_lengths"] == [n + N_DECODE - 1 for n in real]


@pytest.mark.parametrize("pattern", [PATTERN, ["M", {"block": "attention", "window": 5}, "K", "L"]])
def test_round_trip_restores_every_tensor_and_continues_identically(pattern, tmp_path):
    model = make_model(pattern=pattern)
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(3))
    cache, first = prefill(model, ids)
    cache.select(torch.tensor([2, 0]))  # a cache after beam reordering / dropping rows
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(model, tmp_path / "c.safetensors", device="cpu")

    assert (loaded.batch_size, loaded.max_seqlen, loaded.length) == (2, MAX_SEQLEN, 9)
    assert loaded.fingerprint == cache.fingerprint
    assert torch.equal(loaded.real_lengths, cache.real_lengths)
    for saved, restored in zip(cache.entries, loaded.entries, strict=True):
        assert type(saved) is type(restored)
        if saved is not None:
            for name, tensor in saved.tensors().items():
                assert torch.equal(restored.tensors()[name], tensor), name
    assert loaded.entries[1].window == 5  # the ring of the windowed attention sublayer
    first = first[[2, 0]]
    assert greedy(model, loaded, first, 5) == greedy(model, cache, first, 5)


def test_bf16_cache_keeps_float32_ssm_state(tmp_path):
    model = make_model().to(torch.bfloat16)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(4))
    cache, first = prefill(model, ids)
    save_cache(cache, tmp_path / "bf16.safetensors")
    with safe_open(str(tmp_path / "bf16.safetensors"), framework="pt") as file:
        assert json.loads(file.metadata()["hybrid_cache"])["dtype"] == "bfloat16"
    loaded = load_cache(model, tmp_path / "bf16.safetensors")

    for index in (0, 2):  # Mamba-2, Mamba-1
        assert loaded.entries[index].conv_state.dtype == torch.bfloat16
        assert loaded.entries[index].ssm_state.dtype == torch.float32
        assert torch.equal(loaded.entries[index].ssm_state, cache.entries[index].ssm_state)
    for index in (1, 3):  # windowed and full attention
        assert loaded.entries[index].keys.dtype == torch.bfloat16
        assert torch.equal(loaded.entries[index].values, cache.entries[index].values)
    assert greedy(model, loaded, first, 4) == greedy(model, cache, first, 4)


def test_cache_from_another_config_is_refused(tmp_path):
    _, cache, path = saved_cache(tmp_path)
    other = make_model(d_model=48)
    with pytest.raises(ValueError) as error:
        load_cache(other, path)
    message = str(error.value)
    assert message.startswith(str(path))
    assert "cache was written by a model with another config" in message
    assert cache.fingerprint in message and other.config.fingerprint() in message
    # Same blocks, another attention window: the fingerprint tells them apart too.
    windowed = make_model(pattern=["M", {"block": "attention", "window": 6}, "S", "*", "E"])
    with pytest.raises(ValueError, match="another config"):
        load_cache(windowed, path)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "last_byte_cut", "random_bytes", "empty", "text", "missing", "directory"],
)
def test_damaged_or_missing_file_fails_naming_the_path(tmp_path, damage):
    model, _, path = saved_cache(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "last_byte_cut":
        path.write_bytes(data[:-1])
    elif damage == "random_bytes":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("this is not a cache\n")
    elif damage == "missing":
        path.unlink()
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(ValueError) as error:
        load_cache(model, path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    expected = {"missing": "no such file", "directory": "not a regular file"}
    assert expected.get(damage, "not a readable safetensors cache file") in message


def set_key(key, value):
    return lambda header: header.__setitem__(key, value)


def set_layer(index, value):
    return lambda header: header["layers"].__setitem__(index, value)


@pytest.mark.parametrize(
    ("edit_header", "edit_tensors", "expected"),
    [
        (lambda h: h.clear(), None, "header is not a 'hybrid-cache' header"),
        (set_key("version", 99), None, "cache format version 99; this code reads 1"),
        (set_key("length", "7"), None, "bad or missing 'length'"),
        (set_key("length", 99), None, "length 99 outside [0, max_seqlen=32]"),
        (set_key("dtype", "floaty"), None, "unknown dtype 'floaty'"),
        (lambda h: h["layers"].pop(), None, "cache has 4 layers, the model 5"),
        (set_layer(4, {"type": "KVCache", "fields": {}}), None, "saved cache entry is KVCache"),
        (set_layer(0, None), None, "layers[0]: saved cache entry is no entry, the model's is"),
        (set_layer(2, {"type": "KVCache", "fields": {}}), None, "the model's is SSMCache"),
        (
            set_layer(1, {"type": "KVCache", "fields": {"window": 4}}),
            None,
            "KVCache settings differ",
        ),
        (set_key("batch_size", 3), None, "real_lengths holds shape (2,), but the header's"),
        (
            set_key("dtype", "float64"),
            None,
            "conv_state: saved (2, 80, 3) torch.float32, expected (2, 80, 3) torch.float64",
        ),
        (
            None,
            lambda t: t.__setitem__("layers.3.keys", t["layers.3.keys"].half()),
            "cache entry keys: saved (2, 2, 32, 8) torch.float16",
        ),
        (None, lambda t: t.pop("layers.2.ssm_state"), "cache entry fields differ"),
        (None, lambda t: t.__setitem__("extra", torch.ones(1)), "unexpected ['extra']"),
        (None, lambda t: t.pop("real_lengths"), "missing ['real_lengths']"),
        (
            None,
            lambda t: t.__setitem__("real_lengths", torch.ones(2)),
            "real_lengths: saved (2,) torch.float32",
        ),
    ],
)
def test_inconsistent_files_fail_with_one_line(tmp_path, edit_header, edit_tensors, expected):
    model, _, path = saved_cache(tmp_path)
    rewrite(path, edit_header, edit_tensors)
    with pytest.raises(ValueError) as error:
        load_cache(model, path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in message, message


def test_file_without_header_is_refused(tmp_path):
    model = make_model()
    path = tmp_path / "weights.safetensors"
    save_model(model, str(path))
    with pytest.raises(ValueError, match="no 'hybrid_cache' header; not a file written by"):
        load_cache(model, path)


def test_loading_never_modifies_the_file(tmp_path):
    model, _, path = saved_cache(tmp_path)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    load_cache(model, path)
    with pytest.raises(ValueError):
        load_cache(make_model(d_model=48), path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert os.listdir(tmp_path) == [path.name]


def test_failed_save_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    model, _, path = saved_cache(tmp_path)
    good = path.read_bytes()
    ids = torch.randint(0, 40, (2, 5))
    new_cache, _ = prefill(model, ids)

    def crash_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial" * 100)  # some bytes hit the disk, then...
        raise OSError("disk full")

    monkeypatch.setattr(hybrid.inference.cache_io, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_cache(new_cache, path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == [path.name]
    assert load_cache(model, path).length == 11

    monkeypatch.undo()
    save_cache(new_cache, path)  # a save that completes replaces the old file
    assert load_cache(model, path).length == 5
    assert os.listdir(tmp_path) == [path.name]


def test_interrupted_save_to_a_new_path_leaves_nothing(tmp_path, monkeypatch):
    model = make_model()
    cache, _ = prefill(model, torch.randint(0, 40, (1, 4)))

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(hybrid.inference.cache_io, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_cache(cache, tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == []


def test_saved_tensors_are_named_per_layer_and_field(tmp_path):
    _, cache, path = saved_cache(tmp_path)
    with safe_open(str(path), framework="pt") as file:
        names = set(file.keys())
        header = json.loads(file.metadata()["hybrid_cache"])
    assert names == {
        "real_lengths",
        *(f"layers.{i}.{f}" for i in (0, 2) for f in ("conv_state", "ssm_state")),
        *(f"layers.{i}.{f}" for i in (1, 3) for f in ("keys", "values", "key_index", "valid")),
    }
    assert header["fingerprint"] == cache.fingerprint
    assert (header["batch_size"], header["max_seqlen"], header["length"]) == (2, 32, 11)
    assert header["dtype"] == "float32"
    assert header["layers"][1] == {"type": "KVCache", "fields": {"window": 5}}
    assert header["layers"][3] == {"type": "KVCache", "fields": {"window": None}}
    assert header["layers"][4] is None
    assert header["layers"][0] == {"type": "SSMCache", "fields": {}}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("batch_size", 10**6, r"real_lengths holds shape \(2,\), but the header's batch_size "
                              r"1000000 and max_seqlen 32 give \(1000000,\)"),
        ("max_seqlen", 10**9, r"layers\.\d\.\w+ holds shape \(2, .*\), but the header's "
                              r"batch_size 2 and max_seqlen 1000000000 give"),
        ("max_seqlen", 33, r"but the header's batch_size 2 and max_seqlen 33 give"),
    ],
)  # fmt: skip
def test_header_sizes_are_checked_against_the_tensors_before_allocating(
    tmp_path, monkeypatch, key, value, expected
):
    model, _, path = saved_cache(tmp_path)
    rewrite(path, set_key(key, value))
    allocated = []
    original = HybridLM.allocate_cache

    def recorded(self, *args, **kwargs):
        allocated.append(kwargs.get("device"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HybridLM, "allocate_cache", recorded)
    with pytest.raises(ValueError, match=expected):
        load_cache(model, path)
    assert allocated == ["meta"]  # only the shapes, never the memory the header claims


def flip_byte_in_tensor_data(path, offset_from_end=1):
    data = bytearray(path.read_bytes())
    header_bytes = int.from_bytes(data[:8], "little")
    position = len(data) - offset_from_end
    assert position >= 8 + header_bytes  # inside the tensor data, not the header
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset_from_end", [1, 100, 4000])
def test_a_flipped_bit_in_tensor_data_fails_loading(tmp_path, offset_from_end):
    model, _, path = saved_cache(tmp_path)
    load_cache(model, path)
    flip_byte_in_tensor_data(path, offset_from_end)
    with pytest.raises(ValueError, match=r"cache\.safetensors: tensor data do not match their "
                                         r"checksum \(the file is damaged\)$"):  # fmt: skip
        load_cache(model, path)
