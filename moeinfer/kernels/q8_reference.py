"""Int8 activations, the eager reference of the native kernels' "q8" paths (csrc/kern.h: decode, the
quantized GEMM `gemm_q`, the experts' prefill `moe_prefill_q`): an fp32
activation vector quantized once to blocks of 32 columns, as llama.cpp's Q8_0 activation blocks
(symmetric, one scale per block, round to nearest; the scale kept in fp32, not fp16), then the
weights' dot products taken against the dequantized vector.

Shapes: N tokens, D hidden, E experts, K top-k, I expert inner size, n columns, nb = ceil(n / 32).

1. `quantize_q8`: x [..., n] -> codes [..., nb * 32] int8 (zero-padded) and scales [..., nb], with
   d_b = max|x_b| / 127 and xq_j = round-half-even(x_j * (1 / d_b)) (0 where d_b = 0), bit for bit what
   the native `quantize_q8` computes (a block holding inf or NaN: d_b = NaN, codes 0, so the
   products it enters are NaN as in fp32);
2. `q8_round_trip`: x -> d_b * xq_j [..., n], the vector every int8-activation row product sees;
3. `reference_moe_q8`: the expert stage with steps 1-2 applied where the native decode and prefill
   apply them: to each token's x before gate_up, and to each (token, expert)'s SiLU(gate) * up before
   down. A GEMM's reference is step 2 on each of its activation rows, then the matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QBLOCK = 32


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] float -> (codes [..., nb * 32] int8, scales [..., nb] fp32); step 1 above."""
    n = x.shape[-1]
    nb = -(-n // QBLOCK)
    blocks = F.pad(x.float(), (0, nb * QBLOCK - n)).unflatten(-1, (nb, QBLOCK))  # [..., nb, 32]
    finite = torch.isfinite(blocks).all(-1)  # a block with inf or NaN: scale NaN, codes 0
    d = torch.where(finite, blocks.abs().amax(-1) / 127.0, torch.nan)  # [..., nb]
    inv = torch.where(finite & (d != 0), 1.0 / d, torch.zeros_like(d))
    clean = torch.where(finite[..., None], blocks, torch.zeros_like(blocks))
    q = torch.round(clean * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.flatten(-2), d


def q8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] -> its int8-block approximation [..., n] fp32; step 2 above."""
    q, d = quantize_q8(x)
    n = x.shape[-1]
    return (q.float().unflatten(-1, (d.shape[-1], QBLOCK)) * d[..., None]).flatten(-2)[..., :n]


def reference_moe_q8(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor) -> torch.Tensor:
    """x [N, D], indices/weights [N, K], dense fp32 gate_up [E, 2I, D], down [E, D, I] -> [N, D] fp32;
    step 3 above, one token and one expert at a time (a reference, not a fast path)."""
    N, D = x.shape
    out = torch.zeros(N, D)
    for n in range(N):
        xh = q8_round_trip(x[n].float())  # [D]
        for k in range(indices.shape[1]):
            e = int(indices[n, k])
            gate, up = (gate_up[e].float() @ xh).chunk(2)  # [I] each
            h = q8_round_trip(F.silu(gate) * up)  # [I]
            out[n] += float(weights[n, k]) * (down[e].float() @ h)
    return out
