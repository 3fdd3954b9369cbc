"""GGUF for DeepSeek (llama.cpp's deepseek2): round trips give identical logits (bf16; q8_0/q4_0 experts
= moeinfer's own quantized model), the file holds llama.cpp's layout (MLA's kv_b split into k_b/v_b,
MQA view of the latent, leading dense layers, shared experts, groups, sigmoid + correction bias),
older files with kv_b whole still load, YaRN keys round trip, and what llama.cpp cannot express is a
named GGUFError. llama.cpp itself: benchmarks/bench_gguf_llamacpp.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moeinfer
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.loading.gguf import GGUFError, export_gguf, load_gguf
from moeinfer.loading.gguf.deepseek import merge_kv_b, split_kv_b

gguf = pytest.importorskip("gguf")

IDS = torch.tensor([[5, 17, 250, 3, 99, 42, 7, 120, 64, 8, 200, 31]])
# hidden and expert widths that are multiples of 32, so experts can be Q8_0/Q4_0 blocks
WIDE = dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=64, vocab_size=300)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # name: (arch, transformers config overrides, config.json fields patched after saving)
    "v2-lite": ("deepseek_v2", {}, {}),  # q_lora_rank None (attn_q), greedy softmax
    "v2-qlora-groups": ("deepseek_v2", dict(q_lora_rank=12, topk_method="group_limited_greedy", n_group=4,
                                            topk_group=2, routed_scaling_factor=1.5), {}),
    "v3": ("deepseek_v3", {}, {}),  # sigmoid, 2 groups keep 1, correction bias, 1 dense layer, 1 shared
    "v3-yarn": ("deepseek_v3", dict(n_shared_experts=2), {"rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}}),
}
_CACHE: dict[tuple[str, torch.dtype | None], moeinfer.MoEModel] = {}


def _checkpoint(path: Path, arch: str, overrides: dict[str, Any], patch: dict[str, Any]) -> Path:
    from hf_peers import save_hf_checkpoint
    from tiny_tokenizer import write_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    save_hf_checkpoint(arch, path, **{**WIDE, **overrides})
    write_tokenizer(path)
    if patch:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(patch)
        if "rope_scaling" in patch:
            cfg.pop("rope_parameters", None)
            cfg["rope_theta"] = 10000.0
        (path / "config.json").write_text(json.dumps(cfg))
    return path


def _model(name: str, root: Path, dtype: torch.dtype | None = None) -> moeinfer.MoEModel:
    """A fresh copy of the variant, loaded from its checkpoint (fp32 as saved, or `dtype`)."""
    if (name, dtype) not in _CACHE:
        arch, overrides, patch = VARIANTS[name]
        path = root / name
        if not path.exists():
            _checkpoint(path, arch, overrides, patch)
        _CACHE[name, dtype] = moeinfer.load(path, dtype=dtype, progress=False)
    return copy.deepcopy(_CACHE[name, dtype])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ds-ckpt")


def _logits(model: moeinfer.MoEModel) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _same_config(a: Any, b: Any) -> bool:
    """Equal but for the special ids a config leaves unset (they come from the tokenizer in GGUF)."""
    special = ("bos_token_id", "eos_token_ids", "pad_token_id")
    return dataclasses.replace(b, **{k: getattr(a, k) for k in special}) == a


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_round_trip_is_exact(name, root, tmp_path):
    model = _model(name, root, torch.bfloat16)
    path = tmp_path / f"{name}.gguf"
    report = export_gguf(model, path, progress=False)
    assert ("group" in " ".join(report.notes)) == (name == "v2-qlora-groups")
    back = load_gguf(path, progress=False)
    assert back.dtype == torch.bfloat16 and _same_config(model.config, back.config)
    state, back_state = model.state_dict(), back.state_dict()
    assert list(state) == list(back_state)
    for key, value in state.items():
        assert value.dtype == back_state[key].dtype and torch.equal(value, back_state[key]), key
    assert torch.equal(_logits(model), _logits(back))


@pytest.mark.parametrize("recipe", ["q8_0", "q4_0"])
@pytest.mark.parametrize("name", ["v2-lite", "v3"])
def test_quantized_round_trip_is_moeinfers_quantized_model(name, recipe, root, tmp_path):
    """Experts asked for as q8_0/q4_0 = `compress_(model, recipe)`'s blocks, and exporting that quantized model
    writes the same bytes (no requantization); re-imported, it is that model bit for bit."""
    model = _model(name, root)
    ref = copy.deepcopy(model)
    moeinfer.compress_(ref, recipe, progress=False)
    from_float, from_quant = tmp_path / "f.gguf", tmp_path / "q.gguf"
    export_gguf(model, from_float, quant=recipe, progress=False)
    assert export_gguf(ref, from_quant, progress=False).notes == []
    assert from_float.read_bytes() == from_quant.read_bytes()
    back = load_gguf(from_quant, progress=False)
    for block in back.moe_blocks():
        assert isinstance(block.experts, QuantizedExperts) and set(block.experts.bits) == {int(recipe[1])}
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), back.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(_logits(ref), _logits(back))


def test_file_holds_llama_cpp_deepseek2_layout(root, tmp_path):
    model = _model("v3", root)
    path = tmp_path / "v3.gguf"
    export_gguf(model, path, quant="q8_0", progress=False)
    f, t = _fields(path), _tensors(path)
    mla = model.config.mla
    H, C, Dn, R, Dv = model.config.num_heads, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, \
        mla.v_head_dim
    a = "deepseek2."
    assert f["general.architecture"] == "deepseek2"
    assert (f[a + "attention.head_count"], f[a + "attention.head_count_kv"]) == (H, 1)
    assert (f[a + "attention.key_length"], f[a + "attention.value_length"]) == (C + R, C)
    assert (f[a + "attention.key_length_mla"], f[a + "attention.value_length_mla"]) == (Dn + R, Dv)
    assert (f[a + "attention.q_lora_rank"], f[a + "attention.kv_lora_rank"]) == (12, C)
    assert f[a + "rope.dimension_count"] == R
    assert (f[a + "leading_dense_block_count"], f[a + "feed_forward_length"]) == (1, 64)
    assert (f[a + "expert_feed_forward_length"], f[a + "expert_shared_count"]) == (32, 1)
    assert (f[a + "expert_count"], f[a + "expert_used_count"]) == (8, 2)
    assert f[a + "expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert (f[a + "expert_group_count"], f[a + "expert_group_used_count"]) == (2, 1)
    assert f[a + "expert_weights_norm"] is True and f[a + "expert_weights_scale"] == pytest.approx(2.5)
    # every tensor name is one gguf-py lists for deepseek2
    known = {gguf.TENSOR_NAMES[x] for x in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2]}
    for name in t:
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.rsplit(".", 1)[0]) in known, name
    assert "blk.0.ffn_gate.weight" in t and "blk.0.ffn_gate_exps.weight" not in t  # the leading dense layer
    assert "blk.0.exp_probs_b.bias" not in t and t["blk.1.exp_probs_b.bias"].tensor_type.name == "F32"
    assert "blk.1.attn_kv_b.weight" not in t
    # ggml order: ne = [Dn, C, H] for k_b, [C, Dv, H] for v_b
    assert list(t["blk.1.attn_k_b.weight"].shape) == [Dn, C, H]
    assert list(t["blk.1.attn_v_b.weight"].shape) == [C, Dv, H]
    kv_b = model.layers[1].self_attn.kv_b_proj.weight
    k_b = torch.from_numpy(np.array(t["blk.1.attn_k_b.weight"].data))
    v_b = torch.from_numpy(np.array(t["blk.1.attn_v_b.weight"].data))
    # head h's key rows of kv_b, transposed
    assert torch.equal(k_b[2], kv_b.view(H, Dn + Dv, C)[2, :Dn].T.to(k_b.dtype))
    assert torch.equal(v_b[2], kv_b.view(H, Dn + Dv, C)[2, Dn:].to(v_b.dtype))
    bias = torch.from_numpy(np.array(t["blk.1.exp_probs_b.bias"].data))
    assert bias.abs().max() > 0 and torch.equal(bias, model.layers[1].mlp.gate.e_score_correction_bias)
    assert {t[f"blk.1.ffn_{p}_exps.weight"].tensor_type.name for p in ("gate", "up", "down")} == {"Q8_0"}


def test_lite_writes_q_lora_rank_zero_and_full_rank_queries(root, tmp_path):
    """llama.cpp requires attention.q_lora_rank unless the model has 26/27 layers; 0 selects attn_q."""
    path = tmp_path / "lite.gguf"
    export_gguf(_model("v2-lite", root), path, progress=False)
    f, t = _fields(path), _tensors(path)
    assert f["deepseek2.attention.q_lora_rank"] == 0
    assert f["deepseek2.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SOFTMAX)
    assert f["deepseek2.expert_weights_norm"] is False and "deepseek2.expert_group_count" not in f
    assert "blk.0.attn_q.weight" in t and "blk.0.attn_q_a.weight" not in t


def test_split_and_merge_kv_b_are_inverse():
    w = torch.randn(3 * (4 + 5), 7)
    k_b, v_b = split_kv_b(w, heads=3, nope=4, v_dim=5)
    assert k_b.shape == (3, 7, 4) and v_b.shape == (3, 5, 7)
    assert torch.equal(merge_kv_b(k_b, v_b), w)


def _rewrite(src: Path, dst: Path, *, drop_keys: tuple[str, ...] = (), set_keys: dict[str, Any] | None = None,
             tensors: dict[str, np.ndarray | None] | None = None) -> None:
    """Copy a GGUF file with keys dropped or set (uint32/float32/bool by Python type) and tensors replaced
    (None: dropped; a float32 array: added as F32)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys or key in (set_keys or {}):
            continue
        vtype = field.types[0]
        writer.add_key_value(key, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for key, value in (set_keys or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    replaced = tensors or {}
    for t in reader.tensors:
        if t.name not in replaced:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, data in replaced.items():
        if data is not None:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_older_files_with_kv_b_whole_load(root, tmp_path):
    """Converters before the k_b/v_b split wrote attn_kv_b [H*(Dn+Dv), C] and MHA head sizes, no *_mla keys."""
    model = _model("v3", root)
    src, old = tmp_path / "new.gguf", tmp_path / "old.gguf"
    export_gguf(model, src, progress=False)
    cfg, mla = model.config, model.config.mla
    replace: dict[str, np.ndarray | None] = {}
    for i in range(cfg.num_layers):
        replace[f"blk.{i}.attn_k_b.weight"] = replace[f"blk.{i}.attn_v_b.weight"] = None
        replace[f"blk.{i}.attn_kv_b.weight"] = model.layers[i].self_attn.kv_b_proj.weight.numpy()
    _rewrite(src, old, drop_keys=("deepseek2.attention.key_length_mla", "deepseek2.attention.value_length_mla"),
             set_keys={"deepseek2.attention.key_length": mla.qk_nope_head_dim + mla.qk_rope_head_dim,
                       "deepseek2.attention.value_length": mla.v_head_dim,
                       "deepseek2.attention.head_count_kv": cfg.num_heads}, tensors=replace)
    back = load_gguf(old, progress=False)
    assert _same_config(model.config, back.config)
    assert torch.equal(_logits(model), _logits(back))


def test_rotate_half_v3_is_reordered_into_llama_cpps_pairs(root, tmp_path):
    """rope_interleave=false: the rotary rows are reordered for llama.cpp's adjacent pairs; the file loads
    back as an interleaved model whose rotated q/k are the same numbers, so the logits are identical."""
    model = _model("v3", root)
    raw = dict(model.config.hf_config, rope_interleave=False)
    from moeinfer.arch import parse_config

    rotate_half = moeinfer.MoEModel(parse_config(raw)).eval()
    rotate_half.load_state_dict(model.state_dict())
    rotate_half.tokenizer = model.tokenizer
    assert not rotate_half.config.rope.interleaved
    assert not torch.equal(_logits(rotate_half), _logits(model))  # the layout matters for these weights
    path = tmp_path / "rh.gguf"
    export_gguf(rotate_half, path, progress=False)
    back = load_gguf(path, progress=False)
    assert back.config.rope.interleaved
    assert _same_config(dataclasses.replace(rotate_half.config, rope=back.config.rope), back.config)
    assert torch.equal(_logits(rotate_half), _logits(back))


def test_yarn_keys_are_llama_cpps(root, tmp_path):
    path = tmp_path / "yarn.gguf"
    export_gguf(_model("v3-yarn", root), path, progress=False)
    f = _fields(path)
    assert f["deepseek2.rope.scaling.type"] == "yarn" and f["deepseek2.rope.scaling.factor"] == 4.0
    assert f["deepseek2.rope.scaling.original_context_length"] == 64
    assert f["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707, rel=1e-6)
    back = load_gguf(path, progress=False)
    rope = back.config.rope
    assert (rope.type, rope.factor, rope.mscale, rope.mscale_all_dim) == ("yarn", 4.0, 0.707, 0.707)
    assert rope.original_max_position_embeddings == 64


def test_gqa_family_yarn_round_trip(tmp_path):
    """Qwen3-MoE with YaRN (as Qwen3's long-context configs): the keys llama.cpp's converter writes, exact."""
    from hf_peers import save_hf_checkpoint
    from tiny_tokenizer import write_tokenizer

    ckpt = tmp_path / "qwen3"
    ckpt.mkdir()
    save_hf_checkpoint("qwen3_moe", ckpt, vocab_size=300)
    write_tokenizer(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64})
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model = moeinfer.load(ckpt, progress=False)
    assert model.config.rope.type == "yarn"
    path = tmp_path / "q.gguf"
    export_gguf(model, path, progress=False)
    f = _fields(path)
    assert (f["qwen3moe.rope.scaling.type"], f["qwen3moe.rope.scaling.original_context_length"]) == ("yarn", 64)
    assert "qwen3moe.rope.scaling.yarn_log_multiplier" not in f
    back = load_gguf(path, progress=False)
    assert back.config.rope == model.config.rope and _same_config(model.config, back.config)
    assert torch.equal(_logits(model), _logits(back))


@pytest.mark.parametrize("change,match", [
    (dict(mscale=1.0), "mscale == mscale_all_dim"),
    (dict(beta_fast=16.0), "beta_fast=16.0"),
    (dict(attention_factor=1.2), "attention_factor"),
    (dict(type="linear"), "linear scaling"),
])
def test_rope_llama_cpp_computes_differently_is_refused(change, match, root, tmp_path):
    model = _model("v3-yarn", root)
    model.config = dataclasses.replace(model.config, rope=dataclasses.replace(model.config.rope, **change))
    with pytest.raises(GGUFError, match=match):
        export_gguf(model, tmp_path / "x.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change,match", [
    (dict(qkv_bias=True), "attention_bias"),
    (dict(shared_intermediate_size=0), "expert_shared_count"),
    (dict(layer_ffn=("moe", "dense")), "dense FFN layers only before"),
    (dict(sliding_window=(8, None)), "sliding-window"),
])
def test_what_deepseek2_cannot_express_is_refused(change, match, root, tmp_path):
    model = _model("v2-lite", root)
    model.config = dataclasses.replace(model.config, **change)
    with pytest.raises(GGUFError, match=match):
        export_gguf(model, tmp_path / "x.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keys,match", [
    ({"deepseek2.expert_weights_norm": True}, "never renormalises"),
    ({"deepseek2.expert_gating_func": 3}, "expert_gating_func 3"),
])
def test_import_refuses_routers_moeinfer_cannot_run(keys, match, root, tmp_path):
    src, bad = tmp_path / "src.gguf", tmp_path / "bad.gguf"
    export_gguf(_model("v2-lite", root), src, progress=False)
    _rewrite(src, bad, set_keys=keys)
    with pytest.raises(GGUFError, match=match):
        load_gguf(bad, progress=False)


def test_sigmoid_router_without_selection_bias_loads_with_zero_bias(root, tmp_path):
    model = _model("v3", root)
    src, nob = tmp_path / "src.gguf", tmp_path / "nobias.gguf"
    export_gguf(model, src, progress=False)
    _rewrite(src, nob, tensors={"blk.1.exp_probs_b.bias": None})
    back = load_gguf(nob, progress=False)
    assert torch.equal(back.layers[1].mlp.gate.e_score_correction_bias, torch.zeros(8))
