"""quantize_layers' per-layer error, summed one expert at a time, equals the relative error of the whole
layer at once (the form it replaced, which held several fp32 copies of a layer)."""

from __future__ import annotations

import pytest
import torch

from moeinfer.compress.methods.quantize import relative_error
from moeinfer.compress.methods.quantize_layers import _layer_error
from moeinfer.formats.quantized_experts import QuantizedExperts


class _Experts:
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self.gate_up_proj, self.down_proj, self.num_experts = gate_up, down, gate_up.shape[0]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_error_equals_the_whole_layer_relative_error(bits, dtype):
    g = torch.Generator().manual_seed(bits)
    E, I, D = 3, 64, 128
    gate_up = (torch.randn(E, 2 * I, D, generator=g) * torch.linspace(0.5, 3, E)[:, None, None]).to(dtype)
    down = torch.randn(E, D, I, generator=g).to(dtype)
    q = QuantizedExperts.from_float(gate_up, down, [bits] * E, group_size=64, algorithm="rtn")
    gu, dn = q.dequantize_all(dtype)
    want = (relative_error(gate_up, gu) + relative_error(down, dn)) / 2
    got = _layer_error(_Experts(gate_up, down), q)
    assert want > 0
    assert got == pytest.approx(want, rel=1e-5)
