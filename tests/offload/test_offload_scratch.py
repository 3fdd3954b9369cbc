"""Scratch expert stores (a disk tier for which the caller named no folder: `moeinfer.fsutil.scratch_dir`)
are deleted when the offload runtime closes, and when the process exits; a folder the caller named, or a
checkpoint used as the disk tier, never is."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moeinfer
from moeinfer.loading.checkpoint import load_checkpoint
from moeinfer.models import resolve_model_path
from moeinfer.offload import OffloadConfig, offload_
from moeinfer.planning import Plan, PlanOffload, apply_plan_, load_planned

LAYERS = 4


def _plan(precision: str) -> Plan:
    return Plan(model="tiny", device="cpu", budget_bytes=10**9, objective="latency", precisions=(precision,) * LAYERS,
                offload=PlanOffload(tier="disk", cache_experts=6, policy="lru"))


@pytest.mark.parametrize("how", ["apply_plan_", "load_planned"])
def test_a_plans_scratch_store_is_deleted_when_the_runtime_closes(how):
    model = (apply_plan_(moeinfer.load("tiny", progress=False), _plan("int4")) if how == "apply_plan_"
             else load_planned("tiny", _plan("int4"), progress=False))
    root = model.offload.store.root
    assert root.name.startswith("moeinfer-experts-") and any(root.glob("experts-*.safetensors"))
    model.offload.close()
    assert not root.exists()


def test_a_folder_the_caller_named_is_kept(tmp_path):
    model = load_planned("tiny", _plan("int4"), offload_dir=tmp_path / "mine", progress=False)
    model.offload.close()
    assert len(list((tmp_path / "mine").glob("experts-*.safetensors"))) == LAYERS


def test_a_checkpoint_used_as_the_disk_tier_is_never_deleted(tmp_path):
    ckpt = tmp_path / "tiny"
    shutil.copytree(resolve_model_path("tiny"), ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    model = load_checkpoint(ckpt, progress=False, experts_on_disk=True)
    offload_(model, OffloadConfig(tier="disk", offload_dir=ckpt, cache=6, remove_offload_dir=True))
    model.offload.close()
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_a_failed_load_removes_its_scratch_store(monkeypatch):
    import moeinfer.fsutil as fsutil
    import moeinfer.planning.load as load_mod
    import moeinfer.planning.quantize_load as qload

    made: list[str] = []
    real = fsutil.scratch_dir
    monkeypatch.setattr(load_mod, "scratch_dir", lambda prefix: made.append(real(prefix)) or made[-1])
    monkeypatch.setattr(qload, "read_layer_experts", lambda store, position: (_ for _ in ()).throw(OSError("bad disk")))
    with pytest.raises(OSError, match="bad disk"):
        load_planned("tiny", _plan("int4"), progress=False)
    assert made and not Path(made[0]).exists()


def test_scratch_folders_are_removed_when_the_process_exits():
    code = ("from moeinfer.fsutil import scratch_dir; import pathlib; p = scratch_dir('moeinfer-test-'); "
            "(pathlib.Path(p) / 'f').write_text('x'); print(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out and not Path(out).exists()


def test_the_cli_and_the_benchmark_mark_the_folders_they_make_as_scratch(tmp_path):
    from moeinfer.bench.config import parse_offload
    from moeinfer.cli import build_parser
    from moeinfer.cli.options.offload import config_from_args

    args = build_parser().parse_args(["generate", "--model", "tiny", "--offload", "disk", "hello"])

    cfg = config_from_args(args)
    assert cfg.remove_offload_dir and Path(cfg.offload_dir).name.startswith("moeinfer-experts-")
    named = build_parser().parse_args(["generate", "--model", "tiny", "--offload", "disk", "--offload-dir",
                                       str(tmp_path), "hello"])
    assert not config_from_args(named).remove_offload_dir
    assert parse_offload("lru:8").remove_offload_dir
