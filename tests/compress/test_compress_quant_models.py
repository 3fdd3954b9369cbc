"""quantize / quantize_mixed on tiny random models of every architecture and on the reference model:
packed storage shrinks memory and files, save -> load gives identical logits, recipes compose, and
bad input fails before the model or the output directory is touched."""

from __future__ import annotations

import json

import pytest
import torch

import moeinfer
from compress_quant_helpers import ARCHS, file_bytes, random_calibration, random_model, sample_ids
from moeinfer.compress.api import compress_, weight_bytes
from moeinfer.compress.calibration import CalibrationData, LayerCalibration
from moeinfer.formats.layout import MODULES_KEY, RECORD_KEY
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.formats.quantized_linear import QuantizedLinear
from moeinfer.compress.registry import CompressionError
from moeinfer.model.moe import Experts


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tmp_path_factory.mktemp("quant_models")


def _round_trip(model, path):
    ids = sample_ids(model)
    with torch.no_grad():
        before = model(ids)
    moeinfer.save(model, path)
    again = moeinfer.load(path, dtype="float32", progress=False)
    with torch.no_grad():
        assert torch.equal(again(ids), before)
    return again


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_experts_every_arch_round_trips_and_shrinks(arch, ckpts, tmp_path) -> None:
    model = random_model(arch, ckpts)
    moeinfer.save(model, tmp_path / "fp32")
    ids = sample_ids(model)
    with torch.no_grad():
        ref = model(ids)
    before = weight_bytes(model)
    report = compress_(model, [{"method": "quantize", "bits": 4, "group_size": 16}], progress=False)
    assert all(isinstance(b.experts, QuantizedExperts) for b in model.moe_blocks())
    assert report.bytes_after < before and not report.hf_loadable
    with torch.no_grad():
        got = model(ids)
    assert float((got - ref).pow(2).mean() / ref.pow(2).mean()) < 0.05  # int4 stays close
    again = _round_trip(model, tmp_path / "int4")
    assert file_bytes(tmp_path / "int4") < file_bytes(tmp_path / "fp32")
    packed = [p for b in again.moe_blocks() for p in b.experts.parameters() if p.dtype == torch.uint8]
    assert packed and not any(p.requires_grad for p in packed)
    record = json.loads((tmp_path / "int4" / "config.json").read_text())[RECORD_KEY]
    assert record["steps"][0]["method"] == "quantize" and record["steps"][0]["params"]["bits"] == 4
    layer = record["layout"][str(model.moe_blocks()[0].layer_idx)]
    assert layer["kind"] == "quantized" and layer["params"]["bits"] == [4] * layer["num_experts"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_quantize_all_linears_round_trips(arch, ckpts, tmp_path) -> None:
    model = random_model(arch, ckpts)
    compress_(model, [{"method": "quantize", "bits": 8, "group_size": 16, "scope": "all", "lm_head": True}],
              progress=False)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert "lm_head" in quantized and any("self_attn" in n for n in quantized)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    if model.config.shared_intermediate_size:
        assert any(".shared_expert." in n for n in quantized)
    again = _round_trip(model, tmp_path / "all8")
    assert set(model.config.hf_config[RECORD_KEY]["layout"][MODULES_KEY]) == quantized
    assert {n for n, m in again.named_modules() if isinstance(m, QuantizedLinear)} == quantized


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_mixed_every_arch(arch, ckpts, tmp_path) -> None:
    model = random_model(arch, ckpts)
    report = compress_(model, [{"method": "quantize_mixed", "avg_bits": 3.0, "candidates": [2, 4],
                                "group_size": 16}], calibration=random_calibration(model), progress=False)
    summary = report.steps[0]["summary"]
    bits = [b for layer in summary["bits"].values() for b in layer]
    assert sum(bits) / len(bits) <= 3.0 and set(bits) == {2, 4}  # the budget forces a real mix
    assert summary["error"] == "output"
    _round_trip(model, tmp_path / "mixed")


def test_mixed_precision_spends_bits_on_important_experts(ckpts) -> None:
    model = random_model("mixtral", ckpts)
    calib = random_calibration(model, tokens=256)
    report = compress_(model, [{"method": "quantize_mixed", "avg_bits": 3.0, "group_size": 16}], calibration=calib,
                       progress=False)
    bits = report.steps[0]["summary"]["bits"]
    for block in model.moe_blocks():
        lc = calib.layer(block)
        mass = lc.gate_mass(block)
        b = torch.tensor(bits[str(block.layer_idx)], dtype=torch.float)
        if mass.std() > 0 and b.std() > 0:  # importance and width agree in direction
            assert float(torch.corrcoef(torch.stack([mass, b]))[0, 1]) > 0


def test_prune_then_quantize_composes(ckpts, tmp_path) -> None:
    model = random_model("mixtral", ckpts)
    calib = random_calibration(model)
    compress_(model, [{"method": "prune_frequency", "keep": 6}, {"method": "quantize", "bits": 3, "group_size": 16}],
              calibration=calib, progress=False)
    again = _round_trip(model, tmp_path / "e6-int3")
    record = again.config.hf_config[RECORD_KEY]
    assert [s["method"] for s in record["steps"]] == ["prune_frequency", "quantize"]
    assert all(v["num_experts"] == 6 and v["params"]["bits"] == [3] * 6 for v in record["layout"].values())
    assert all(b.experts.num_experts == 6 for b in again.moe_blocks())


def test_bad_input_leaves_model_untouched(ckpts) -> None:
    model = random_model("mixtral", ckpts)
    ids = sample_ids(model)
    with torch.no_grad():
        ref = model(ids)
    for recipe in ([{"method": "quantize", "bits": 6}], [{"method": "quantize_mixed", "avg_bits": 1.0}],
                   [{"method": "quantize", "bits": 4, "group_size": 7}]):
        with pytest.raises(CompressionError):
            compress_(model, recipe, calibration=random_calibration(model), progress=False)
    # a routing trace has no layer inputs: output error cannot be measured
    trace = CalibrationData("trace.npz", 4, {b.layer_idx: LayerCalibration(b.layer_idx, None,
                                                                           torch.tensor([[0, 1]] * 4),
                                                                           torch.full((4, 2), 0.5))
                                             for b in model.moe_blocks()})
    with pytest.raises(CompressionError, match="needs calibration inputs"):
        compress_(model, [{"method": "quantize_mixed", "error": "output"}], calibration=trace, progress=False)
    assert all(type(b.experts) is Experts for b in model.moe_blocks())
    with torch.no_grad():
        assert torch.equal(model(ids), ref)
    # quantizing twice is refused before any layer changes
    compress_(model, [{"method": "quantize", "bits": 8}], progress=False)
    with pytest.raises(CompressionError, match="plain experts"):
        compress_(model, [{"method": "quantize", "bits": 4}], progress=False)


def test_missing_calibration_is_a_clear_error(ckpts) -> None:
    model = random_model("qwen2_moe", ckpts)  # no tokenizer: the held-out texts cannot be used
    for method in ("quantize_mixed", "lowrank"):
        with pytest.raises(CompressionError, match="tokenizer"):
            compress_(model, [{"method": method}], progress=False)
    assert all(type(b.experts) is Experts for b in model.moe_blocks())


def test_mixed_precision_from_a_trace_uses_weight_error(ckpts) -> None:
    model = random_model("qwen3_moe", ckpts)
    g = torch.Generator().manual_seed(2)
    trace = CalibrationData("trace.npz", 64, {b.layer_idx: LayerCalibration(
        b.layer_idx, None, torch.randint(0, 8, (64, 2), generator=g), torch.rand(64, 2, generator=g))
        for b in model.moe_blocks()})
    report = compress_(model, [{"method": "quantize_mixed", "avg_bits": 2.5, "group_size": 16}], calibration=trace,
                       progress=False)
    assert report.steps[0]["summary"]["error"] == "weight"


def test_cli_quantize_and_no_half_written_output(tmp_path, ckpts) -> None:
    from moeinfer.cli import main

    random_model("olmoe", ckpts)
    src = ckpts / "olmoe"
    assert main(["compress", "--model", str(src), "--recipe", "quantize", "--set", "bits=5", "--out",
                 str(tmp_path / "bad"), "--no-progress"]) != 0
    assert not (tmp_path / "bad").exists()
    assert main(["compress", "--model", str(src), "--recipe", "quantize", "--set", "bits=2", "--set",
                 "group_size=16", "--out", str(tmp_path / "int2"), "--no-progress"]) == 0
    again = moeinfer.load(tmp_path / "int2", progress=False)
    assert all(b.experts.bits == [2] * 16 for b in again.moe_blocks())


def test_reference_model_int4_round_trip(tmp_path) -> None:
    model = moeinfer.load("tiny", dtype="float32", progress=False)
    before = weight_bytes(model)
    compress_(model, [{"method": "quantize", "bits": 4, "group_size": 64, "algorithm": "rtn"}], progress=False)
    ex = model.moe_blocks()[0].experts
    assert ex.weight_bits() == pytest.approx(4 + 64 / 64)  # fp32 scale + zero per 64 weights
    assert weight_bytes(model) < 0.45 * before  # experts are most of the model
    _round_trip(model, tmp_path / "tiny-int4")


def test_scales_stay_fp32_in_a_bf16_checkpoint(ckpts, tmp_path) -> None:
    """A bf16 save keeps quantization scales and zero-points fp32 (bf16 would round an int8 zero-point),
    and loading in bf16 gives the same outputs as the in-memory model cast the same way."""
    from safetensors import safe_open

    from moeinfer.compress.api import cast_floating_

    model = random_model("mixtral", ckpts)
    compress_(model, [{"method": "quantize", "bits": 8, "group_size": 16}], progress=False)
    cast_floating_(model, torch.bfloat16)
    ex = model.moe_blocks()[0].experts
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and ex.s8_gate_up.dtype == torch.float32
    moeinfer.save(model, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        scale_names = [n for n in f.keys() if ".s8_" in n or ".z8_" in n]
        assert scale_names and all(f.get_slice(n).get_dtype() == "F32" for n in scale_names)
    again = moeinfer.load(tmp_path / "q", progress=False)
    assert again.embed_tokens.weight.dtype == torch.bfloat16
    assert again.moe_blocks()[0].experts.s8_gate_up.dtype == torch.float32
    ids = sample_ids(model)
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
