"""Offloading quantized experts: the slow tier holds each expert's packed codes, scales and zeros (one
byte blob per matrix, moeinfer.offload.packed) and the fast tier computes a cached expert from them
exactly as the resident QuantizedExperts' eager reference does, so per-step logits are equal
(torch.equal) to the resident quantized model's, for every quantize preset's width and both tiers."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import generate_with_logits, random_mixtral

from moeinfer.compress.api import compress_
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.offload import OffloadConfig, OffloadError, offload_
from moeinfer.offload.experts import OffloadedExperts
from moeinfer.offload.packed import PackedFormat

PROMPT = [3, 17, 99, 42, 7, 64]
NEW = 8


def _quantized(precision: str, layers: int = 3) -> torch.nn.Module:
    model = random_mixtral(layers=layers, hidden=64, inter=64)
    compress_(model, [{"method": "quantize_layers", "precisions": [precision] * layers}])
    for b in model.moe_blocks():
        assert isinstance(b.experts, QuantizedExperts)
        b.experts.kernel = "reference"  # the eager reference: what the offloaded experts must equal
    return model


@pytest.mark.parametrize("precision", ["int8", "int4", "q4_0"])
@pytest.mark.parametrize("tier", ["disk", "cpu"])
def test_offloaded_quantized_logits_equal_resident(precision, tier, tmp_path):
    _, ref = generate_with_logits(_quantized(precision), PROMPT, NEW)
    model = _quantized(precision)
    bits = model.moe_blocks()[0].experts.bits[0]
    offload_(model, OffloadConfig(tier=tier, offload_dir=tmp_path if tier == "disk" else None, cache=4,
                                  scope="layer",
                                  policy="lru"))
    try:
        assert all(isinstance(b.experts, OffloadedExperts) for b in model.moe_blocks())
        assert model.offload.packed is not None and model.offload.packed.bits == bits
        assert model.offload.slot_gate_up.dtype == torch.uint8  # the slots hold codes, not float weights
        _, logits = generate_with_logits(model, PROMPT, NEW)
        st = model.offload.cache.stats
        assert st.misses > 0 and st.hits > 0  # 4 slots per layer of 8 experts: both ways exercised
        assert torch.equal(logits, ref)
    finally:
        model.offload.close()


def test_a_one_percent_error_in_a_dequantized_expert_is_caught(tmp_path, monkeypatch):
    """The equality above is sharp: scaling the dequantized down matrix by 0.99 breaks it."""
    _, ref = generate_with_logits(_quantized("int8"), PROMPT, NEW)
    model = _quantized("int8")
    offload_(model, OffloadConfig(tier="disk", offload_dir=tmp_path, cache=3))
    real = PackedFormat.dequantize
    monkeypatch.setattr(PackedFormat, "dequantize",
                        lambda self, blob, m, dtype: real(self, blob, m, dtype) * (0.99 if m == "down" else 1.0))
    _, logits = generate_with_logits(model, PROMPT, NEW)
    model.offload.close()
    assert not torch.equal(logits, ref)
    assert not torch.allclose(logits, ref, rtol=1e-3, atol=1e-3)


def test_blobs_round_trip_the_codes():
    model = _quantized("int4", layers=1)
    q = model.moe_blocks()[0].experts
    fmt = PackedFormat.of(q)
    gu, dn = fmt.stacked(q)
    assert gu.shape == (q.num_experts, fmt.nbytes("gate_up")) and dn.shape == (q.num_experts, fmt.nbytes("down"))
    for e in range(q.num_experts):
        want_gu, want_dn = q.expert_weights(e, torch.float32)
        assert torch.equal(fmt.dequantize(gu[e], "gate_up", torch.float32), want_gu)
        assert torch.equal(fmt.dequantize(dn[e], "down", torch.float32), want_dn)


def test_mixed_float_and_quantized_layers_are_refused(tmp_path):
    model = random_mixtral(layers=2, hidden=64, inter=64)
    compress_(model, [{"method": "quantize_layers", "precisions": ["int8", "none"]}])
    with pytest.raises(OffloadError, match="mix float and quantized"):
        offload_(model, OffloadConfig(tier="disk", offload_dir=tmp_path, cache=2))


def test_different_widths_per_layer_are_refused(tmp_path):
    model = random_mixtral(layers=2, hidden=64, inter=64)
    compress_(model, [{"method": "quantize_layers", "precisions": ["int8", "int4"]}])
    with pytest.raises(OffloadError, match="differ in format"):
        offload_(model, OffloadConfig(tier="disk", offload_dir=tmp_path, cache=2))


def test_cpu_assist_with_quantized_experts_is_refused(tmp_path):
    model = _quantized("int8", layers=2)
    with pytest.raises(OffloadError, match="CPU assist"):
        offload_(model, OffloadConfig(tier="cpu", cache=2, cpu_assist=True))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_offloaded_quantized_experts_on_the_native_kernels(precision, tmp_path, monkeypatch):
    """Kernel 'cpu': each cached expert runs the native quantized kernels on the slot's codes in place;
    equal to the resident model on the same kernels up to fp32 summation order (fp32 activations on
    both; a 1% error fails rtol 1e-3), through the decode (1 token: over the slots, test_offload_slot_experts)
    and the prefill path (36 tokens: fp32-activation tiles, one call per expert)."""
    from native_helpers import native_ops

    import moeinfer.offload.packed as packed_mod

    native_ops()  # built if missing (a clear skip when this machine cannot build it)
    calls = []
    real = packed_mod.quantized_moe_cpu
    monkeypatch.setattr(packed_mod, "quantized_moe_cpu", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resident = _quantized(precision)
    model = _quantized(precision)
    for b in resident.moe_blocks():
        b.experts.kernel, b.experts.cpu_activations = "cpu", "f32"
    offload_(model, OffloadConfig(tier="disk", offload_dir=tmp_path, cache=4, scope="layer"))
    try:
        for b in model.moe_blocks():
            b.experts.kernel, b.experts.cpu_activations = "cpu", "f32"
        for ids in ([PROMPT[:1]], [PROMPT * 6]):  # 1 token; 36 tokens (prefill path per expert)
            x = torch.tensor(ids)
            with torch.no_grad():
                want, got = resident(x), model(x)
            scale = float(want.abs().max())
            assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * scale)
            assert not torch.allclose(got * 1.01, want, rtol=1e-3, atol=1e-4 * scale)
        assert calls  # the native path ran
    finally:
        model.offload.close()


@pytest.mark.parametrize("precision", ["int8", "int4", "q4_0", "q8_0"])
def test_slot_views_made_once_give_the_same_outputs(precision, tmp_path, monkeypatch):
    """Native offloaded experts that run one call each (a 36-token prompt with fp32 activations: the
    dequantized tiles, not a schedule the slots run together) reuse each slot's views (SlotViews):
    per-step logits equal (torch.equal) to views made afresh on every call, through hits, misses,
    evictions and transient loads; the slots' views are the ones used (no fresh view for a slot's blobs)."""
    from native_helpers import native_ops

    import moeinfer.offload.packed as packed_mod

    native_ops()  # built if missing (a clear skip when this machine cannot build it)

    def run(reuse: bool):
        model = _quantized(precision)
        offload_(model, OffloadConfig(tier="disk", offload_dir=tmp_path / f"{reuse}", cache=3, scope="layer"))
        for b in model.moe_blocks():
            b.experts.kernel, b.experts.cpu_activations = "cpu", "f32"
        if not reuse:
            model.offload.slot_views = None
        try:
            _, logits = generate_with_logits(model, PROMPT * 6, NEW)
            st = model.offload.cache.stats
            assert st.hits > 0 and st.evictions > 0
            return logits, model.offload.slot_views, st.transient_loads
        finally:
            model.offload.close()

    fresh, _, _ = run(False)
    given = []  # (a slot's blob?, the views given for it) for every call the native path made
    real_get = packed_mod.SlotViews.get

    def get(self, gate_up, down):
        view = real_get(self, gate_up, down)
        given.append((gate_up.data_ptr() in self.by_ptr, gate_up.data_ptr(), view))
        return view

    monkeypatch.setattr(packed_mod.SlotViews, "get", get)
    reused, views, transient = run(True)
    assert torch.equal(reused, fresh)
    assert views is not None and len(views.by_ptr) == 3 * 3  # 3 slots per layer x 3 layers
    # every call for a slot's blobs got the views made for that slot; only the experts of a prefill that
    # had no slot (the transient buffer) got fresh ones, one per call
    slot_calls = [(ptr, v) for in_slot, ptr, v in given if in_slot]
    assert slot_calls and all(v is views.by_ptr[ptr][1] for ptr, v in slot_calls)
    others = [v for in_slot, _, v in given if not in_slot]
    assert len(others) == transient and len({id(v) for v in others}) == len(others)
