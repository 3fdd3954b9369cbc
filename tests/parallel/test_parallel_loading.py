"""Loading only some experts (what each expert-parallel rank does), and the torchrun command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_peers import save_hf_checkpoint

from moeinfer.loading.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ep_load") / "mixtral"
    save_hf_checkpoint("mixtral", path, num_local_experts=6)
    return path


def test_expert_slots_read_only_listed_experts(ckpt, caplog):
    full = load_checkpoint(ckpt, progress=False)
    part = load_checkpoint(ckpt, progress=False, expert_slots={0: [4, 1], 1: [5]})
    assert not [r for r in caplog.records if "ignoring" in r.getMessage()]  # skipped experts are expected
    for block, pblock, rows in zip(full.moe_blocks(), part.moe_blocks(), ([4, 1], [5])):
        assert torch.equal(pblock.experts.gate_up_proj, block.experts.gate_up_proj[rows])
        assert torch.equal(pblock.experts.down_proj, block.experts.down_proj[rows])
    assert torch.equal(part.embed_tokens.weight, full.embed_tokens.weight)


def test_expert_slots_from_fused_tensors(ckpt, tmp_path):
    """A checkpoint with stacked [E, ...] expert tensors is read row by row."""
    from safetensors.torch import save_file

    full = load_checkpoint(ckpt, progress=False)
    tensors = {}
    for name, t in full.state_dict().items():
        key = name if name.startswith("lm_head.") else f"model.{name}"
        tensors[key] = t.contiguous()
    out = tmp_path / "fused"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    part = load_checkpoint(out, progress=False, expert_slots={0: [0, 3], 1: [2]})
    assert torch.equal(part.moe_blocks()[0].experts.gate_up_proj, full.moe_blocks()[0].experts.gate_up_proj[[0, 3]])
    assert torch.equal(part.moe_blocks()[1].experts.down_proj, full.moe_blocks()[1].experts.down_proj[[2]])


def test_expert_slots_errors(ckpt):
    with pytest.raises(ValueError, match="not an MoE layer"):
        load_checkpoint(ckpt, progress=False, expert_slots={7: [0]})
    with pytest.raises(ValueError, match=r"distinct experts in 0\.\.5"):
        load_checkpoint(ckpt, progress=False, expert_slots={0: [0, 0]})


def test_expert_parallel_needs_torchrun(ckpt, monkeypatch):
    import moeinfer
    from moeinfer.parallel import ExpertParallelConfig, ExpertParallelError

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ExpertParallelError, match="torchrun --nproc-per-node N"):
        moeinfer.load(ckpt, progress=False, expert_parallel=ExpertParallelConfig(size=2))


def test_config_validation():
    from moeinfer.config import ConfigError
    from moeinfer.parallel import ExpertParallelConfig

    with pytest.raises(ConfigError, match="valid: replicated, sharded"):
        ExpertParallelConfig(tokens="scattered")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout_s must be > 0"):
        ExpertParallelConfig(timeout_s=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_generate_matches_single_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m moeinfer generate --expert-parallel 2`: rank 0 alone prints,
    and the text equals the single-process run."""
    from tiny_tokenizer import write_tokenizer

    path = tmp_path / "qwen"
    save_hf_checkpoint("qwen2_moe", path, vocab_size=300)
    write_tokenizer(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["generate", "-m", str(path), "-n", "6", "hello world"]
    single = subprocess.run([sys.executable, "-m", "moeinfer", *args], capture_output=True, text=True, env=env,
                            timeout=300, check=True)
    from test_parallel_ep import free_port

    torchrun = Path(sys.executable).with_name("torchrun")
    multi = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                            str(free_port()), "-m", "moeinfer", *args, "--expert-parallel", "2", "--placement",
                            "round_robin"], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout == single.stdout  # printed once, identical
