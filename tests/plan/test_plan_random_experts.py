"""The profile's experts of a quantize preset (moeinfer/planning/profile.py `experts_module`) are drawn
as codes, scales and zero-points at the preset's width and group size: a valid module of the preset's
stored size whose weights are ~0.02 wide, whose zero-points the kernels read (not all at the midpoint),
and whose native forward matches the eager reference."""

from __future__ import annotations

import pytest
import torch

from moeinfer.compress.methods.quantize_layers import layer_quantizer
from moeinfer.planning.profile import experts_module, stored_expert_bytes, uniform_routing


@pytest.mark.parametrize("preset", ["int4", "int8"])
def test_drawn_quantized_experts_are_the_presets_layout_and_run(preset):
    q = layer_quantizer(preset)
    E, D, I = 3, 64, 96
    ex = experts_module(preset, E, D, I, torch.device("cpu"))
    assert type(ex).__name__ == "QuantizedExperts"
    assert ex.bits == [q.bits] * E and ex.group_size == q.group_size
    assert sum(p.numel() * p.element_size() for p in ex.parameters()) == E * stored_expert_bytes(preset, D, I)
    mid = float(1 << (q.bits - 1))
    zeros = torch.cat([p.reshape(-1) for n, p in ex.named_parameters() if n.startswith("z")])
    assert set(zeros.unique().tolist()) == {mid - 1, mid}  # not all at the midpoint: the kernels read them
    w = torch.cat([torch.cat([m.reshape(-1) for m in ex.expert_weights(e)]) for e in range(E)])
    assert w.abs().max() <= 0.03 + 1e-6 and 0.005 < w.std() < 0.03
    x = torch.randn(8, D)
    routing = uniform_routing(8, 2, E, torch.device("cpu"))
    with torch.inference_mode():
        got, ref = ex(x, routing), ex.eager_forward(x, routing)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-3)
