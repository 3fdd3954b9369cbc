"""Loading checkpoints: sharding, dtypes, and a clear error for every kind of bad input."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import moeinfer
from hf_peers import save_hf_checkpoint
from moeinfer.config import ConfigError
from moeinfer.loading.errors import CheckpointError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    hf = save_hf_checkpoint("mixtral", path)
    return path, hf


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _logits(model, vocab):
    ids = torch.arange(12).remainder(vocab)[None]
    with torch.no_grad():
        return model(ids) if isinstance(model, moeinfer.MoEModel) else model(input_ids=ids).logits


def test_sharded_checkpoint_loads_identically(ckpt, tmp_path):
    path, hf = ckpt
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    a = moeinfer.load(path, progress=False)
    b = moeinfer.load(tmp_path, progress=False)
    assert torch.equal(_logits(a, 97), _logits(b, 97))


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16", torch.float32])
def test_dtype_argument(ckpt, dtype):
    model = moeinfer.load(ckpt[0], dtype=dtype, progress=False)
    want = dtype if isinstance(dtype, torch.dtype) else torch.float16
    assert all(p.dtype == want for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    assert torch.isfinite(_logits(model, 97).float()).all()


def test_bad_dtype_is_named(ckpt):
    with pytest.raises(ValueError, match="int3"):
        moeinfer.load(ckpt[0], dtype="int3", progress=False)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        moeinfer.load(tmp_path / "nope", progress=False)


def test_missing_config(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        moeinfer.load(d, progress=False)


def test_unknown_model_type_lists_supported(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "switch_transformers"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="switch_transformers.*supported: .*mixtral"):
        moeinfer.load(d, progress=False)


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("rope_parameters", {"rope_type": "longrope",
                                                                                       "rope_theta": 1e4})])
def test_unhandled_config_value_is_named(ckpt, tmp_path, field, value):
    d = _copy(ckpt[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_act|longrope"):
        moeinfer.load(d, progress=False)


def test_pickle_only_checkpoint_is_refused(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        moeinfer.load(d, progress=False)


def test_missing_shard_is_named(ckpt, tmp_path):
    ckpt[1].save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        moeinfer.load(tmp_path, progress=False)


def test_truncated_file_is_named(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: tensor '.*'"):
        moeinfer.load(d, progress=False)


def test_corrupt_header_is_named(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        moeinfer.load(d, progress=False)


def test_garbage_file_is_named(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10**15) + b"x" * 20)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        moeinfer.load(d, progress=False)


def _rewrite(d, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")


def test_wrong_shape_is_named(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _rewrite(d, lambda t: t.__setitem__(name, torch.zeros(5, 5)))
    with pytest.raises(CheckpointError, match=rf"{name}.*shape \[5, 5\], expected \[40, 24\]"):
        moeinfer.load(d, progress=False)


def test_missing_tensor_is_named(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(d, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) {name} \(expected in model.safetensors\)"):
        moeinfer.load(d, progress=False)


def test_fused_expert_checkpoint_loads(ckpt, tmp_path):
    """Checkpoints written with transformers v5's fused [E, 2I, D] expert tensors load too."""
    from safetensors.torch import save_file

    model = moeinfer.load(ckpt[0], progress=False)
    tensors = {(name if name.startswith("lm_head") else f"model.{name}"): t.contiguous()
               for name, t in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    d = tmp_path / "fused"
    d.mkdir()
    save_file(tensors, d / "model.safetensors")
    (d / "config.json").write_text((ckpt[0] / "config.json").read_text())
    fused = moeinfer.load(d, progress=False)
    assert torch.equal(_logits(model, 97), _logits(fused, 97))


def test_failed_experts_can_be_masked_at_load(ckpt, tmp_path):
    """on_expert_error='mask': a missing, a mis-shaped and a non-finite expert are masked, not fatal."""
    d = _copy(ckpt[0], tmp_path / "c")

    def damage(t):
        t.pop("model.layers.0.block_sparse_moe.experts.2.w1.weight")
        t["model.layers.1.block_sparse_moe.experts.5.w2.weight"] = torch.zeros(3, 3)
        t["model.layers.1.block_sparse_moe.experts.7.w3.weight"][0, 0] = float("nan")

    _rewrite(d, damage)
    with pytest.raises(CheckpointError):
        moeinfer.load(d, progress=False)
    model = moeinfer.load(d, progress=False, on_expert_error="mask")
    assert sorted(model.failed_experts) == [(0, 2), (1, 5), (1, 7)]
    assert "missing" in model.failed_experts[(0, 2)] and "not finite" in model.failed_experts[(1, 7)]
    blocks = model.moe_blocks()
    routing = blocks[1].gate(torch.randn(64, 40))
    assert not torch.isin(routing.indices, torch.tensor([5, 7])).any()
    assert routing.rerouted is not None and int(routing.rerouted) > 0
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()
