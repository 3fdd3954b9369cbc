"""Bad checkpoints give one named error (file, field or tensor, what is wrong), never a traceback from deep
inside the loader, and nothing is allocated for sizes the files do not back (issue 14, defect 9)."""

from __future__ import annotations

import json
import resource
import shutil
import struct

import pytest
import torch

import moeinfer
from hf_peers import save_hf_checkpoint
from moeinfer.config import ConfigError
from moeinfer.loading.errors import CheckpointError
from tiny_tokenizer import write_tokenizer

NAMED = (CheckpointError, ConfigError)  # both are ValueErrors; the CLI prints them as one line


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    save_hf_checkpoint("mixtral", path)
    write_tokenizer(path)
    return path


@pytest.fixture
def copy(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "c")


def _edit_config(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))


def _load_fails(d, pattern, *, kind=NAMED):
    with pytest.raises(kind, match=pattern) as e:
        moeinfer.load(d, progress=False)
    return str(e.value)


@pytest.mark.parametrize("field,value,pattern", [
    ("hidden_size", [192], r"config\.json: hidden_size must be an integer, got an array \[192\]"),
    ("model_type", ["mixtral"], r"config\.json: model_type must be a string"),
    ("num_attention_heads", 0, r"config\.json: num_attention_heads must be >= 1, got 0"),
    ("intermediate_size", -5, r"config\.json: intermediate_size must be >= 1, got -5"),
    ("vocab_size", "97", r"config\.json: vocab_size must be an integer, got a string"),
    ("num_local_experts", 2.5, r"config\.json: num_local_experts must be an integer, got 2.5"),
    ("eos_token_id", [1, "x"], r"config\.json: eos_token_id\[1\] must be an integer"),
    ("rms_norm_eps", -1, r"config\.json: rms_norm_eps must be a positive number"),
    ("head_dim", 10**9, r"config\.json: head_dim=1000000000 is implausibly large"),
    ("num_hidden_layers", 10**9, r"num_hidden_layers=1000000000 is implausibly large"),
    ("num_hidden_layers", 5000, r"num_hidden_layers=5000, but the checkpoint holds only \d+ tensors"),
    ("num_local_experts", 10**9, r"num_local_experts=1000000000 is implausibly large"),
    ("num_local_experts", 5000, r"num_local_experts=5000 experts, but the checkpoint.s \d+ tensors cannot hold"),
])
def test_bad_config_field_is_named(copy, field, value, pattern):
    _edit_config(copy, **{field: value})
    assert str(copy / "config.json") in _load_fails(copy, pattern)


@pytest.fixture
def limited_memory():
    """Cap the address space at 4 GiB so that an allocation the files do not back fails loudly here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("vocab", [1e9, 10**9])
def test_huge_vocab_is_refused_before_allocating(copy, vocab, limited_memory):
    """vocab_size: 1e9 used to allocate 1e9 x hidden floats (and die in the allocator)."""
    _edit_config(copy, vocab_size=vocab)
    _load_fails(copy, r"lm_head\.weight' has shape \[97, 40\], expected \[1000000000, 40\] from config\.json")


def test_non_utf8_config_is_named(copy):
    raw = (copy / "config.json").read_bytes().replace(b'"mixtral"', b'"mixtr\xffl"')
    (copy / "config.json").write_bytes(raw)
    _load_fails(copy, r"config\.json is not UTF-8 text")


@pytest.mark.parametrize("content,pattern", [
    (b"[1, 2]", r"tokenizer_config\.json must hold a JSON object, not an array"),
    (b'{"bos_token": "\xff"}', r"tokenizer_config\.json is not UTF-8 text"),
    (b'{"eos_token": 5}', r"tokenizer_config\.json: eos_token must be a token string"),
    (b'{"chat_template": [1]}', r"tokenizer_config\.json: chat_template must be a string or a list"),
])
def test_bad_tokenizer_config_is_named(copy, content, pattern):
    (copy / "tokenizer_config.json").write_bytes(content)
    _load_fails(copy, pattern)


def _index(d, weight_map):
    header = _header(d)[1]
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    names = [k for k in header if k != "__metadata__"]
    wm = weight_map({k: "model-00001-of-00001.safetensors" for k in names})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


@pytest.mark.parametrize("weight_map,pattern", [
    (lambda m: {k: 5 for k in m}, r"weight_map\['.*'\] must be a shard file name, got an integer 5"),
    (lambda m: list(m.items()), r"weight_map must be an object .* not an array"),
    (lambda m: {**m, "lm_head.weight": "../../etc/passwd"}, r"'\.\./\.\./etc/passwd' leaves the checkpoint"),
    (lambda m: {**m, "lm_head.weight": "/etc/passwd"}, r"'/etc/passwd' leaves the checkpoint directory"),
], ids=["non-string", "list", "dotdot", "absolute"])
def test_bad_index_is_named(copy, weight_map, pattern):
    _index(copy, weight_map)
    msg = _load_fails(copy, pattern)
    assert "model.safetensors.index.json" in msg


def _header(d):
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, json.loads(raw[8:8 + n]), n


def _write_header(d, raw, header, n):
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def test_deeply_nested_header_is_named(copy):
    raw, _, n = _header(copy)
    body = ('{"x":' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    (copy / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    _load_fails(copy, r"model\.safetensors is corrupt: its header nests JSON too deeply", kind=CheckpointError)


def test_overlapping_offsets_are_refused(copy):
    raw, header, n = _header(copy)
    same = {}
    for k, v in header.items():
        if k != "__metadata__":
            same.setdefault((v["dtype"], tuple(v["shape"])), []).append(k)
    a, b = next(v for v in same.values() if len(v) > 1)[:2]
    header[b]["data_offsets"] = header[a]["data_offsets"]
    _write_header(copy, raw, header, n)
    _load_fails(copy, r"model\.safetensors is corrupt: tensors .* overlap", kind=CheckpointError)


def test_dtype_label_of_the_wrong_kind_is_refused(copy):
    """An I32 label over an F32 tensor's bytes has the right byte count; read as integers, it is garbage."""
    raw, header, n = _header(copy)
    header["lm_head.weight"]["dtype"] = "I32"
    _write_header(copy, raw, header, n)
    _load_fails(copy, r"tensor 'lm_head\.weight' is stored as I32, but its parameter holds floating-point")


