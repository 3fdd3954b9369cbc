"""Fused MoE in Triton: grouped GEMMs over all experts in one launch per projection, following the
design of vLLM's fused_moe (block-aligned slots, one program per (block of M slots of one expert,
tile of output columns)) and MegaBlocks' padded grouping.

Shapes: N tokens, D hidden, E local experts, K top-k, I inner size, S = N*K slots, P padded slots,
M/BN/BK block sizes.

Steps (comments below carry the numbers):
1. map global expert ids to local rows (expert_map, -1 = absent) and align the slots to blocks of
   M rows per expert (moeinfer/kernels/align_triton.py: one program for decode-sized slot counts,
   align.py's torch ops otherwise; no host synchronisation either way);
2. gate_up kernel: h[slot] = silu(x[token] @ gate_e^T) * (x[token] @ up_e^T), both halves of
   gate_up [E, 2I, D] accumulated in the same program, so the activation never leaves registers;
3. down kernel: out[token] += w[slot] * (h[slot] @ down_e^T), the routing weight multiplied in and
   the combine done with fp32 atomic adds: no separate combine pass over the slots;
4. shared experts (DeepSeek, Qwen2-MoE) run as one more expert that every token uses, with weight
   1 or the sigmoid gate, accumulating into the same output buffer.
Launch configurations come from tuned JSON data files (moeinfer/kernels/configs.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moeinfer.kernels.align_triton import align_for_kernel
from moeinfer.kernels.configs import KernelConfig, get_config


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, slots_ptr, block_expert_ptr,
                    num_slots, D, I, top_k,
                    stride_xn, stride_xd, stride_we, stride_wn, stride_wd, stride_hs, stride_hi,
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
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(x_rows + offs_k[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        w_gate = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wd, mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (offs_n[None, :] + I) * stride_wn + offs_k[:, None] * stride_wd,
                       mask=w_mask, other=0.0)
        if DOT_F32:
            a, w_gate, w_up = a.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
        acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
    # 2. SiLU(gate) * up in registers.
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(h_ptr + slot[:, None] * stride_hs + offs_n[None, :] * stride_hi, h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, out_ptr, slots_ptr, block_expert_ptr, route_w_ptr,
                 num_slots, D, I, top_k,
                 stride_hs, stride_hi, stride_we, stride_wn, stride_wk, stride_on, stride_od,
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = tl.load(h_rows + offs_k[None, :] * stride_hi, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_F32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    # 3. Routing weight multiplied in, combine by atomic add into the fp32 output.
    route_w = tl.load(route_w_ptr + slot, mask=row_ok, other=0.0)
    acc = acc * route_w[:, None]
    tl.atomic_add(out_ptr + token[:, None] * stride_on + offs_n[None, :] * stride_od, acc,
                  mask=row_ok[:, None] & n_ok[None, :])


def _grouped(x: torch.Tensor, local: torch.Tensor, route_w: torch.Tensor, top_k: int,
             gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor, cfg: KernelConfig) -> None:
    """out [N, D] fp32 += sum over slots of route_w * expert(x); local [S] (E = absent)."""
    E, two_i, D = gate_up.shape
    I = two_i // 2
    S = local.numel()
    # 1.
    aligned = align_for_kernel(local, E, cfg.block_m)
    blocks = aligned.block_expert.numel()
    h = torch.empty(S, I, dtype=x.dtype, device=x.device)  # [S, I]
    # Triton's CPU interpreter (3.9) returns garbage from tl.dot on bf16 tiles: widen them there.
    dot_f32 = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    # fp32 weights get full-precision dots (no TF32): fp32 is the accuracy path, bf16/fp16 the fast one.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, DOT_F32=dot_f32, PRECISION=precision)
    # 2.
    _gate_up_kernel[(blocks, triton.cdiv(I, cfg.block_n_gate_up))](
        x, gate_up, h, aligned.slots, aligned.block_expert, S, D, I, top_k,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        h.stride(0), h.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_gate_up, BLOCK_K=cfg.block_k_gate_up, **launch)
    # 3.
    _down_kernel[(blocks, triton.cdiv(D, cfg.block_n_down))](
        h, down, out, aligned.slots, aligned.block_expert, route_w, S, D, I, top_k,
        h.stride(0), h.stride(1), down.stride(0), down.stride(1), down.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_down, BLOCK_K=cfg.block_k_down, **launch)


def fused_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
              gate_up: torch.Tensor, down: torch.Tensor, *, expert_map: torch.Tensor | None = None,
              shared_gate_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None,
              shared_weight: torch.Tensor | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """x [N, D], indices/weights [N, K], gate_up [E, 2I, D], down [E, D, I] -> out [N, D].

    expert_map [E_global]: local row of each global expert, -1 = absent (its slots add nothing).
    shared_gate_up [2Is, D] / shared_down [D, Is]: a shared expert added to every token, scaled by
    shared_weight [N] when given (Qwen2-MoE's sigmoid gate), else 1.
    """
    N, K = indices.shape
    E, two_i, D = gate_up.shape
    if x.shape != (N, D) or down.shape != (E, D, two_i // 2):
        raise ValueError(f"fused_moe shapes disagree: x {tuple(x.shape)}, indices {tuple(indices.shape)}, "
                         f"gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)}")
    x = x.contiguous()
    out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    if N == 0:
        return out.to(x.dtype)
    cfg = config or get_config(E=E, N=two_i // 2, K=D, tokens=N, device=x.device)
    # 1.
    local = indices.reshape(-1)
    if expert_map is not None:
        local = expert_map.to(local.device)[local]
        local = torch.where(local >= 0, local, E)
    # 2-3.
    _grouped(x, local, weights.reshape(-1).float().contiguous(), K, gate_up, down, out, cfg)
    # 4.
    if shared_gate_up is not None:
        if shared_down is None:
            raise ValueError("shared_gate_up needs shared_down")
        sw = (torch.ones(N, dtype=torch.float32, device=x.device) if shared_weight is None
              else shared_weight.reshape(N).float().contiguous())
        _grouped(x, torch.zeros(N, dtype=torch.long, device=x.device), sw, 1,
                 shared_gate_up[None], shared_down[None], out, cfg)
    return out.to(x.dtype)
