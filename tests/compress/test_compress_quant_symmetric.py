"""Symmetric Q8_0/Q4_0 quantization against an element-by-element transcription of ggml's reference
quantizer in numpy float32 (an independent implementation: loops, no torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeinfer.formats.quant.groupwise import dequantize, quantize
from moeinfer.formats.quant.packing import unpack_codes


def ggml_reference(row: np.ndarray, bits: int, g: int = 32) -> tuple[list[int], list[float]]:
    """Signed codes and fp16 scales of one fp32 row, one group at a time, as ggml's scalar loops."""
    codes, scales = [], []
    for start in range(0, row.size, g):
        blk = row[start:start + g].astype(np.float32)
        if bits == 8:
            d = np.float32(np.abs(blk).max() / np.float32(127))
            inv = np.float32(1) / d if d else np.float32(0)
            for v in blk:
                x = np.float32(v * inv)
                codes.append(int(np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))))
        else:
            amax, mx = np.float32(0), np.float32(0)
            for v in blk:
                if amax < abs(v):
                    amax, mx = abs(v), v
            d = np.float32(mx / np.float32(-8))
            inv = np.float32(1) / d if d else np.float32(0)
            for v in blk:
                codes.append(min(15, int(np.float32(v * inv) + np.float32(8.5))) - 8)
        scales.append(float(np.float16(d)))
    return codes, scales


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_and_scales_equal_ggml_reference(bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 96) * torch.tensor([1e-3, 1.0, 40.0])[:, None]
    w[1, 32:64] = 0.0  # an all-zero group: d = 0
    w[2, 5] = -w[2, 0:32].abs().max() * 1.5  # the largest magnitude negative
    qt = quantize(w, bits=bits, group_size=32, algorithm="sym")
    got_codes = unpack_codes(qt.packed, bits, 96).to(torch.int64) - (1 << (bits - 1))
    for r in range(3):
        codes, scales = ggml_reference(w[r].numpy(), bits)
        assert got_codes[r].tolist() == codes
        assert qt.scale[r].tolist() == scales
    assert bool((qt.zero == (1 << (bits - 1))).all())


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_weights_are_exact_code_times_scale(bits: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(4, 64)
    qt = quantize(w, bits=bits, group_size=32, algorithm="sym")
    signed = (unpack_codes(qt.packed, bits, 64).to(torch.float64) - (1 << (bits - 1))).view(4, 2, 32)
    exact = (signed * qt.scale.double()[..., None]).view(4, 64)
    got = dequantize(qt.packed, qt.scale, qt.zero, bits=bits, group_size=32, cols=64)
    assert torch.equal(got.double(), exact)
    # and it approximates w: half a step (Q8_0) or one step (Q4_0 clamps +8 to 7), plus the fp16
    # rounding of the scale (up to 2^-11 relative, times codes of up to 127 or 8)
    step = qt.scale.abs().repeat_interleave(32, -1)
    bound = 0.5 + 127 * 2.0**-11 if bits == 8 else 1.0 + 8 * 2.0**-11
    assert bool(((got - w).abs() <= step * bound).all())


def test_symmetric_rejects_other_widths_and_ragged_groups() -> None:
    with pytest.raises(ValueError, match="Q4_0, Q8_0"):
        quantize(torch.randn(2, 64), bits=2, group_size=32, algorithm="sym")
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize(torch.randn(2, 40), bits=4, group_size=32, algorithm="sym")
