"""The expert stage of an offloaded layer over the expert cache's slots (moeinfer/offload/slot_experts.py):
with kernel 'cpu' on a CPU, the cached experts run in one native call on the slots in place, each load's
experts as they land, then the resident native schedule's own sum, so every forward it takes equals the
resident layer's on the same kernel bit for bit (torch.equal: sharper than any tolerance), whatever the
cache holds: every expert, some (misses, evictions), or fewer slots than a token routes to (loads through
the transient buffer). One-token steps of float (bf16, fp32) and quantized experts (asymmetric int8/int4,
symmetric Q8_0/Q4_0 whose zeros the kernels skip); prompts (the int8-activation prefill) and batched
steps (token by token) of quantized experts; prompts and batched steps of float experts where the cpu
kernel runs its native rows kernel."""

from __future__ import annotations

import pytest
import torch
from native_helpers import native_ops
from offload_helpers import random_mixtral

from moeinfer.compress.api import compress_
from moeinfer.kernels import use_kernel_
from moeinfer.offload import OffloadConfig, offload_
from moeinfer.offload.slot_experts import SlotStep

LAYERS = 3
TOKENS = [3, 17, 99, 42, 7, 64, 3, 120, 17, 5, 99, 64]
PRECISIONS = ["bf16", "fp32", "int8", "int4", "q8_0", "q4_0"]
QUANTIZED = ["int8", "int4", "q8_0", "q4_0"]
CACHES = pytest.mark.parametrize("cache", [8, 3, 1], ids=["all", "some", "fewer-than-top-k"])


def _model(precision: str) -> torch.nn.Module:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = random_mixtral(layers=LAYERS, hidden=64, inter=64, dtype=dtype)
    if precision not in ("bf16", "fp32"):
        compress_(model, [{"method": "quantize_layers", "precisions": [precision] * LAYERS}])
    use_kernel_(model, "cpu")
    return model


def _offloaded(precision: str, cache: int, kernel: str = "cpu") -> torch.nn.Module:
    model = _model(precision)
    offload_(model, OffloadConfig(tier="cpu", cache=cache, scope="layer", policy="lru"))
    use_kernel_(model, kernel)
    return model


def _count_calls(monkeypatch) -> dict[str, int]:
    """Calls of SlotStep.rows / .one, and the schedules of the steps that made them."""
    calls = {"rows": 0, "one": 0, "decode": 0, "prefill": 0}
    for name in ("rows", "one"):
        real = getattr(SlotStep, name)

        def counted(self, *a, _real=real, _name=name):
            calls[_name] += 1
            calls[self.schedule] += 1
            return _real(self, *a)

        monkeypatch.setattr(SlotStep, name, counted)
    return calls


def _prompts_equal(model: torch.nn.Module, resident: torch.nn.Module, starts: tuple[int, ...]) -> None:
    """24-token prompts from each start (a repeated start: the cache warm from the prompts before), each
    forward torch.equal to the resident model's."""
    for start in starts:
        x = (torch.arange(start, start + 24) * 7 % 128)[None]
        assert torch.equal(model(x), resident(x)), start


def _check_cache(model: torch.nn.Module, cache: int, calls: dict[str, int], *, prompts: bool = False) -> None:
    st = model.offload.cache.stats
    assert calls["rows"] > 0
    if cache == 8:
        assert st.evictions == 0 and st.hits > 0
    elif cache == 3:  # a prompt's layer needs more experts than slots: the rest stream through the transient buffer
        assert st.hits > 0 and st.misses > 0 and (st.transient_loads if prompts else st.evictions) > 0
    else:  # one slot a layer, two experts a token: the second streams through the transient buffer
        assert st.transient_loads > 0 and calls["one"] == st.transient_loads


@pytest.mark.parametrize("precision", PRECISIONS)
@CACHES
def test_one_token_forwards_equal_the_resident_layers(precision, cache, monkeypatch):
    native_ops()  # built if missing (a clear skip when this machine cannot build it)
    resident, model = _model(precision), _offloaded(precision, cache)
    calls = _count_calls(monkeypatch)
    try:
        with torch.inference_mode():  # as generation runs: buffers made inside must still take loads
            for t in TOKENS:
                x = torch.tensor([[t]])
                assert torch.equal(model(x), resident(x)), t
        _check_cache(model, cache, calls)
        if precision.startswith("q"):  # symmetric codes: the kernels skip their zeros
            assert model.offload.midpoints
        elif precision.startswith("int"):
            assert not model.offload.midpoints
    finally:
        model.offload.close()


@pytest.mark.parametrize("precision", QUANTIZED)
@CACHES
def test_prompts_equal_the_resident_layers(precision, cache, monkeypatch):
    """A 24-token prompt (48 token-slots over 8 experts: the int8-activation prefill), then prompts again
    with the cache warm: the resident layer's output bit for bit."""
    native_ops()
    resident, model = _model(precision), _offloaded(precision, cache)
    calls = _count_calls(monkeypatch)
    try:
        with torch.inference_mode():
            _prompts_equal(model, resident, (0, 24, 0, 50))
        _check_cache(model, cache, calls, prompts=True)
        assert calls["prefill"] == calls["rows"] + calls["one"] and calls["decode"] == 0
    finally:
        model.offload.close()