def test_dtype_label_not_matching_byte_count_is_refused(copy):
    raw, header, n = _header(copy)
    header["lm_head.weight"]["dtype"] = "F16"
    _write_header(copy, raw, header, n)
    _load_fails(copy, r"tensor 'lm_head\.weight' claims \d+ bytes for shape \[97, 40\] F16")


def test_nan_weights_are_reported_with_check_weights(copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"][3, 4] = float("inf")
    save_file(tensors, copy / "model.safetensors")
    moeinfer.load(copy, progress=False)  # off by default for the Python API
    with pytest.raises(CheckpointError, match=r"NaN or Inf in layers\.1\.self_attn\.q_proj\.weight"):
        moeinfer.load(copy, progress=False, check_weights=True)


def test_checkpoint_path_that_is_a_file(ckpt):
    with pytest.raises(CheckpointError, match=r"config\.json is a file, not a checkpoint directory"):
        moeinfer.load(ckpt / "config.json", progress=False)


@pytest.mark.parametrize("device,pattern", [("banana", "not a device name"), ("meta", "meta holds no data"),
                                            ("mps", "mps has no kernels"), ("cuda:99", "cuda")])
def test_bad_device_is_named(ckpt, device, pattern):
    if device == "cuda:99" and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        raise AssertionError("a machine with 100 GPUs: pick another index")
    with pytest.raises(ValueError, match=pattern):
        moeinfer.load(ckpt, device=device, progress=False)


def test_good_checkpoint_still_loads_exactly(ckpt):
    """The checks change nothing for a good checkpoint: same logits as transformers' reference."""
    from transformers import AutoModelForCausalLM

    ours = moeinfer.load(ckpt, progress=False, check_weights=True)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.arange(12)[None] % 97
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max() <= 1e-5


def test_huge_max_position_embeddings_does_not_size_the_kv_cache(copy, limited_memory):
    """max_position_embeddings: 1e9 loaded, then `serve` tried to allocate a KV cache of that length; now the
    cache's bytes are checked first (a one-line error naming --max-model-len), and a given length works."""
    from moeinfer.engine.batching import make_cache

    _edit_config(copy, max_position_embeddings=1e9)
    model = moeinfer.load(copy, progress=False)
    with pytest.raises(ValueError, match=r"KV cache of 8 rows x 1,000,000,000 tokens needs .* --max-model-len"):
        make_cache(model, max_batch=8, max_context=None)
    cache = make_cache(model, max_batch=8, max_context=64)
    assert cache.max_length == 64 and cache.nbytes() == 8 * 64 * 2 * 2 * model.config.num_kv_heads \
        * model.config.head_dim * 4
