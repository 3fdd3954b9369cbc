"""One-token decode of an offloaded layer over the expert cache's slots (moeinfer/offload/slot_decode.py):
with kernel 'cpu' on a CPU, the cached experts run in one native call on the slots in place, each load's
expert as it lands, then the native decode's own sum, so every one-token forward equals the resident
layer's on the same kernel bit for bit (torch.equal: sharper than any tolerance), whatever the cache
holds: every expert, some (misses, evictions), or fewer slots than a token routes to (loads through the
transient buffer). Float (bf16, fp32) and quantized experts (asymmetric int8/int4, symmetric Q8_0/Q4_0
whose zeros the kernels skip)."""

from __future__ import annotations

import pytest
import torch
from native_helpers import native_ops
from offload_helpers import random_mixtral

from moeinfer.compress.api import compress_
from moeinfer.kernels import use_kernel_
from moeinfer.offload import OffloadConfig, offload_
from moeinfer.offload.slot_decode import SlotDecode

LAYERS = 3
TOKENS = [3, 17, 99, 42, 7, 64, 3, 120, 17, 5, 99, 64]
PRECISIONS = ["bf16", "fp32", "int8", "int4", "q8_0", "q4_0"]


def _model(precision: str) -> torch.nn.Module:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = random_mixtral(layers=LAYERS, hidden=64, inter=64, dtype=dtype)
    if precision not in ("bf16", "fp32"):
        compress_(model, [{"method": "quantize_layers", "precisions": [precision] * LAYERS}])
    use_kernel_(model, "cpu")
    return model


def _count_calls(monkeypatch) -> dict[str, int]:
    calls = {"rows": 0, "one": 0}
    for name in calls:
        real = getattr(SlotDecode, name)

        def counted(self, *a, _real=real, _name=name):
            calls[_name] += 1
            return _real(self, *a)

        monkeypatch.setattr(SlotDecode, name, counted)
    return calls


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("cache", [8, 3, 1], ids=["all", "some", "fewer-than-top-k"])
def test_one_token_forwards_equal_the_resident_layers(precision, cache, monkeypatch):
    native_ops()  # built if missing (a clear skip when this machine cannot build it)
    resident, model = _model(precision), _model(precision)
    offload_(model, OffloadConfig(tier="cpu", cache=cache, scope="layer", policy="lru"))
    use_kernel_(model, "cpu")
    calls = _count_calls(monkeypatch)
    try:
        with torch.inference_mode():  # as generation runs: buffers made inside must still take loads
            for t in TOKENS:
                x = torch.tensor([[t]])
                assert torch.equal(model(x), resident(x)), t
        st = model.offload.cache.stats
        assert calls["rows"] > 0
        if cache == 8:
            assert st.evictions == 0 and st.hits > 0
        elif cache == 3:
            assert st.hits > 0 and st.misses > 0 and st.evictions > 0
        else:  # one slot a layer, two experts a token: the second streams through the transient buffer
            assert st.transient_loads > 0 and calls["one"] == st.transient_loads
        if precision.startswith("q"):  # symmetric codes: the kernels skip their zeros
            assert model.offload.midpoints
        elif precision.startswith("int"):
            assert not model.offload.midpoints
    finally:
        model.offload.close()


@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_cached_experts_run_in_one_native_call_a_layer(precision, monkeypatch):
    """Every expert cached: each layer of a one-token step makes one call for both routed experts."""
    native_ops()
    model = _model(precision)
    offload_(model, OffloadConfig(tier="cpu", cache=8, scope="layer", policy="lru"))
    use_kernel_(model, "cpu")
    try:
        with torch.inference_mode():
            for t in range(128):  # every expert of every layer loaded once
                model(torch.tensor([[t]]))
            assert model.offload.cache.stats.misses == LAYERS * 8
            calls = _count_calls(monkeypatch)
            for t in TOKENS:
                model(torch.tensor([[t]]))
        assert calls == {"rows": LAYERS * len(TOKENS), "one": 0}
        assert model.offload.cache.stats.misses == LAYERS * 8
    finally:
        model.offload.close()


def test_a_one_percent_error_in_one_expert_row_is_caught(monkeypatch):
    """The equality above is sharp: one expert's output row off by 1% breaks it."""
    native_ops()
    resident, model = _model("int8"), _model("int8")
    offload_(model, OffloadConfig(tier="cpu", cache=8, scope="layer", policy="lru"))
    use_kernel_(model, "cpu")
    real = SlotDecode.rows

    def off(self, x, slots, out):
        real(self, x, slots, out)
        out[0] *= 1.01

    monkeypatch.setattr(SlotDecode, "rows", off)
    try:
        with torch.inference_mode():
            x = torch.tensor([[TOKENS[0]]])
            got, want = model(x), resident(x)
        assert not torch.equal(got, want)
        assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3)
    finally:
        model.offload.close()


def test_other_kernels_keep_the_per_expert_path(monkeypatch):
    """Kernel 'reference' (eager SwiGLU per cached expert): no slot decode."""
    model = _model("bf16")
    offload_(model, OffloadConfig(tier="cpu", cache=8, scope="layer", policy="lru"))
    use_kernel_(model, "reference")
    calls = _count_calls(monkeypatch)
    try:
        with torch.inference_mode():
            model(torch.tensor([[3]]))
        assert calls == {"rows": 0, "one": 0}
    finally:
        model.offload.close()
