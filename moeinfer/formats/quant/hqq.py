"""HQQ zero-point optimisation (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine
Learning Models"): no calibration data, only the weights.

HQQ fits the zero-point z of each group so that the dequantized weights match w under a sparsity-
promoting l_p loss (p < 1, robust to the few outlier weights that min-max scaling is built around).
Half-quadratic splitting adds an auxiliary error variable e and alternates two closed forms:

Steps (per iteration, all groups of every row given at once: callers batch whole experts):
1. quantize and dequantize with the current z: q = clamp(round(w/s + z)), r = (q - z) * s;
2. keep, per group, the z with the lowest squared reconstruction error seen so far (the RTN start
   included, so HQQ is never worse than RTN); stop early when the total error falls by less than a
   fraction `tol` of itself (HQQ's reference implementation stops when it no longer falls at all,
   `tol` = 0; the error converges geometrically, and the last half of the 20 iterations gain ~0.5%);
3. e <- shrink_p(w - r, beta): generalised soft-thresholding, the l_p proximal step;
4. z <- mean over the group of (q - (w - e) / s): the least-squares zero given q and e;
5. beta <- kappa * beta (the penalty tightens).
The scale stays the min-max one, as in HQQ's default setting.

Speed (the method ran 32 minutes on a 3.5B-parameter model before): the loop works on u = w / s,
computed once; w - r = (u - q + z) * s and mean((w - e) / s) = mean(u) - mean(e) / s per group, so an
iteration is ~15 element-wise passes, most of them in place, and the early stop halves the iterations.
(A torch.compile'd iteration runs 3.7x faster but takes over a minute to compile: not worth it here.)
"""

from __future__ import annotations

import torch


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of |x|^p: sign(x) * relu(|x| - |x|^(p-1) / beta)."""
    ax = x.abs()
    t = ax.clamp_min(1e-12).pow_(p - 1).div_(beta)
    return torch.copysign(t.neg_().add_(ax).relu_(), x)


@torch.no_grad()
def optimize_zero(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int, p: float = 0.7,
                  beta: float = 10.0, kappa: float = 1.01, iters: int = 20, tol: float = 1e-3) -> torch.Tensor:
    """wg [..., G, g] fp32 grouped weights, scale/zero [..., G] -> optimised zero [..., G]."""
    qmax = (1 << bits) - 1
    s = scale[..., None]
    u = wg / s  # [..., G, g], loop-invariant
    u_mean = u.mean(-1)
    z = zero.clone()
    best_z, best_err = zero.clone(), None
    previous = float("inf")
    for _ in range(iters + 1):
        # 1. quantize with the current zero; d = (w - r) / s
        q = (u + z[..., None]).round_().clamp_(0, qmax)
        d = torch.sub(u, q).add_(z[..., None])
        # 2. keep the best zero per group (the error in units of the group's own step, s^2 |w - r|^2 / s^2)
        err = torch.linalg.vector_norm(d, dim=-1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_z = torch.where(better, z, best_z)
            best_err = torch.where(better, err, best_err)
        total = float((err * scale).square().sum())
        if total > previous * (1 - tol):
            break
        previous = total
        # 3. l_p proximal step on the error w - r
        e = _shrink(d.mul_(s), beta, p)
        # 4. closed-form zero: mean(q) - mean(u) + mean(e) / s
        z = q.mean(-1).sub_(u_mean).add_(e.mean(-1) / scale)
        # 5.
        beta *= kappa
    return best_z
