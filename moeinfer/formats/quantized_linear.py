"""QuantizedLinear: an nn.Linear stored as packed group-wise codes (quantize scope "all": attention,
dense and shared-expert MLPs, optionally lm_head). On the CPU it runs on the native quantized GEMM
(codes read in place; int8 activations where the groups allow, at any number of rows; fp32 activations
up to a few rows: moeinfer.kernels.quantized_cpu.quantized_linear_cpu); otherwise the weight is
dequantized on every call (nothing cached) — `eager_forward`, the reference.

Shapes: O out features, C in features, P packed bytes per row, G groups per row.
    qweight [O, P] uint8, scales / zeros [O, G] (model float dtype), bias [O] (when the layer had one)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeinfer.formats.kinds import register_module_kind
from moeinfer.formats.quant.groupwise import check_bits, dequantize, num_groups, quantize
from moeinfer.formats.quant.packing import packed_cols
from moeinfer.kernels.quantized_cpu import linear_row_op, quantized_linear_cpu


@register_module_kind("quantized_linear")
class QuantizedLinear(nn.Module):
    keep_float_dtype = True  # scales, zeros (and bias) stay fp32, as in QuantizedExperts

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, bias: bool,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = check_bits(bits), group_size
        G = num_groups(in_features, group_size)
        self.qweight = nn.Parameter(torch.empty(out_features, packed_cols(in_features, bits), dtype=torch.uint8),
                                    requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, G, dtype=dtype), requires_grad=False)
        self.zeros = nn.Parameter(torch.empty(out_features, G, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, bits: int, group_size: int, algorithm: str) -> QuantizedLinear:
        w = linear.weight
        qt = quantize(w, bits=bits, group_size=group_size, algorithm=algorithm)
        m = cls(w.shape[1], w.shape[0], bits=bits, group_size=group_size, bias=linear.bias is not None)
        m.qweight = nn.Parameter(qt.packed, requires_grad=False)
        m.scales = nn.Parameter(qt.scale.float(), requires_grad=False)
        m.zeros = nn.Parameter(qt.zero.float(), requires_grad=False)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        return m.to(w.device)

    def layout_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None}

    @classmethod
    def empty(cls, config: Any, params: dict[str, Any]) -> QuantizedLinear:
        return cls(int(params["in_features"]), int(params["out_features"]), bits=int(params["bits"]),
                   group_size=int(params["group_size"]), bias=bool(params["bias"]))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [O, C] in `dtype`."""
        return dequantize(self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                          cols=self.in_features, dtype=dtype)

    # "auto": the native row kernels where they apply, else eager; "eager": always the reference
    kernel = "auto"
    cpu_activations: str | None = None  # None = "q8" where the group size is a multiple of 32, else "f32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "auto" and x.device.type == "cpu":
            # one native call does the activation quantization, the GEMM, the bias and the output dtype
            y = quantized_linear_cpu(x, self.qweight, self.scales, self.zeros, bits=self.bits,
                                     group_size=self.group_size, activations=self.cpu_activations, bias=self.bias)
            if y is not None:
                return y
        return self.eager_forward(x)

    def row_op(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The native one-row call for one contiguous row of `dtype`, resolved once (a prepared step of
        moeinfer.engine.cpu_decode; moeinfer.kernels.quantized_cpu.linear_row_op); None where forward
        would not run it."""
        if self.kernel != "auto" or self.qweight.device.type != "cpu":
            return None
        return linear_row_op(self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                             dtype=dtype, activations=self.cpu_activations, bias=self.bias)

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: the whole weight dequantized to x's dtype, then one matmul."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
