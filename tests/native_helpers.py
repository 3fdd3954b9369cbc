"""The native CPU kernels for tests: built once if missing (a clear skip, with the compiler's message,
when this machine cannot build them), and the variants this CPU runs, each forced by name."""

from __future__ import annotations

import pytest

from moeinfer.kernels import native


def native_ops():
    """torch.ops.moeinfer_native, building the library first when it is not built or stale."""
    from moeinfer.kernels.native.build import build, is_current

    if not is_current():
        native._state.clear()
        try:
            build()
        except RuntimeError as err:
            pytest.skip(f"native kernels cannot be built here: {err}")
    native._state.clear()
    ops = native.load()
    assert ops is not None, native.unavailable_reason()
    return ops


def variant_params():
    """pytest params, one per native variant; one this CPU cannot run is skipped naming the reason."""
    return [pytest.param(v, id=v) for v in native.VARIANTS]


def require(variant: str) -> str:
    native_ops()
    why = native.why_not(variant)
    if why is not None:
        pytest.skip(f"variant {variant!r} cannot run on this CPU: {why}")
    return variant


def force_expert_path(monkeypatch, path: str) -> None:
    """Make quantized_moe_cpu take its token-by-token decode ("decode") or its prefill ("prefill") for
    every batch, whatever the form of activations."""
    from moeinfer.kernels import quantized_cpu

    slots = {"decode": 10**6, "prefill": 0}[path]
    monkeypatch.setattr(quantized_cpu, "DECODE_SLOTS_PER_EXPERT", slots)
    monkeypatch.setattr(quantized_cpu, "Q8_DECODE_SLOTS_PER_EXPERT", slots)


def experts_decode_and_prefill(ops, stack, bits: int, D: int, I: int, variant: str, activations: str, *,
                               seed: int = 4):
    """(moe_decode_q, moe_prefill_q) outputs of one packed experts stack (q_gu, s_gu, z_gu, q_dn, s_dn,
    z_dn; 8 experts) on inputs drawn from `seed`: the same inputs for every stack, so two storage forms
    of the same weights can be compared with torch.equal."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(D, generator=g)
    experts, weights = torch.tensor([3, 0, 6, 5, 1]), torch.rand(5, generator=g)
    decode = ops.moe_decode_q(x, experts, weights, *stack, bits, 32, D, I, variant, activations)
    xs = torch.randn(30, D, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(30)])
    w = torch.rand(30, 3, generator=g)
    return decode, ops.moe_prefill_q(xs, idx, w, *stack, bits, 32, D, I, variant)
