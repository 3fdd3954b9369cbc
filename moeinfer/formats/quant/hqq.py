"""HQQ zero-point optimisation (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine
Learning Models"): no calibration data, only the weights.

HQQ fits the zero-point z of each group so that the dequantized weights match w under a sparsity-
promoting l_p loss (p < 1, robust to the few outlier weights that min-max scaling is built around).
Half-quadratic splitting adds an auxiliary error variable e and alternates two closed forms:

Steps (per iteration, all groups at once):
1. quantize and dequantize with the current z: q = clamp(round(w/s + z)), r = (q - z) * s;
2. e <- shrink_p(w - r, beta): generalised soft-thresholding, the l_p proximal step;
3. z <- mean over the group of (q - (w - e) / s): the least-squares zero given q and e;
4. beta <- kappa * beta (the penalty tightens), and keep, per group, the z with the lowest squared
   reconstruction error seen so far (the RTN start included, so HQQ is never worse than RTN).
The scale stays the min-max one, as in HQQ's default setting.
"""

from __future__ import annotations

import torch


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of |x|^p: sign(x) * relu(|x| - |x|^(p-1) / beta)."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-12).pow(p - 1) / beta)


@torch.no_grad()
def optimize_zero(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int, p: float = 0.7,
                  beta: float = 10.0, kappa: float = 1.01, iters: int = 20) -> torch.Tensor:
    """wg [..., G, g] fp32 grouped weights, scale/zero [..., G] -> optimised zero [..., G]."""
    qmax = (1 << bits) - 1
    s = scale[..., None]
    z = zero.clone()
    best_z, best_err = zero.clone(), None
    for _ in range(iters + 1):
        # 1. quantize / dequantize with the current zero
        q = torch.clamp(torch.round(wg / s + z[..., None]), 0, qmax)
        r = (q - z[..., None]) * s
        # 4. keep the best zero per group (checked for the start and after every update)
        err = (wg - r).pow(2).sum(-1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_z = torch.where(better, z, best_z)
            best_err = torch.where(better, err, best_err)
        # 2. l_p proximal step on the error
        e = _shrink(wg - r, beta, p)
        # 3. closed-form zero
        z = (q - (wg - e) / s).mean(-1)
        beta *= kappa
    return best_z
