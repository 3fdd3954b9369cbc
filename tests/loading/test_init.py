"""`moeinfer init`: random-weight checkpoints with real shapes, loadable by moeinfer and transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import moeinfer
from moeinfer.cli import main
from moeinfer.config import ConfigError
from moeinfer.loading.random_init import init_checkpoint, tensor_specs
from moeinfer.loading.shapes import SHAPES, resolve_shape
from peer_checks import max_logit_diff

V = "vocab_size=6144"  # the shipped tokenizer's size: the smallest vocabulary init accepts
TINY = {
    "olmoe": f"hidden_size=64,intermediate_size=32,num_experts=8,num_experts_per_tok=2,num_attention_heads=4,"
             f"num_key_value_heads=4,{V}",
    "qwen3_moe": f"hidden_size=64,intermediate_size=96,moe_intermediate_size=32,num_experts=8,num_experts_per_tok=2,"
                 f"num_attention_heads=4,num_key_value_heads=2,head_dim=16,{V}",
    "mixtral": f"hidden_size=64,intermediate_size=32,num_local_experts=4,num_attention_heads=4,num_key_value_heads=2,{V}",
    "deepseek_v2": f"hidden_size=64,intermediate_size=96,moe_intermediate_size=32,n_routed_experts=8,"
                   f"num_experts_per_tok=2,num_attention_heads=4,num_key_value_heads=4,kv_lora_rank=16,"
                   f"qk_nope_head_dim=8,qk_rope_head_dim=8,v_head_dim=8,{V}",
    "deepseek_v3": f"hidden_size=64,intermediate_size=96,moe_intermediate_size=32,n_routed_experts=8,"
                   f"num_experts_per_tok=2,num_attention_heads=4,num_key_value_heads=4,kv_lora_rank=16,q_lora_rank=12,"
                   f"qk_nope_head_dim=8,qk_rope_head_dim=8,v_head_dim=8,n_group=2,topk_group=1,{V}",
}

# published total parameter counts (billions), without DeepSeek-V3's multi-token-prediction layer
PUBLISHED = {"OLMoE-1B-7B": 6.92, "Qwen3-30B-A3B": 30.5, "Mixtral-8x7B": 46.7, "DeepSeek-V2-Lite": 15.7,
             "DeepSeek-V3": 671.0}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_checkpoint_loads_in_moeinfer_and_transformers_with_equal_logits(arch, tmp_path):
    import transformers

    path = init_checkpoint(tmp_path / arch, arch=arch, shape=TINY[arch], layers=2, dtype="float32", seed=1,
                           progress=False)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 64
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = moeinfer.load(path, progress=False)
    assert ours.config.num_layers == 2 and ours.config.vocab_size == 6144
    diff = max_logit_diff(hf, ours, left=False)
    assert diff <= 1e-4, f"max |logit diff| = {diff}"
    out = moeinfer.generate(ours, ["hello"], max_new_tokens=4, ignore_eos=True)[0]
    assert len(out.token_ids) == 4


def test_weights_follow_hf_init_and_the_seed(tmp_path):
    a = init_checkpoint(tmp_path / "a", arch="mixtral", shape=TINY["mixtral"], layers=1, seed=0, progress=False)
    b = init_checkpoint(tmp_path / "b", arch="mixtral", shape=TINY["mixtral"], layers=1, seed=0, progress=False)
    c = init_checkpoint(tmp_path / "c", arch="mixtral", shape=TINY["mixtral"], layers=1, seed=1, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ma, mc = moeinfer.load(a, progress=False), moeinfer.load(c, progress=False)
    assert ma.dtype == torch.bfloat16
    w = ma.layers[0].mlp.experts.gate_up_proj.float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(ma.norm.weight, torch.ones_like(ma.norm.weight))
    assert not torch.equal(w, mc.layers[0].mlp.experts.gate_up_proj.float())


def test_shards_and_index_hold_the_same_weights(tmp_path):
    one = init_checkpoint(tmp_path / "one", arch="olmoe", shape=TINY["olmoe"], layers=2, progress=False)
    many = init_checkpoint(tmp_path / "many", arch="olmoe", shape=TINY["olmoe"], layers=2, max_shard_bytes=200_000,
                           progress=False)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    sa, sb = moeinfer.load(one, progress=False).state_dict(), moeinfer.load(many, progress=False).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_presets_have_the_published_parameter_counts(name):
    total = sum(s.numel for s in tensor_specs(resolve_shape(name))) / 1e9
    assert abs(total - PUBLISHED[name]) / PUBLISHED[name] < 0.01, total


def test_layers_and_overrides():
    hf = resolve_shape("OLMoE-1B-7B,hidden_size=1024", layers=8)
    assert hf["num_hidden_layers"] == 8 and hf["hidden_size"] == 1024 and hf["num_experts"] == 64
    assert resolve_shape("num_experts=16", arch="olmoe")["num_experts"] == 16
    assert resolve_shape(None, arch="qwen3_moe")["model_type"] == "qwen3_moe"


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape="Nope-7B"), "unknown shape preset 'Nope-7B'; available: OLMoE-1B-7B"),
    (dict(arch="llama"), "unknown --arch 'llama'; available: olmoe"),
    (dict(arch="olmoe", shape="hidden_sise=64"), "hidden_sise not a field of OLMoE-1B-7B"),
    (dict(arch="mixtral", shape="OLMoE-1B-7B"), "'OLMoE-1B-7B' is a olmoe model, not --arch mixtral"),
    (dict(arch="olmoe", layers=0), "--layers must be >= 1"),
    (dict(shape="hidden_size=64"), "give --arch or a --shape preset"),
    (dict(arch="olmoe", shape="OLMoE-1B-7B,hidden_size"), "expected a preset name or KEY=VALUE"),
])
def test_bad_requests_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("'", "'")):
        resolve_shape(kwargs.get("shape"), arch=kwargs.get("arch"), layers=kwargs.get("layers"))


def test_small_vocab_and_existing_output_are_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=512 is smaller than the tokenizer"):
        init_checkpoint(tmp_path / "v", arch="olmoe", shape=TINY["olmoe"].replace(V, "vocab_size=512"), progress=False)
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        init_checkpoint(full, arch="olmoe", shape=TINY["olmoe"], layers=1, progress=False)
    assert (full / "mine.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    init_checkpoint(empty, arch="olmoe", shape=TINY["olmoe"], layers=1, progress=False)
    assert (empty / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # no temp dirs left


def test_cli(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["init", "--arch", "mixtral", "--shape", TINY["mixtral"], "--layers", "1", "--out", str(out),
                 "--no-progress"]) == 0
    assert moeinfer.load(out, progress=False).config.num_layers == 1
    assert main(["init", "--arch", "mixtral", "--shape", "Mixtral-8x7B,foo=1", "--out", str(tmp_path / "x")]) == 1
    assert "foo not a field of Mixtral-8x7B" in capsys.readouterr().err
    assert main(["init", "--list"]) == 0
    assert "Qwen3-30B-A3B" in capsys.readouterr().out


PROBE = r"""
import json, sys
import torch, tokenizers, tqdm.auto
from moeinfer.loading.random_init import init_checkpoint, tensor_specs
from moeinfer.loading.shapes import resolve_shape
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
# torch's one-off start-up (~170 MB whatever the model's size: its first meta-device model build imports the
# meta registrations), paid before the baseline as in test_loading_memory
tensor_specs(resolve_shape("num_hidden_layers=1,hidden_size=64,num_attention_heads=4,num_key_value_heads=4", arch="olmoe"))
torch.randn(10).to(torch.bfloat16)
base = status("VmRSS:")
path = init_checkpoint(sys.argv[1], arch="olmoe", shape=sys.argv[2], layers=4, progress=False)
peak = status("VmHWM:")
size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
print(json.dumps({"base": base, "peak": peak, "size": size}))
"""


def test_writing_streams_peak_rss_far_below_the_model(tmp_path):
    """~200 MB of bf16 weights written with < 0.3x their size added to the process's peak RSS (a writer
    holding the model would add >= 1x; runs of the streaming writer add 22-46 MiB, as the allocator's
    arenas happen to grow)."""
    shape = "hidden_size=512,intermediate_size=512,num_experts=16,num_experts_per_tok=2,num_attention_heads=8,"\
            "num_key_value_heads=8"
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "big"), shape], capture_output=True, text=True,
                         check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["size"] > 190 * 1024**2
    added = m["peak"] - m["base"]
    print(f"\nmodel {m['size'] / 2**20:.0f} MiB, peak RSS added {added / 2**20:.0f} MiB")
    assert added < 0.3 * m["size"]
