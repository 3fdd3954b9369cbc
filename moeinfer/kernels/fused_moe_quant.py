"""Fused MoE in Triton over quantized experts: the grouped GEMMs of moeinfer/kernels/fused_moe.py with
the weight tiles read as packed low-bit codes and dequantized in registers just before `tl.dot`, so
the float weights never exist in memory. The unpacking follows vLLM's `fused_moe_kernel_gptq_awq`
(each code's byte gathered by `k // codes_per_byte`, shifted and masked; scale and zero gathered by
`k // group_size`).

Shapes: N tokens, D hidden, E experts, K top-k, I inner size, S = N*K slots, P(C) packed bytes of a
row of C codes, G(C) groups of a row, M/BN/BK block sizes.

Storage (moeinfer/formats/quantized_experts.py, moeinfer/formats/quant/packing.py): every expert
of the layer has the same width b in {2, 4, 8}; code c of a row sits in byte c // (8 / b) at bit
(c % (8 / b)) * b (8-bit: one byte per code; the first code in the low bits); group-wise
asymmetric dequant w = q * s + (-z * s), one fp32 scale s and zero z per `group_size` columns
(the last group may be shorter):
    q_gate_up [E, 2I, P(D)] uint8   s_gate_up, z_gate_up [E, 2I, G(D)]   (gate rows first)
    q_down    [E, D,  P(I)] uint8   s_down,    z_down    [E, D,  G(I)]

Steps (comments below carry the numbers):
1. align the slots to blocks of M rows per expert (moeinfer/kernels/align_triton.py, as the float kernel);
2. gate_up kernel: per K-tile, dequantize the gate and up tiles [BK, BN] to the activation dtype,
   then h[slot] = silu(x @ gate^T) * (x @ up^T) exactly as the float kernel;
3. down kernel: dequantize the down tile the same way; out[token] += w[slot] * (h @ down^T) by fp32
   atomic adds.
Launch configurations are the float kernel's (moeinfer/kernels/configs.py), their K-tiles fitted
inside the quantization groups (`fit_to_groups`); mixed widths in one
layer and 3-bit codes (which straddle bytes) are not handled here: callers keep the eager path
(`quantized_unsupported` says why).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Protocol

import torch
import triton
import triton.language as tl

from moeinfer.kernels.align_triton import align_for_kernel
from moeinfer.kernels.configs import KernelConfig, get_config

FUSED_BITS = (2, 4, 8)


class PackedExperts(Protocol):
    """What the kernel reads of moeinfer.formats.quantized_experts.QuantizedExperts (not imported:
    kernels sit below compress); the stacks are attributes q{b}_gate_up, s{b}_gate_up, ...."""

    bits: list[int]
    group_size: int
    hidden_size: int
    intermediate_size: int


@triton.jit
def _dequant_tile(q_base, s_base, z_base, k0, offs_k, offs_n, k_ok, n_ok,
                  stride_qn, stride_qk, stride_sn, stride_sg,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes of input columns offs_k [BK] of rows offs_n [BN] -> fp32 weights [BK, BN] (0 where masked)."""
    per_byte = 8 // BITS  # constexpr: codes per byte
    mask = k_ok[:, None] & n_ok[None, :]
    byte = tl.load(q_base + offs_n[None, :] * stride_qn + (offs_k[:, None] // per_byte) * stride_qk,
                   mask=mask, other=0).to(tl.int32)
    code = (byte >> ((offs_k[:, None] % per_byte) * BITS)) & ((1 << BITS) - 1)
    if GROUP_SIZE % BLOCK_K == 0:
        # The tile lies inside one group: one scale and zero per row [BN], not per element.
        group = k0 // GROUP_SIZE
        s = tl.load(s_base + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0)
        z = tl.load(z_base + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0)
        w = code.to(tl.float32) * s[None, :] + (-z * s)[None, :]
    else:
        group = offs_k[:, None] // GROUP_SIZE
        s = tl.load(s_base + offs_n[None, :] * stride_sn + group * stride_sg, mask=mask, other=0.0)
        z = tl.load(z_base + offs_n[None, :] * stride_sn + group * stride_sg, mask=mask, other=0.0)
        w = code.to(tl.float32) * s + (-z * s)
    return tl.where(mask, w, 0.0)


@triton.jit
def _gate_up_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, h_ptr, slots_ptr, block_expert_ptr,
                          num_slots, D, I, top_k,
                          stride_xn, stride_xd, stride_qe, stride_qn, stride_qk,
                          stride_se, stride_sn, stride_sg, stride_hs, stride_hi,
                          BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(slots_ptr + offs_m).to(tl.int64)  # [M]
    row_ok = slot < num_slots
    token = slot // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of I
    n_ok = offs_n < I
    x_rows = x_ptr + token[:, None] * stride_xn
    q_base = q_ptr + e * stride_qe
    s_base = s_ptr + e * stride_se
    z_base = z_ptr + e * stride_se
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(x_rows + offs_k[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # 2. dequantize in registers, rounded to the activation dtype as the eager path does
        w_gate = _dequant_tile(q_base, s_base, z_base, k0, offs_k, offs_n, k_ok, n_ok, stride_qn, stride_qk,
                               stride_sn, stride_sg, BITS, GROUP_SIZE, BLOCK_K).to(x_ptr.dtype.element_ty)
        w_up = _dequant_tile(q_base, s_base, z_base, k0, offs_k, offs_n + I, k_ok, n_ok, stride_qn, stride_qk,
                             stride_sn, stride_sg, BITS, GROUP_SIZE, BLOCK_K).to(x_ptr.dtype.element_ty)
        if DOT_F32:
            a, w_gate, w_up = a.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
        acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(h_ptr + slot[:, None] * stride_hs + offs_n[None, :] * stride_hi, h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_quant_kernel(h_ptr, q_ptr, s_ptr, z_ptr, out_ptr, slots_ptr, block_expert_ptr, route_w_ptr,
                       num_slots, D, I, top_k,
                       stride_hs, stride_hi, stride_qe, stride_qn, stride_qk,
                       stride_se, stride_sn, stride_sg, stride_on, stride_od,
                       BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(slots_ptr + offs_m).to(tl.int64)
    row_ok = slot < num_slots
    token = slot // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of D
    n_ok = offs_n < D
    h_rows = h_ptr + slot[:, None] * stride_hs
    q_base = q_ptr + e * stride_qe
    s_base = s_ptr + e * stride_se
    z_base = z_ptr + e * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = tl.load(h_rows + offs_k[None, :] * stride_hi, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # 3. dequantize the down tile in registers
        w = _dequant_tile(q_base, s_base, z_base, k0, offs_k, offs_n, k_ok, n_ok, stride_qn,
                          stride_qk, stride_sn, stride_sg, BITS, GROUP_SIZE, BLOCK_K).to(h_ptr.dtype.element_ty)
        if DOT_F32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    route_w = tl.load(route_w_ptr + slot, mask=row_ok, other=0.0)
    acc = acc * route_w[:, None]
    tl.atomic_add(out_ptr + token[:, None] * stride_on + offs_n[None, :] * stride_od, acc,
                  mask=row_ok[:, None] & n_ok[None, :])


def fit_to_groups(cfg: KernelConfig, group_size: int) -> KernelConfig:
    """The launch config with K-tiles that lie inside one quantization group (then each tile reads one
    scale and zero per row, not per element), else K-tiles of 16 (the per-element path's gathers of
    scales stay small enough for the multiprocessor's shared memory)."""
    pow2 = group_size & -group_size  # the largest power of two dividing group_size
    def fit(bk: int) -> int:
        return bk if group_size % bk == 0 else (min(bk, pow2) if pow2 >= 16 else 16)
    return replace(cfg, block_k_gate_up=fit(cfg.block_k_gate_up), block_k_down=fit(cfg.block_k_down))


def quantized_unsupported(experts: PackedExperts) -> str | None:
    """Why the fused kernel cannot run these experts (None = it can)."""
    widths = sorted(set(experts.bits))
    if len(widths) != 1:
        return f"mixed bit widths {widths} in one layer"
    if widths[0] not in FUSED_BITS:
        return f"{widths[0]}-bit codes (fused: {', '.join(map(str, FUSED_BITS))})"
    return None


def fused_moe_packed(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                     q_gate_up: torch.Tensor, s_gate_up: torch.Tensor, z_gate_up: torch.Tensor,
                     q_down: torch.Tensor, s_down: torch.Tensor, z_down: torch.Tensor, *,
                     bits: int, group_size: int, intermediate_size: int,
                     config: KernelConfig | None = None) -> torch.Tensor:
    """x [N, D], indices/weights [N, K], packed stacks (module docstring) -> out [N, D] in x's dtype."""
    if bits not in FUSED_BITS:
        raise ValueError(f"fused quantized MoE: unsupported bit width {bits}; supported: "
                         f"{', '.join(map(str, FUSED_BITS))}")
    N, K = indices.shape
    D, I = x.shape[-1], intermediate_size
    E = q_gate_up.shape[0]
    G_d, G_i = -(-D // group_size), -(-I // group_size)
    per_byte = 8 // bits
    expected = {"q_gate_up": (E, 2 * I, None), "s_gate_up": (E, 2 * I, G_d), "z_gate_up": (E, 2 * I, G_d),
                "q_down": (E, D, None), "s_down": (E, D, G_i), "z_down": (E, D, G_i)}
    given = {"q_gate_up": q_gate_up, "s_gate_up": s_gate_up, "z_gate_up": z_gate_up,
             "q_down": q_down, "s_down": s_down, "z_down": z_down}
    for name, t in given.items():
        rows_cols = expected[name]
        if t.dim() != 3 or t.shape[:2] != rows_cols[:2] or (rows_cols[2] is not None and t.shape[2] != rows_cols[2]):
            raise ValueError(f"fused quantized MoE: {name} has shape {tuple(t.shape)}, expected "
                             f"{tuple(d if d is not None else 'P' for d in rows_cols)} (D={D}, I={I}, "
                             f"group_size={group_size})")
    if q_gate_up.shape[2] * per_byte < D or q_down.shape[2] * per_byte < I:
        raise ValueError(f"fused quantized MoE: packed rows too short for {bits}-bit codes of D={D}, I={I}")
    if s_gate_up.stride() != z_gate_up.stride() or s_down.stride() != z_down.stride():
        s_gate_up, z_gate_up = s_gate_up.contiguous(), z_gate_up.contiguous()
        s_down, z_down = s_down.contiguous(), z_down.contiguous()
    x = x.contiguous()
    out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    if N == 0:
        return out.to(x.dtype)
    cfg = config or fit_to_groups(get_config(E=E, N=I, K=D, tokens=N, device=x.device), group_size)
    S = N * K
    # 1.
    aligned = align_for_kernel(indices.reshape(-1), E, cfg.block_m)
    blocks = aligned.block_expert.numel()
    route_w = weights.reshape(-1).float().contiguous()
    h = torch.empty(S, I, dtype=x.dtype, device=x.device)  # [S, I]
    # As in fused_moe.py: the CPU interpreter's bf16 tl.dot is wrong, widen there; fp32 is the exact path.
    dot_f32 = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "DOT_F32": dot_f32,
              "PRECISION": precision, "BITS": bits, "GROUP_SIZE": group_size}
    # 2.
    _gate_up_quant_kernel[(blocks, triton.cdiv(I, cfg.block_n_gate_up))](
        x, q_gate_up, s_gate_up, z_gate_up, h, aligned.slots, aligned.block_expert, S, D, I, K,
        x.stride(0), x.stride(1), *q_gate_up.stride(), *s_gate_up.stride(), h.stride(0), h.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_gate_up, BLOCK_K=cfg.block_k_gate_up, **launch)
    # 3.
    _down_quant_kernel[(blocks, triton.cdiv(D, cfg.block_n_down))](
        h, q_down, s_down, z_down, out, aligned.slots, aligned.block_expert, route_w, S, D, I, K,
        h.stride(0), h.stride(1), *q_down.stride(), *s_down.stride(), out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_down, BLOCK_K=cfg.block_k_down, **launch)
    return out.to(x.dtype)


def fused_moe_quantized(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                        experts: PackedExperts, *, config: KernelConfig | None = None) -> torch.Tensor:
    """x [N, D], indices/weights [N, K] over a QuantizedExperts of one width in {2, 4, 8} -> out [N, D].

    Equals QuantizedExperts' eager forward up to accumulation order; raises ValueError for layers the
    kernel does not cover (mixed widths, 3-bit), which run the eager path instead.
    """
    why = quantized_unsupported(experts)
    if why is not None:
        raise ValueError(f"fused quantized MoE cannot run this layer: {why}")
    b = experts.bits[0]
    if x.shape[-1] != experts.hidden_size:
        raise ValueError(f"fused quantized MoE: x has {x.shape[-1]} columns, experts expect D={experts.hidden_size}")
    stacks = [getattr(experts, f"{kind}{b}_{m}") for m in ("gate_up", "down") for kind in ("q", "s", "z")]
    return fused_moe_packed(x, indices, weights, *stacks, bits=b, group_size=experts.group_size,
                            intermediate_size=experts.intermediate_size, config=config)
