"""Fused MoE in Triton: grouped GEMMs over all experts in one launch per projection, following the
design of vLLM's fused_moe (block-aligned slots, one program per (block of M slots of one expert,
tile of output columns); the weight format a compile-time flag, as its int4/int8 variants) and
MegaBlocks' padded grouping. One kernel source serves float experts and packed low-bit experts.

Shapes: N tokens, D hidden, E local experts, K top-k, I inner size, S = N*K slots, P padded slots,
M/BN/BK block sizes; packed: P(C) bytes of a row of C codes, G(C) groups of a row.

Weight formats (`ExpertWeights`; the kernels' BITS):
- BITS = 0, float: gate_up [E, 2I, D], down [E, D, I] in the activation dtype;
- BITS in {2, 4, 8}, packed (moeinfer/formats/quantized_experts.py, quant/packing.py): code c of a
  row sits in byte c // (8 / b) at bit (c % (8 / b)) * b; group-wise asymmetric dequant
  w = q * s + (-z * s) with one fp32 scale s and zero z per `group_size` columns (the last group
  may be shorter): codes [E, 2I, P(D)] / [E, D, P(I)] uint8, scales and zeros [E, 2I, G(D)] /
  [E, D, G(I)]. Each weight tile is dequantized in registers just before `tl.dot` (the unpacking of
  vLLM's `fused_moe_kernel_gptq_awq`), so float weights never exist in memory.

Steps (comments below carry the numbers):
1. map global expert ids to local rows (expert_map, -1 = absent) and align the slots to blocks of
   M rows per expert (moeinfer/kernels/align_triton.py: one program for decode-sized slot counts,
   align.py's torch ops otherwise; no host synchronisation either way);
2. gate_up kernel: h[slot] = silu(x[token] @ gate_e^T) * (x[token] @ up_e^T), both halves of
   gate_up accumulated in the same program, so the activation never leaves registers;
3. down kernel: out[token] += w[slot] * (h[slot] @ down_e^T), the routing weight multiplied in and
   the combine done with fp32 atomic adds: no separate combine pass over the slots;
4. shared experts (DeepSeek, Qwen2-MoE) run as one more expert that every token uses, with weight
   1 or the sigmoid gate, accumulating into the same output buffer.
Launch configurations come from tuned JSON data files (moeinfer/kernels/configs.py); packed weights
fit the K-tiles inside one quantization group (`fit_to_groups`: one scale and zero per row per tile).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from moeinfer.kernels.align_triton import align_for_kernel
from moeinfer.kernels.configs import KernelConfig, get_config

PACKED_BITS = (2, 4, 8)


@triton.jit
def _weight_tile(w_base, s_base, z_base, k0, offs_k, offs_n, k_ok, n_ok,
                 stride_wn, stride_wk, stride_sn, stride_sg, DTYPE: tl.constexpr,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weights of input columns offs_k [BK] of rows offs_n [BN] -> [BK, BN] in DTYPE (0 where masked)."""
    mask = k_ok[:, None] & n_ok[None, :]
    if BITS == 0:
        w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=mask, other=0.0)
    else:
        per_byte = 8 // BITS  # constexpr: codes per byte
        byte = tl.load(w_base + offs_n[None, :] * stride_wn + (offs_k[:, None] // per_byte) * stride_wk,
                       mask=mask, other=0).to(tl.int32)
        code = (byte >> ((offs_k[:, None] % per_byte) * BITS)) & ((1 << BITS) - 1)
        if GROUP_SIZE % BLOCK_K == 0:
            # The tile lies inside one group: one scale and zero per row [BN], not per element.
            group = k0 // GROUP_SIZE
            s = tl.load(s_base + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0)
            z = tl.load(z_base + offs_n * stride_sn + group * stride_sg, mask=n_ok, other=0.0)
            deq = code.to(tl.float32) * s[None, :] + (-z * s)[None, :]
        else:
            group = offs_k[:, None] // GROUP_SIZE
            s = tl.load(s_base + offs_n[None, :] * stride_sn + group * stride_sg, mask=mask, other=0.0)
            z = tl.load(z_base + offs_n[None, :] * stride_sn + group * stride_sg, mask=mask, other=0.0)
            deq = code.to(tl.float32) * s + (-z * s)
        # rounded to the activation dtype, as the eager dequantizing path does
        w = tl.where(mask, deq, 0.0).to(DTYPE)
    return w


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, z_ptr, h_ptr, slots_ptr, block_expert_ptr,
                    num_slots, D, I, top_k,
                    stride_xn, stride_xd, stride_we, stride_wn, stride_wk,
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
    w_base = w_ptr + e * stride_we
    s_base = s_ptr + e * stride_se
    z_base = z_ptr + e * stride_se
    dtype = x_ptr.dtype.element_ty
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(x_rows + offs_k[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_gate = _weight_tile(w_base, s_base, z_base, k0, offs_k, offs_n, k_ok, n_ok, stride_wn, stride_wk,
                              stride_sn, stride_sg, dtype, BITS, GROUP_SIZE, BLOCK_K)
        w_up = _weight_tile(w_base, s_base, z_base, k0, offs_k, offs_n + I, k_ok, n_ok, stride_wn, stride_wk,
                            stride_sn, stride_sg, dtype, BITS, GROUP_SIZE, BLOCK_K)
        if DOT_F32:
            a, w_gate, w_up = a.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
        acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
    # 2. SiLU(gate) * up in registers.
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(h_ptr + slot[:, None] * stride_hs + offs_n[None, :] * stride_hi, h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, z_ptr, out_ptr, slots_ptr, block_expert_ptr, route_w_ptr,
                 num_slots, D, I, top_k,
                 stride_hs, stride_hi, stride_we, stride_wn, stride_wk,
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
    w_base = w_ptr + e * stride_we
    s_base = s_ptr + e * stride_se
    z_base = z_ptr + e * stride_se
    dtype = h_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = tl.load(h_rows + offs_k[None, :] * stride_hi, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(w_base, s_base, z_base, k0, offs_k, offs_n, k_ok, n_ok, stride_wn, stride_wk,
                         stride_sn, stride_sg, dtype, BITS, GROUP_SIZE, BLOCK_K)
        if DOT_F32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    # 3. Routing weight multiplied in, combine by atomic add into the fp32 output.
    route_w = tl.load(route_w_ptr + slot, mask=row_ok, other=0.0)
    acc = acc * route_w[:, None]
    tl.atomic_add(out_ptr + token[:, None] * stride_on + offs_n[None, :] * stride_od, acc,
                  mask=row_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class ExpertWeights:
    """One layer's experts as the kernels read them (module docstring): bits 0 = float weights,
    else packed codes with fp32 scales and zeros of `group_size` columns."""

    gate_up: torch.Tensor  # [E, 2I, D] float, or [E, 2I, P(D)] uint8
    down: torch.Tensor  # [E, D, I] float, or [E, D, P(I)] uint8
    intermediate_size: int  # I
    bits: int = 0
    group_size: int = 0
    s_gate_up: torch.Tensor | None = None  # [E, 2I, G(D)]
    z_gate_up: torch.Tensor | None = None
    s_down: torch.Tensor | None = None  # [E, D, G(I)]
    z_down: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]


def fit_to_groups(cfg: KernelConfig, group_size: int) -> KernelConfig:
    """The launch config with K-tiles that lie inside one quantization group (then each tile reads one
    scale and zero per row, not per element), else K-tiles of 16 (the per-element path's gathers of
    scales stay small enough for the multiprocessor's shared memory)."""
    pow2 = group_size & -group_size  # the largest power of two dividing group_size

    def fit(bk: int) -> int:
        return bk if group_size % bk == 0 else (min(bk, pow2) if pow2 >= 16 else 16)

    return replace(cfg, block_k_gate_up=fit(cfg.block_k_gate_up), block_k_down=fit(cfg.block_k_down))


def _grouped(x: torch.Tensor, local: torch.Tensor, route_w: torch.Tensor, top_k: int, ew: ExpertWeights,
             out: torch.Tensor, cfg: KernelConfig) -> None:
    """out [N, D] fp32 += sum over slots of route_w * expert(x); local [S] (E = absent)."""
    E, D, I = ew.num_experts, x.shape[1], ew.intermediate_size
    S = local.numel()
    # 1.
    aligned = align_for_kernel(local, E, cfg.block_m)
    blocks = aligned.block_expert.numel()
    h = torch.empty(S, I, dtype=x.dtype, device=x.device)  # [S, I]
    # Triton's CPU interpreter (3.9) returns garbage from tl.dot on bf16 tiles: widen them there.
    dot_f32 = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    # fp32 weights get full-precision dots (no TF32): fp32 is the accuracy path, bf16/fp16 the fast one.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, DOT_F32=dot_f32, PRECISION=precision,
                  BITS=ew.bits, GROUP_SIZE=max(ew.group_size, 1))

    def scales(s: torch.Tensor | None, z: torch.Tensor | None, w: torch.Tensor) -> tuple:
        if ew.bits == 0:  # unused by the float kernel: any pointer and strides will do
            return (w, w, 0, 0, 0)
        assert s is not None and z is not None
        return (s, z, *s.stride())

    s_gu, z_gu, *st_gu = scales(ew.s_gate_up, ew.z_gate_up, ew.gate_up)
    s_dn, z_dn, *st_dn = scales(ew.s_down, ew.z_down, ew.down)
    # 2.
    _gate_up_kernel[(blocks, triton.cdiv(I, cfg.block_n_gate_up))](
        x, ew.gate_up, s_gu, z_gu, h, aligned.slots, aligned.block_expert, S, D, I, top_k,
        x.stride(0), x.stride(1), *ew.gate_up.stride(), *st_gu, h.stride(0), h.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_gate_up, BLOCK_K=cfg.block_k_gate_up, **launch)
    # 3.
    _down_kernel[(blocks, triton.cdiv(D, cfg.block_n_down))](
        h, ew.down, s_dn, z_dn, out, aligned.slots, aligned.block_expert, route_w, S, D, I, top_k,
        h.stride(0), h.stride(1), *ew.down.stride(), *st_dn, out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_down, BLOCK_K=cfg.block_k_down, **launch)


def moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights, *,
        expert_map: torch.Tensor | None = None, shared: ExpertWeights | None = None,
        shared_weight: torch.Tensor | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """x [N, D], indices/weights [N, K] over `experts` (float or packed) -> out [N, D] in x's dtype.

    expert_map [E_global]: local row of each global expert, -1 = absent (its slots add nothing).
    shared: one expert (E = 1) added to every token, scaled by shared_weight [N] when given (Qwen2-MoE's
    sigmoid gate), else 1; it may be float or packed whatever the routed experts are.
    """
    N, K = indices.shape
    x = x.contiguous()
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    if N == 0:
        return out.to(x.dtype)

    def launch_config(ew: ExpertWeights) -> KernelConfig:
        cfg = config or get_config(E=ew.num_experts, N=ew.intermediate_size, K=x.shape[1], tokens=N, device=x.device)
        return fit_to_groups(cfg, ew.group_size) if ew.bits and config is None else cfg

    # 1.
    local = indices.reshape(-1)
    if expert_map is not None:
        local = expert_map.to(local.device)[local]
        local = torch.where(local >= 0, local, experts.num_experts)
    # 2-3.
    _grouped(x, local, weights.reshape(-1).float().contiguous(), K, experts, out, launch_config(experts))
    # 4.
    if shared is not None:
        sw = (torch.ones(N, dtype=torch.float32, device=x.device) if shared_weight is None
              else shared_weight.reshape(N).float().contiguous())
        _grouped(x, torch.zeros(N, dtype=torch.long, device=x.device), sw, 1, shared, out, launch_config(shared))
    return out.to(x.dtype)


def fused_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
              gate_up: torch.Tensor, down: torch.Tensor, *, expert_map: torch.Tensor | None = None,
              shared_gate_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None,
              shared_weight: torch.Tensor | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """Float experts: x [N, D], indices/weights [N, K], gate_up [E, 2I, D], down [E, D, I] -> out [N, D].

    shared_gate_up [2Is, D] / shared_down [D, Is]: a shared expert added to every token (see `moe`).
    """
    N, K = indices.shape
    E, two_i, D = gate_up.shape
    if x.shape != (N, D) or down.shape != (E, D, two_i // 2):
        raise ValueError(f"fused_moe shapes disagree: x {tuple(x.shape)}, indices {tuple(indices.shape)}, "
                         f"gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)}")
    shared = None
    if shared_gate_up is not None:
        if shared_down is None:
            raise ValueError("shared_gate_up needs shared_down")
        shared = ExpertWeights(shared_gate_up[None], shared_down[None], shared_gate_up.shape[0] // 2)
    return moe(x, indices, weights, ExpertWeights(gate_up, down, two_i // 2), expert_map=expert_map, shared=shared,
               shared_weight=shared_weight, config=config)
