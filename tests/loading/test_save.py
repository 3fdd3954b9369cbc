"""moeinfer.save writes HF checkpoints that transformers and moeinfer load with the same logits."""

from __future__ import annotations

import pytest
import torch

import moeinfer
from hf_peers import save_hf_checkpoint
from tiny_tokenizer import write_tokenizer

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf_checkpoint(request.param, path, vocab_size=300)
    write_tokenizer(path)
    return moeinfer.load(path, progress=False)


def _ids():
    return torch.tensor([[5, 17, 250, 3, 99, 42, 7]])


def test_transformers_loads_saved_checkpoint(loaded, tmp_path):
    from transformers import AutoModelForCausalLM

    out = moeinfer.save(loaded, tmp_path / "saved", max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (hf(input_ids=_ids()).logits - loaded(_ids())).abs().max().item()
    assert diff <= 1e-5


def test_round_trip_is_exact(loaded, tmp_path):
    out = moeinfer.save(loaded, tmp_path / "saved")
    again = moeinfer.load(out, progress=False)
    with torch.no_grad():
        assert torch.equal(again(_ids()), loaded(_ids()))
    assert again.tokenizer.encode("to be or not") == loaded.tokenizer.encode("to be or not")
    assert again.tokenizer.chat_template == loaded.tokenizer.chat_template


def test_bf16_save_keeps_dtype(loaded, tmp_path):
    model = moeinfer.load(loaded.source_dir, dtype=torch.bfloat16, progress=False)
    out = moeinfer.save(model, tmp_path / "bf16")
    again = moeinfer.load(out, progress=False)  # dtype=None: the checkpoint's own
    assert again.dtype == torch.bfloat16


def test_save_replaces_existing_dir(loaded, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    moeinfer.save(loaded, dest)
    assert not (dest / "stale.txt").exists()
    assert (dest / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_save_leaves_nothing(loaded, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    dest = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        moeinfer.save(loaded, dest)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_checkpoint(loaded, tmp_path, monkeypatch):
    dest = moeinfer.save(loaded, tmp_path / "out")
    before = sorted(p.name for p in dest.iterdir())
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        moeinfer.save(loaded, dest)
    assert sorted(p.name for p in dest.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_saved_checkpoint_has_usual_permissions(loaded, tmp_path):
    import os
    import stat

    from moeinfer.fsutil import umask

    out = moeinfer.save(loaded, tmp_path / "perm")
    mask = umask()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~mask
    for f in out.iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~mask, f.name
