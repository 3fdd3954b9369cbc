"""moeinfer.save writes HF checkpoints that transformers and moeinfer load with the same logits."""

from __future__ import annotations

import pytest
import torch

import moeinfer
from hf_peers import save_hf_checkpoint
from moeinfer.fsutil import OutputDirError
from tiny_tokenizer import write_tokenizer

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf_checkpoint(request.param, path, vocab_size=300)
    write_tokenizer(path)
    return moeinfer.load(path, progress=False)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """One architecture for the write-safety tests: they exercise the writer, not the family's names."""
    path = tmp_path_factory.mktemp("one")
    save_hf_checkpoint("mixtral", path, vocab_size=300)
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


def test_save_into_empty_dir(mixtral, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    moeinfer.save(mixtral, dest)
    assert (dest / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_refuses_a_directory_that_is_not_a_checkpoint(mixtral, tmp_path):
    """Defect 1 (issue 14): a non-empty directory that holds no checkpoint was silently replaced."""
    dest = tmp_path / "project"
    (dest / ".git").mkdir(parents=True)
    (dest / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match="not empty and does not hold a checkpoint"):
            moeinfer.save(mixtral, dest, overwrite=overwrite)
    assert sorted(p.name for p in dest.iterdir()) == [".git", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["project"]


def test_save_replaces_a_checkpoint_only_with_overwrite(mixtral, tmp_path):
    dest = moeinfer.save(mixtral, tmp_path / "out")
    (dest / "stale.txt").write_text("old")
    with pytest.raises(OutputDirError, match="already holds a checkpoint.*overwrite"):
        moeinfer.save(mixtral, dest)
    assert (dest / "stale.txt").exists()
    moeinfer.save(mixtral, dest, overwrite=True)
    assert not (dest / "stale.txt").exists()
    assert (dest / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_refuses_current_directory_and_source(mixtral, tmp_path, monkeypatch):
    """`--out .` and the source checkpoint (or a parent of it) need overwrite, even when empty / a checkpoint."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(OutputDirError, match="current directory"):
        moeinfer.save(mixtral, ".")
    with pytest.raises(OutputDirError, match="current directory"):
        moeinfer.save(mixtral, "..")
    monkeypatch.chdir(tmp_path.parent)
    source = moeinfer.load(moeinfer.save(mixtral, tmp_path / "src"), progress=False)
    for dest in (tmp_path / "src", tmp_path):
        with pytest.raises(OutputDirError, match="src, an input of this run"):
            moeinfer.save(source, dest)
    assert list(cwd.iterdir()) == []
    moeinfer.save(source, tmp_path / "src", overwrite=True)  # asked: compress in place
    assert moeinfer.load(tmp_path / "src", progress=False).config == source.config


def test_save_refuses_a_file(mixtral, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a directory"):
        moeinfer.save(mixtral, tmp_path / "f", overwrite=True)
    assert (tmp_path / "f").read_text() == "x"


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
        moeinfer.save(loaded, dest, overwrite=True)
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


@pytest.mark.parametrize("kill_after", [1, 2, 3])
@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "two-renames"])
def test_killed_save_keeps_a_loadable_checkpoint(mixtral, tmp_path, kill_after, atomic, monkeypatch):
    """Defect 6 (issue 14): kill -9 after the k-th rename of a save over an existing checkpoint; the
    directory still loads (old or new) once the next run starts, and the next save leaves no debris."""
    import os

    from moeinfer import fsutil

    if not atomic:
        monkeypatch.setattr(fsutil, "exchange_dirs", lambda a, b: False)
    dest = moeinfer.save(mixtral, tmp_path / "out")
    pid = os.fork()
    if pid == 0:
        try:
            n = {"renames": 0}

            def counted(fn):
                def wrapper(*a, **k):
                    out = fn(*a, **k)
                    n["renames"] += 1
                    if n["renames"] == kill_after:
                        os._exit(9)
                    return out
                return wrapper

            os.replace = counted(os.replace)
            fsutil.exchange_dirs = counted(fsutil.exchange_dirs)
            moeinfer.save(mixtral, dest, overwrite=True)
            os._exit(0)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 9)
    fsutil.recover_dir(dest)  # the first step of any later write
    again = moeinfer.load(dest, progress=False)
    with torch.no_grad():
        assert torch.equal(again(_ids()), mixtral(_ids()))
    moeinfer.save(mixtral, dest, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
