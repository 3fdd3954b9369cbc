"""GGUF in and out (moeinfer.loading.gguf): round trips through GGUF files give identical logits, the
files hold what llama.cpp reads (checked with gguf's own reader and quantizers), and bad files are
named errors. No llama.cpp needed (benchmarks/bench_gguf_llamacpp.py runs llama.cpp itself)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moeinfer
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.loading.gguf import GGUFError, export_gguf, fold_merged_routers_, load_gguf
from moeinfer.loading.gguf.blocks import from_ggml, to_ggml
from moeinfer.loading.gguf.names import permute_qk, unpermute_qk
from moeinfer.model.moe import Experts

gguf = pytest.importorskip("gguf")

IDS = torch.tensor([[0, 5, 17, 250, 3, 99, 42, 7, 120, 64, 8, 1000, 6000]])


@pytest.fixture(scope="module")
def tiny() -> moeinfer.MoEModel:
    return moeinfer.load("tiny", progress=False)


def _logits(model: moeinfer.MoEModel, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _quantized(model: moeinfer.MoEModel, recipe: Any) -> moeinfer.MoEModel:
    """A compressed copy (structural recipes calibrated on a few English tokens, to stay fast)."""
    from moeinfer.compress.calibration import CalibrationConfig

    out = copy.deepcopy(model)
    moeinfer.compress_(out, recipe, calibration=CalibrationConfig(source="english", max_tokens=256, seq_len=64),
                       progress=False)
    return out


def _tensor(reader, name: str):
    return next(t for t in reader.tensors if t.name == name)


def test_bf16_round_trip_is_exact(tiny, tmp_path):
    path = tmp_path / "tiny.gguf"
    moeinfer.export(tiny, path, format="gguf", progress=False)
    back = moeinfer.load(path, progress=False)
    assert back.dtype == torch.bfloat16
    for (n1, p1), (n2, p2) in zip(tiny.named_parameters(), back.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(_logits(tiny), _logits(back))
    assert back.config == tiny.config  # every field but the raw config.json dict


def test_gguf_path_works_where_a_checkpoint_dir_does(tiny, tmp_path):
    """read_config (used by compress, placement, offload's hardware model) reads a GGUF file's metadata."""
    from moeinfer.arch import parse_config
    from moeinfer.cli import main
    from moeinfer.loading.checkpoint import read_config

    path = tmp_path / "tiny.gguf"
    export_gguf(tiny, path, progress=False)
    assert parse_config(read_config(path)) == tiny.config
    assert read_config(path)["dtype"] == "bfloat16"
    for src, out in ((str(path), tmp_path / "from-gguf"), ("tiny", tmp_path / "from-dir")):
        assert main(["compress", "--model", src, "--recipe", "q8_0", "--out", str(out), "--no-progress"]) == 0
    assert torch.equal(_logits(moeinfer.load(tmp_path / "from-gguf", progress=False)),
                       _logits(moeinfer.load(tmp_path / "from-dir", progress=False)))


@pytest.mark.parametrize("recipe", ["q8_0", "q4_0"])
def test_quantized_round_trip_is_exact_and_stays_packed(tiny, tmp_path, recipe):
    """A float model exported with --quant q8_0/q4_0 re-imports as moeinfer's own sym-quantized model, bit for
    bit; exporting that quantized model writes the same bytes (no requantization)."""
    ref = _quantized(tiny, recipe)
    from_float = tmp_path / "from-float.gguf"
    from_quant = tmp_path / "from-quant.gguf"
    export_gguf(tiny, from_float, quant=recipe, progress=False)
    report = export_gguf(ref, from_quant, progress=False)  # quant="auto": the blocks as they are
    assert report.notes == []
    assert from_float.read_bytes() == from_quant.read_bytes()
    back = load_gguf(from_quant, progress=False)
    for block in back.moe_blocks():
        assert isinstance(block.experts, QuantizedExperts) and set(block.experts.bits) == {int(recipe[1])}
        assert block.experts.group_size == 32
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), back.named_parameters(), strict=True):
        assert n1 == n2 and p1.dtype == p2.dtype and torch.equal(p1, p2), n1
    assert torch.equal(_logits(ref), _logits(back))


@pytest.mark.parametrize("qtype,bits", [("Q8_0", 8), ("Q4_0", 4)])
def test_blocks_equal_gguf_reference_quantizer(qtype, bits):
    """moeinfer's sym scheme moved into ggml blocks = gguf-py's reference quantizer's bytes; ggml's
    dequantizer gives moeinfer's dequantized weights exactly; blocks -> moeinfer -> blocks is the identity."""
    from gguf.quants import dequantize, quantize

    from moeinfer.formats.quant.groupwise import quantize as mi_quantize

    w = torch.randn(6, 96) * torch.logspace(-3, 1, 6)[:, None]
    w[2, :32] = 0.0  # an all-zero block
    w[3, 5] = -7.5  # largest magnitude negative (Q4_0 takes its sign)
    qt = mi_quantize(w, bits=bits, group_size=32, algorithm="sym")
    ours = to_ggml(qt.packed, qt.scale, bits=bits, cols=96)
    theirs = quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(ours.numpy(), theirs)
    deq = dequantize(theirs, gguf.GGMLQuantizationType[qtype])
    assert torch.equal(torch.from_numpy(deq), qt.dequantize(torch.float32))
    packed, scale, zero = from_ggml(torch.from_numpy(theirs), bits=bits, cols=96)
    assert torch.equal(packed, qt.packed) and torch.equal(scale, qt.scale) and torch.equal(zero, qt.zero)


def test_reader_sees_llama_metadata_and_types(tiny, tmp_path):
    path = tmp_path / "tiny-q4.gguf"
    export_gguf(tiny, path, quant="q4_0", progress=False)
    reader = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    cfg = tiny.config
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (4, 192, 384)
    assert (f["llama.expert_count"], f["llama.expert_used_count"]) == (8, 2)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (6, 2)
    assert f["llama.rope.dimension_count"] == 32 and f["llama.rope.freq_base"] == 10000.0
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert f["tokenizer.ggml.add_bos_token"] is True
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "BF16" and types["output.weight"] == "BF16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert {types[f"blk.{i}.ffn_{p}_exps.weight"] for i in range(4) for p in ("gate", "up", "down")} == {"Q4_0"}
    # ggml dimension order: ne = [D, I, E] for gate/up, [I, D, E] for down
    assert list(_tensor(reader, "blk.0.ffn_gate_exps.weight").shape) == [192, 384, 8]
    assert list(_tensor(reader, "blk.0.ffn_down_exps.weight").shape) == [384, 192, 8]
    # llama's q/k rows are in llama.cpp's adjacent-pair RoPE order
    q = tiny.layers[1].self_attn.q_proj.weight
    stored = torch.from_numpy(np.array(_tensor(reader, "blk.1.attn_q.weight").data)).view(torch.bfloat16)
    assert torch.equal(stored, permute_qk(q, cfg.num_heads))


def test_qk_permutation_turns_rotate_half_into_adjacent_pairs():
    """RoPE on rotate-half pairs (HF) = RoPE on adjacent pairs (llama.cpp) after `permute_qk`."""
    H, Dh = 3, 8
    x = torch.randn(H * Dh, 5)
    ang = torch.rand(Dh // 2) * 3

    def rope_half(v: torch.Tensor) -> torch.Tensor:  # per head: pairs (i, i + Dh/2)
        v = v.view(H, Dh, -1)
        a, b = v[:, : Dh // 2], v[:, Dh // 2:]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        return torch.cat([a * c - b * s, a * s + b * c], 1).reshape(H * Dh, -1)

    def rope_adjacent(v: torch.Tensor) -> torch.Tensor:  # per head: pairs (2i, 2i + 1)
        v = v.view(H, Dh // 2, 2, -1)
        a, b = v[:, :, 0], v[:, :, 1]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        return torch.stack([a * c - b * s, a * s + b * c], 2).reshape(H * Dh, -1)

    torch.testing.assert_close(rope_adjacent(permute_qk(x, H)), permute_qk(rope_half(x), H))
    assert torch.equal(unpermute_qk(permute_qk(x, H), H), x)


@pytest.mark.parametrize("chars", [100_000, pytest.param(None, marks=pytest.mark.slow)], ids=["head", "full"])
def test_tokenizer_rebuilt_from_gguf_matches_the_original(tiny, tmp_path, chars):
    """On the shipped held-out texts (their first `chars` characters; all of them in the slow run)."""
    path = tmp_path / "tiny.gguf"
    export_gguf(tiny, path, progress=False)
    back = load_gguf(path, progress=False).tokenizer
    data = Path(moeinfer.__file__).parent / "eval" / "data"
    for name in ("english.txt", "python.txt"):
        text = (data / name).read_text()[:chars]
        ids = tiny.tokenizer.encode(text)
        assert back.encode(text) == ids, name
        assert back.decode(ids) == tiny.tokenizer.decode(ids)
    special = "x <s> y </s>"
    assert back.encode(special) == tiny.tokenizer.encode(special)
    assert (back.bos_token_id, back.eos_token_id) == (tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id)
    assert back.chat_template == tiny.tokenizer.chat_template
    msgs = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(msgs) == tiny.tokenizer.apply_chat_template(msgs)


def test_cli_export_then_generate(tmp_path, capsys):
    from moeinfer.cli import main

    out = tmp_path / "t.gguf"
    assert main(["export", "--model", "tiny", "--quant", "q8_0", "--out", str(out), "--no-progress"]) == 0
    assert "Q8_0" in capsys.readouterr().out
    assert main(["export", "--model", "tiny", "--out", str(out), "--no-progress"]) == 1  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--model", "tiny", "--out", str(out), "--no-progress", "--overwrite",
                 "--quant", "bf16"]) == 0
    assert main(["generate", "--model", str(out), "KING HENRY.", "--max-new-tokens", "4"]) == 0


def test_export_failure_leaves_nothing(tiny, tmp_path, monkeypatch):
    import moeinfer.loading.gguf.export as export_mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "to_ggml", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(tiny, tmp_path / "x.gguf", quant="q4_0", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_per_layer_widths_keep_their_types(tiny, tmp_path):
    """Layers quantized at different widths (each layer uniform): each layer's tensors in its own type, exact."""
    model = copy.deepcopy(tiny)
    for block in model.moe_blocks():
        ex = block.experts
        bits = [8 if block.layer_idx % 2 else 4] * ex.num_experts
        block.experts = QuantizedExperts.from_float(ex.gate_up_proj, ex.down_proj, bits, group_size=32,
                                                    algorithm="sym")
    path = tmp_path / "per-layer.gguf"
    report = export_gguf(model, path, progress=False)
    assert report.notes == []
    assert [report.tensor_types[f"blk.{i}.ffn_down_exps.weight"] for i in range(4)] == ["Q4_0", "Q8_0"] * 2
    back = load_gguf(path, progress=False)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), back.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(_logits(model), _logits(back))


def test_mixed_precision_is_rounded_up_and_said(tiny, tmp_path):
    """Experts of several widths in one layer: GGUF has one type per stacked tensor -> Q8_0, with a note."""
    model = copy.deepcopy(tiny)
    for block in model.moe_blocks():
        ex = block.experts
        bits = [8 if e % 2 else 4 for e in range(ex.num_experts)]
        block.experts = QuantizedExperts.from_float(ex.gate_up_proj, ex.down_proj, bits, group_size=32,
                                                    algorithm="sym")
    path = tmp_path / "mixed.gguf"
    report = export_gguf(model, path, progress=False)
    assert len(report.notes) == 4 and all("requantized to Q8_0" in n for n in report.notes)
    assert {t for n, t in report.tensor_types.items() if "_exps" in n} == {"Q8_0"}
    back = load_gguf(path, progress=False)
    for b_in, b_out in zip(model.moe_blocks(), back.moe_blocks()):
        w_in, w_out = b_in.experts.dequantize_all(), b_out.experts.dequantize_all()
        err = (w_out[0] - w_in[0]).norm() / w_in[0].norm()
        assert err < 0.01  # Q8_0 on top of the 4/8-bit weights: well under 1%


def test_requantizing_to_another_block_type_is_said(tiny, tmp_path):
    q8 = _quantized(tiny, "q8_0")
    report = export_gguf(q8, tmp_path / "q4.gguf", quant="q4_0", progress=False)
    assert len(report.notes) == 4 and all("asked for as q4_0" in n for n in report.notes)
    assert {t for n, t in report.tensor_types.items() if "_exps" in n} == {"Q4_0"}


def test_pruned_model_round_trip(tiny, tmp_path):
    pruned = _quantized(tiny, "prune-25")
    path = tmp_path / "p25.gguf"
    export_gguf(pruned, path, quant="q4_0", progress=False)
    reader = gguf.GGUFReader(path)
    assert reader.fields["llama.expert_count"].contents() == 6
    back = load_gguf(path, progress=False)
    ref = copy.deepcopy(pruned)
    moeinfer.compress_(ref, "q4_0", progress=False)
    assert torch.equal(_logits(ref), _logits(back))


def test_merged_model_round_trip_with_folded_router(tiny, tmp_path):
    """Merged experts (a map from router rows to fewer experts; merge-25's kind, with cheaper features) are
    written with their reduced count and the folded router; re-imported, they route as the folded model."""
    merged = _quantized(tiny, [{"method": "merge", "ratio": 0.25, "similarity": "router", "align": False}])
    assert merged.moe_blocks()[0].gate.expert_map is not None
    path = tmp_path / "m25.gguf"
    report = export_gguf(merged, path, progress=False)
    assert any("router rows merged" in n for n in report.notes)
    back = load_gguf(path, progress=False)
    assert [b.experts.num_experts for b in back.moe_blocks()] == [6] * 4
    folded = copy.deepcopy(merged)
    fold_merged_routers_(folded)
    assert torch.equal(_logits(folded), _logits(back))


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_other_families_round_trip(arch, tmp_path):
    from compress_cases import IDS as CASE_IDS
    from compress_cases import tiny as tiny_case

    _, model, _ = tiny_case(arch, tmp_path)
    path = tmp_path / f"{arch}.gguf"
    export_gguf(model, path, progress=False)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                                                                "olmoe": "olmoe"}[arch]
    back = load_gguf(path, progress=False)
    # special ids the config leaves unset come from the tokenizer (this test checkpoint's config has none)
    special = ("bos_token_id", "eos_token_ids", "pad_token_id")
    for key in special:
        assert getattr(model.config, key) in (None, (), getattr(back.config, key)), key
    assert dataclasses.replace(back.config, **{k: getattr(model.config, k) for k in special}) == model.config
    assert torch.equal(_logits(model, CASE_IDS), _logits(back, CASE_IDS))


# --- bad files -------------------------------------------------------------------------------------------

def _rewrite(src: Path, dst: Path, *, arch: str | None = None, drop_keys: tuple[str, ...] = (),
             retype: dict[str, str] | None = None, replace: dict[str, tuple[str, np.ndarray]] | None = None) -> None:
    """Copy a GGUF file with changes: another architecture name, keys dropped, tensors re-encoded in
    another ggml type (through gguf-py's reference quantizers) or replaced by (type, raw bytes)."""
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    new_arch = arch or old_arch
    writer = gguf.GGUFWriter(dst, new_arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        name = key.replace(f"{old_arch}.", f"{new_arch}.", 1)
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data, qtype = np.array(t.data), t.tensor_type
        if retype and t.name in retype:
            qtype = gguf.GGMLQuantizationType[retype[t.name]]
            data = quantize(dequantize(data, t.tensor_type), qtype)
        if replace and t.name in replace:
            qtype, data = gguf.GGMLQuantizationType[replace[t.name][0]], replace[t.name][1]
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf"
    export_gguf(tiny, path, quant="q8_0", progress=False)
    return path


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("hello")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        moeinfer.load(bad, progress=False)


def test_truncated_file(exported, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(exported.read_bytes()[:5000])
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        load_gguf(bad, progress=False)


def test_unsupported_architecture(exported, tmp_path):
    bad = tmp_path / "gpt2.gguf"
    _rewrite(exported, bad, arch="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        load_gguf(bad, progress=False)


def test_missing_key(exported, tmp_path):
    bad = tmp_path / "nokey.gguf"
    _rewrite(exported, bad, drop_keys=("llama.embedding_length",))
    with pytest.raises(GGUFError, match="'llama.embedding_length' is missing"):
        load_gguf(bad, progress=False)


def test_undequantizable_tensor_type_is_named(exported, tmp_path, monkeypatch):
    bad = tmp_path / "q41.gguf"
    _rewrite(exported, bad, retype={"blk.0.attn_q.weight": "Q4_1"})
    import gguf.quants

    def refuse(data, qtype):
        raise NotImplementedError(qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(GGUFError, match="'blk.0.attn_q.weight' has ggml type Q4_1"):
        load_gguf(bad, progress=False)


def test_other_ggml_types_are_dequantized_by_gguf(exported, tmp_path):
    """Experts in a type moeinfer does not keep packed (here Q4_1; K-quants take the same path) are
    dequantized with gguf's reference dequantizer into the model dtype."""
    from gguf.quants import dequantize

    path = tmp_path / "q41.gguf"
    names = [f"blk.0.ffn_{p}_exps.weight" for p in ("gate", "up", "down")]
    _rewrite(exported, path, retype={n: "Q4_1" for n in names})
    back = load_gguf(path, progress=False)
    ex = back.moe_blocks()[0].experts
    assert isinstance(ex, Experts) and ex.gate_up_proj.dtype == torch.bfloat16
    assert isinstance(back.moe_blocks()[1].experts, QuantizedExperts)
    reader = gguf.GGUFReader(path)
    want = torch.from_numpy(dequantize(np.array(_tensor(reader, names[2]).data), gguf.GGMLQuantizationType.Q4_1))
    assert torch.equal(ex.down_proj, want.to(torch.bfloat16))


def test_k_quant_experts_are_dequantized_into_bf16(tiny, tmp_path):
    """A llama.cpp K-quant (Q4_K: 256-weight super-blocks) is dequantized by gguf's reference dequantizer."""
    from gguf.quants import dequantize

    from moeinfer.arch import parse_config

    hf = {**{k: v for k, v in tiny.config.hf_config.items()}, "hidden_size": 256, "intermediate_size": 256,
          "head_dim": 32, "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 1}
    torch.manual_seed(0)
    model = moeinfer.MoEModel(parse_config(hf)).to(torch.bfloat16).eval()
    model.tokenizer = tiny.tokenizer
    src, path = tmp_path / "f.gguf", tmp_path / "k.gguf"
    export_gguf(model, src, progress=False)
    # Q4_K bytes: random codes and sub-block scales, sane fp16 super-block scales (d, dmin)
    rng = np.random.default_rng(0)
    reader = gguf.GGUFReader(src)
    blocks = {}
    for part in ("gate", "up", "down"):
        name = f"blk.0.ffn_{part}_exps.weight"
        E, rows, cols = (int(x) for x in reversed(_tensor(reader, name).shape.tolist()))
        raw = rng.integers(0, 256, size=(E, rows, cols // 256, 144), dtype=np.uint8)
        raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        blocks[name] = raw.reshape(E, rows, -1)
    del reader
    _rewrite(src, path, replace={n: ("Q4_K", b) for n, b in blocks.items()})
    back = load_gguf(path, progress=False)
    ex = back.moe_blocks()[0].experts
    assert isinstance(ex, Experts) and ex.down_proj.dtype == torch.bfloat16
    want = torch.from_numpy(dequantize(blocks["blk.0.ffn_down_exps.weight"], gguf.GGMLQuantizationType.Q4_K))
    assert want.abs().max() > 0 and torch.equal(ex.down_proj, want.to(torch.bfloat16))


def test_tensor_of_wrong_shape(exported, tmp_path):
    src = gguf.GGUFReader(exported)
    bad = tmp_path / "shape.gguf"
    writer = gguf.GGUFWriter(bad, "llama")
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        writer.add_key_value(key, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in src.tensors:
        data = np.array(t.data)
        if t.name == "blk.0.attn_norm.weight":
            data = data[:-1]
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="'blk.0.attn_norm.weight' has shape"):
        load_gguf(bad, progress=False)