@pytest.mark.parametrize("precision", ["int8", "q4_0"])
@CACHES
def test_batched_steps_equal_the_resident_layers(precision, cache, monkeypatch):
    """Three sequences a step (few token-slots per routed expert: the resident decodes token by token)."""
    native_ops()
    resident, model = _model(precision), _offloaded(precision, cache)
    calls = _count_calls(monkeypatch)
    try:
        with torch.inference_mode():
            for i in range(0, len(TOKENS), 3):
                x = torch.tensor(TOKENS[i:i + 3])[:, None]
                assert torch.equal(model(x), resident(x)), i
        _check_cache(model, cache, calls)
        assert calls["decode"] > 0
    finally:
        model.offload.close()


def test_fp32_activations_equal_the_resident_layers(monkeypatch):
    """fp32 activations: a 24-token prompt has few token-slots per expert for them, so the resident layer
    decodes it token by token, and so do the slots."""
    native_ops()
    resident, model = _model("int4"), _offloaded("int4", 3)
    for m in (resident, model):
        for block in m.moe_blocks():
            block.experts.cpu_activations = "f32"
    calls = _count_calls(monkeypatch)
    try:
        with torch.inference_mode():
            _prompts_equal(model, resident, (0, 24, 0))
        assert calls["decode"] > 0 and calls["prefill"] == 0
    finally:
        model.offload.close()


@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_cached_experts_run_in_one_native_call_a_layer(precision, monkeypatch):
    """Every expert cached: each layer of a one-token step makes one call for both routed experts, and
    (int4) each layer of a prompt one call for all its tokens."""
    native_ops()
    model = _offloaded(precision, 8)
    try:
        with torch.inference_mode():
            for t in range(128):  # every expert of every layer loaded once
                model(torch.tensor([[t]]))
            assert model.offload.cache.stats.misses == LAYERS * 8
            calls = _count_calls(monkeypatch)
            for t in TOKENS:
                model(torch.tensor([[t]]))
            assert calls == {"rows": LAYERS * len(TOKENS), "one": 0, "decode": LAYERS * len(TOKENS), "prefill": 0}
            if precision == "int4":
                calls = _count_calls(monkeypatch)
                model(torch.arange(40)[None])
                assert calls == {"rows": LAYERS, "one": 0, "decode": 0, "prefill": LAYERS}
        assert model.offload.cache.stats.misses == LAYERS * 8
    finally:
        model.offload.close()


@pytest.mark.parametrize("tokens", [1, 24], ids=["decode", "prefill"])
def test_a_one_percent_error_in_one_expert_row_is_caught(tokens, monkeypatch):
    """The equality above is sharp: one (n, k)'s output row off by 1% breaks it."""
    native_ops()
    resident, model = _model("int8"), _offloaded("int8", 8)
    real = SlotStep.rows

    def off(self, slots):
        real(self, slots)
        self.out[0] *= 1.01

    monkeypatch.setattr(SlotStep, "rows", off)
    try:
        with torch.inference_mode():
            x = torch.tensor(TOKENS[:tokens])[None]
            got, want = model(x), resident(x)
        assert not torch.equal(got, want)
        assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3)
    finally:
        model.offload.close()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@CACHES
def test_float_rows_on_the_native_rows_schedule_equal_the_resident_layers(precision, cache, monkeypatch):
    """Float experts at several rows where the cpu kernel runs its native rows kernel (`moe_rows`: bf16 on
    CPUs without a native bf16 matmul; forced here on any CPU): prompts and batched steps over the slots,
    the resident layer's output bit for bit."""
    from moeinfer.kernels import cpu

    native_ops()
    monkeypatch.setattr(cpu, "choose_schedule", lambda dtype, hidden, inner: "rows")
    resident, model = _model(precision), _offloaded(precision, cache)
    calls = _count_calls(monkeypatch)
    try:
        with torch.inference_mode():
            _prompts_equal(model, resident, (0, 24, 0))
            x = torch.tensor(TOKENS[:3])[:, None]
            assert torch.equal(model(x), resident(x))
        _check_cache(model, cache, calls, prompts=True)
        assert calls["prefill"] == calls["rows"] + calls["one"] and calls["decode"] == 0
    finally:
        model.offload.close()


def test_other_kernels_and_schedules_keep_the_per_expert_path(monkeypatch):
    """Kernel 'reference' (eager SwiGLU per cached expert), float experts at several tokens where the cpu
    kernel runs torch GEMMs, and quantized prompts with fp32 activations (the resident runs dequantized
    tiles): no slot step."""
    from moeinfer.kernels import cpu

    native_ops()
    monkeypatch.setattr(cpu, "choose_schedule", lambda dtype, hidden, inner: "per-expert")
    reference, bf16, f32_acts = _offloaded("bf16", 8, "reference"), _offloaded("bf16", 8), _offloaded("int8", 8)
    for block in f32_acts.moe_blocks():
        block.experts.cpu_activations = "f32"
    calls = _count_calls(monkeypatch)
    try:
        with torch.inference_mode():
            reference(torch.tensor([[3]]))
            bf16(torch.arange(24)[None])
            f32_acts(torch.arange(40)[None])  # 80 token-slots over 8 experts: tiles (24 tokens: token by token)
        assert calls == {"rows": 0, "one": 0, "decode": 0, "prefill": 0}
    finally:
        for m in (reference, bf16, f32_acts):
            m.offload.close()
