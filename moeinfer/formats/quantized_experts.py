"""QuantizedExperts: a layer's routed experts stored as packed group-wise codes, run by dequantizing
only the experts that received tokens (the eager CPU path; nothing is cached between calls).

Shapes: E experts, D hidden, I expert inner size, S token-slots, P packed bytes per row, G groups.

Storage. Every expert has its own bit width (uniform quantization gives them all the same one). The
experts of one width b are stacked in one set of parameters, in expert order:
    q{b}_gate_up [E_b, 2I, P(D)] uint8   s{b}_gate_up, z{b}_gate_up [E_b, 2I, G(D)]  (gate rows first)
    q{b}_down    [E_b, D,  P(I)] uint8   s{b}_down,    z{b}_down    [E_b, D,  G(I)]
and the per-expert widths (recorded in the checkpoint's layout) say which stack and row hold expert
e. Codes are integer parameters (requires_grad=False), so the loader fills them on the meta path and
`model.to(dtype)` leaves them alone; scales and zeros follow the model's float dtype.

Forward (mirrors moeinfer.model.moe's stages; only the expert-compute stage differs):
1. dispatch the token-slots by expert;
2. for each expert with slots: dequantize its two matrices to the input's dtype, then run the same
   SwiGLU as `expert_compute` (so the result equals `expert_compute` on the dequantized weights);
3. combine with the routing weights.
On CUDA with triton, a layer whose experts share one width in {2, 4, 8} runs these steps fused instead
(moeinfer/kernels/fused_moe_quant.py: codes dequantized in registers inside the grouped GEMMs); on
the CPU, experts of widths {4, 8} run the native kernels when they are built
(moeinfer/kernels/quantized_cpu.py: decode reads the packed codes in place; prefill with int8
activations is one native quantized GEMM call per bit width, with fp32 activations it dequantizes one
expert at a time into a reused tile); `eager_forward` is the reference both are tested against.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from moeinfer.formats.kinds import register_experts_kind
from moeinfer.formats.quant.groupwise import QuantizedTensor, check_bits, dequantize, num_groups, quantize
from moeinfer.formats.quant.packing import packed_cols
from moeinfer.config import ModelConfig
from moeinfer.kernels.quantized_cpu import moe_row_op, quantized_moe_cpu, unsupported
from moeinfer.model.mlp import swiglu
from moeinfer.model.moe import Routing, routed_forward

_MATRICES = ("gate_up", "down")


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


@register_experts_kind("quantized")
class QuantizedExperts(nn.Module):
    """Routed experts with per-expert bit widths; see the module docstring for storage and forward."""

    # ExpertStage (moeinfer/model/moe.py): "auto" runs the fused dequantizing Triton kernel on CUDA where
    # it applies, "reference" always the eager path.
    kernels = ("auto", "reference", "cpu", "triton")  # cpu: the native CPU kernels; triton: the fused one
    kernel = "auto"

    # Scales and zero-points stay fp32 whatever the model's dtype (loading and `cast_floating_` keep it):
    # bf16 would round an int8 zero-point by up to half a quantization step.
    keep_float_dtype = True
    # CPU engine: None = the native kernels when available (else eager), "eager", or a native variant
    # (moeinfer.kernels.native.VARIANTS) forced by hand.
    cpu_engine: str | None = None
    # Native decode's activations: None = int8 blocks ("q8") where the group size allows, else "f32"
    # (moeinfer/kernels/quantized_cpu.py, decode_activations); set "f32" for the exact fp32 products.
    cpu_activations: str | None = None

    def __init__(self, bits: Sequence[int], hidden_size: int, intermediate_size: int, group_size: int,
                 *, scale_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.bits = [check_bits(int(b)) for b in bits]
        if not self.bits:
            raise ValueError("QuantizedExperts needs at least one expert")
        self.hidden_size, self.intermediate_size, self.group_size = hidden_size, intermediate_size, group_size
        # expert e lives in row slot[e] of the stack of its width
        self.slot: list[int] = []
        seen: dict[int, int] = {}
        for b in self.bits:
            self.slot.append(seen.get(b, 0))
            seen[b] = seen.get(b, 0) + 1
        D, I = hidden_size, intermediate_size
        for b, n in sorted(seen.items()):
            for m, (rows, cols) in zip(_MATRICES, ((2 * I, D), (D, I))):
                self.register_parameter(f"q{b}_{m}", _param(torch.empty(n, rows, packed_cols(cols, b),
                                                                        dtype=torch.uint8)))
                G = num_groups(cols, group_size)
                self.register_parameter(f"s{b}_{m}", _param(torch.empty(n, rows, G, dtype=scale_dtype)))
                self.register_parameter(f"z{b}_{m}", _param(torch.empty(n, rows, G, dtype=scale_dtype)))

    @property
    def num_experts(self) -> int:
        return len(self.bits)

    # --- layout (saved in config.json; `empty` rebuilds the module on the meta device) ---
    def layout_params(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "group_size": self.group_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size}

    @classmethod
    def empty(cls, num_experts: int, config: ModelConfig, params: dict[str, Any]) -> QuantizedExperts:
        bits = list(params["bits"])
        if len(bits) != num_experts:
            raise ValueError(f"quantized experts: {len(bits)} bit widths for {num_experts} experts")
        return cls(bits, int(params.get("hidden_size", config.hidden_size)),
                   int(params.get("intermediate_size", config.moe_intermediate_size)), int(params["group_size"]))

    # --- building from float weights ---
    @classmethod
    @torch.no_grad()
    def from_float(cls, gate_up: torch.Tensor, down: torch.Tensor, bits: Sequence[int], *, group_size: int,
                   algorithm: str = "rtn") -> QuantizedExperts:
        """gate_up [E, 2I, D], down [E, D, I] float -> quantized experts (expert e at bits[e])."""
        E, two_i, D = gate_up.shape
        if len(bits) != E:
            raise ValueError(f"{len(bits)} bit widths for {E} experts")
        qs = [(quantize(gate_up[e], bits=b, group_size=group_size, algorithm=algorithm),
               quantize(down[e], bits=b, group_size=group_size, algorithm=algorithm)) for e, b in enumerate(bits)]
        return cls.from_quantized(qs, D, two_i // 2, group_size, dtype=gate_up.dtype)

    @classmethod
    def from_quantized(cls, qs: Sequence[tuple[QuantizedTensor, QuantizedTensor]], hidden_size: int,
                       intermediate_size: int, group_size: int, *, dtype: torch.dtype) -> QuantizedExperts:
        """Assemble from per-expert (gate_up, down) QuantizedTensors; scales/zeros stored in fp32 (`dtype`
        is the model's, kept for callers)."""
        dtype = torch.float32
        bits = [gu.bits for gu, _ in qs]
        module = cls(bits, hidden_size, intermediate_size, group_size, scale_dtype=dtype)
        device = qs[0][0].packed.device
        for b in sorted(set(bits)):
            members = [i for i, x in enumerate(bits) if x == b]
            for j, m in enumerate(_MATRICES):
                parts = [qs[i][j] for i in members]
                setattr(module, f"q{b}_{m}", _param(torch.stack([p.packed for p in parts])))
                setattr(module, f"s{b}_{m}", _param(torch.stack([p.scale for p in parts]).to(dtype)))
                setattr(module, f"z{b}_{m}", _param(torch.stack([p.zero for p in parts]).to(dtype)))
        return module.to(device)

    @torch.no_grad()
    def set_experts_(self, matrix: str, start: int, qt: QuantizedTensor) -> None:
        """Write experts start .. start + n - 1 (one width) of `matrix` ("gate_up" or "down") from qt
        [n, rows, ...] into this module's preallocated storage (quantizing a layer a few experts at a time)."""
        n = qt.packed.shape[0]
        b = self.bits[start]
        if matrix not in _MATRICES or any(x != b for x in self.bits[start:start + n]) or qt.bits != b:
            raise ValueError(f"set_experts_: experts {start}..{start + n - 1} of {matrix!r} are not all {qt.bits}-bit")
        row = self.slot[start]
        for prefix, t in (("q", qt.packed), ("s", qt.scale), ("z", qt.zero)):
            getattr(self, f"{prefix}{b}_{matrix}")[row:row + n].copy_(t)

    # --- weights ---
    def _matrix(self, e: int, m: str, dtype: torch.dtype) -> torch.Tensor:
        b, row = self.bits[e], self.slot[e]
        cols = self.hidden_size if m == "gate_up" else self.intermediate_size
        return dequantize(getattr(self, f"q{b}_{m}")[row], getattr(self, f"s{b}_{m}")[row],
                          getattr(self, f"z{b}_{m}")[row], bits=b, group_size=self.group_size, cols=cols,
                          dtype=dtype)

    def expert_weights(self, e: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's dequantized (gate_up [2I, D], down [D, I])."""
        return self._matrix(e, "gate_up", dtype), self._matrix(e, "down", dtype)

    def dequantize_all(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts dequantized: (gate_up [E, 2I, D], down [E, D, I])."""
        pairs = [self.expert_weights(e, dtype) for e in range(self.num_experts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def weight_bits(self) -> float:
        """Stored bits per expert weight, scales and zeros included."""
        n = self.num_experts * 3 * self.hidden_size * self.intermediate_size
        return 8 * sum(p.numel() * p.element_size() for p in self.parameters()) / n

    @property
    def graph_safe(self) -> bool:
        """On CUDA, a layer the fused dequantizing kernel covers reads nothing back to the host (its
        slot alignment has static shapes), so decode can be captured in a CUDA graph."""
        if self.kernel in ("reference", "cpu") or importlib.util.find_spec("triton") is None:
            return False
        # Imported here: fused_moe_quant imports triton, an optional dependency.
        from moeinfer.kernels.fused_moe_quant import quantized_unsupported

        return quantized_unsupported(self) is None

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [N, D] -> weighted sum of the routed experts' outputs [N, D]. Kernel 'auto': on CUDA with
        triton, a layer of one width in {2, 4, 8} runs the fused dequantizing kernel
        (moeinfer/kernels/fused_moe_quant.py), on the CPU widths {4, 8} the native kernels
        (moeinfer/kernels/quantized_cpu.py, `cpu_engine`); 'triton' and 'cpu' run only their own
        (use_kernel_ checks the device can), 'reference' the eager path; what a kernel does not
        cover runs the eager path."""
        fused = self.kernel == "triton" or (self.kernel == "auto" and x.is_cuda
                                            and importlib.util.find_spec("triton") is not None)
        if fused:
            # Imported here: fused_moe imports triton, an optional dependency.
            from moeinfer.kernels.fused_moe_quant import fused_moe_quantized, quantized_unsupported

            if quantized_unsupported(self) is None:
                return fused_moe_quantized(x, routing.indices, routing.weights, self)
        if self.kernel in ("auto", "cpu") and x.device.type == "cpu" and self.cpu_engine != "eager":
            if self.cpu_engine is not None or unsupported(self) is None:
                return quantized_moe_cpu(x, routing.indices, routing.weights, self, engine=self.cpu_engine,
                                         activations=self.cpu_activations)
        return self.eager_forward(x, routing)

    def decode_op(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """Batch-1 CPU decode, (x [1, D], indices [1, K], weights [1, K]) -> [1, D], with everything
        forward looks up per call resolved once (a prepared step of moeinfer.engine.cpu_decode; the same
        native call: moeinfer.kernels.quantized_cpu.moe_row_op); None where forward would not run it."""
        if (self.kernel not in ("auto", "cpu") or self.cpu_engine == "eager"
                or next(self.parameters()).device.type != "cpu"):
            return None
        return moe_row_op(self, engine=self.cpu_engine, activations=self.cpu_activations)

    def eager_forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The reference: steps 1-3 of the module docstring, dequantizing only the routed experts."""
        def expert(e: int, seg: torch.Tensor) -> torch.Tensor:
            # 2. dequantize this routed expert only (1. dispatch and 3. combine: routed_forward)
            gate_up, down = self.expert_weights(e, x.dtype)
            return swiglu(seg, gate_up, down)

        return routed_forward(x, routing, self.num_experts, expert)

    def extra_repr(self) -> str:
        widths = {b: self.bits.count(b) for b in sorted(set(self.bits))}
        return (f"experts={self.num_experts}, bits={widths}, group_size={self.group_size}, "
                f"D={self.hidden_size}, I={self.intermediate_size}")
