"""Per-layer expert precision: each MoE layer quantized with its own uniform preset, or kept in float.

The step a plan (`moeinfer plan`, docs/planner.md) writes when its search gives layers different
precisions, e.g. `{"method": "quantize_layers", "precisions": ["int8", "none", "int4", "int4"]}`.
It follows layer-wise mixed precision as in MC-MoE's per-layer budget view (Huang et al., 2024) but
the widths come from the caller, not from an importance measure.

Steps:
1. resolve every layer's precision: "none" keeps the layer's experts as they are, any other name must
   be a preset made of one experts-only `quantize` step (int8, int4, q8_0, q4_0, int3, int2);
2. per MoE layer (progress bar): quantize its plain experts with that preset's bits, group size and
   algorithm -> QuantizedExperts, exactly as the `quantize` step would for the whole model;
3. summary: the precision and relative weight error of each layer.
`quantize_layers(..., fill=...)` runs the same steps on a model loaded with its experts left in the
checkpoint (meta tensors, `moeinfer.load_planned`): `fill(position, block)` puts each layer's float
experts in place just before step 2 quantizes them, so one layer's float experts are in memory at a time;
`done(position, block)` is called after it (an offloaded plan writes the layer to its expert store there
and frees it, so only one layer of quantized experts is in memory at a time either).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.compress.calibration import CalibrationData
from moeinfer.compress.methods.quantize import QuantizeParams, resolve_algorithm
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.compress.registry import CompressionError, register_method
from moeinfer.compress.surgery import plain_experts
from moeinfer.model.moe import MoEBlock
from moeinfer.model.transformer import MoEModel
from moeinfer.compress.presets import PRESETS

KEEP = "none"


def layer_quantizer(name: str) -> QuantizeParams | None:
    """The QuantizeParams of precision `name` ("none" -> None); a clear error for anything else."""
    if name == KEEP:
        return None

    steps = PRESETS.get(name)
    ok = sorted(k for k, v in PRESETS.items() if len(v) == 1 and v[0]["method"] == "quantize"
                and v[0].get("scope", "experts") == "experts")
    if steps is None or name not in ok:
        raise ValueError(f"layer precision {name!r} is not known; choose 'none' or one of {', '.join(ok)}")
    params = {k: v for k, v in steps[0].items() if k != "method"}
    return QuantizeParams(**params)


@dataclass(frozen=True)
class QuantizeLayersParams:
    precisions: tuple[str, ...] = ()  # one per MoE layer, in order: "none" or a quantize preset name

    def __post_init__(self) -> None:
        if not isinstance(self.precisions, (list, tuple)) or not self.precisions:
            raise ValueError(f"precisions must be a non-empty list (one per MoE layer), got {self.precisions!r}")
        object.__setattr__(self, "precisions", tuple(str(p) for p in self.precisions))
        for p in self.precisions:
            layer_quantizer(p)


@torch.no_grad()
def _layer_error(ex: Any, new: QuantizedExperts) -> float:
    """Mean over (gate_up, down) of the layer's relative error ||w - q(w)||^2 / ||w||^2, summed over the
    experts one expert at a time (dequantizing the whole layer at once, in fp32, had held several
    copies of it: ~17 GB for a 6.3 GB Mixtral-shaped layer pair)."""
    num, den = [0.0, 0.0], [0.0, 0.0]
    w_dtype = ex.gate_up_proj.dtype
    for e in range(ex.num_experts):
        # dequantized in the weights' dtype, as the layer runs them
        for i, (w, q) in enumerate(zip((ex.gate_up_proj[e], ex.down_proj[e]), new.expert_weights(e, w_dtype))):
            w = w.float()
            num[i] += float((w - q.float()).pow(2).sum())
            den[i] += float(w.pow(2).sum())
    return sum(n / max(d, 1e-30) for n, d in zip(num, den)) / 2


def quantize_layer_(block: MoEBlock, q: QuantizeParams, algorithm: str) -> float:
    """Step 2 for one layer: its plain experts -> QuantizedExperts at `q` with `algorithm` (resolved, not
    "auto"), in place; returns the layer's relative weight error."""
    ex = block.experts
    new = QuantizedExperts.from_float(ex.gate_up_proj.data, ex.down_proj.data, [q.bits] * ex.num_experts,
                                      group_size=q.group_size, algorithm=algorithm)
    error = round(_layer_error(ex, new), 8)
    block.experts = new
    return error


@register_method("quantize_layers", params=QuantizeLayersParams, needs="none")
def quantize_layers(model: MoEModel, p: QuantizeLayersParams, calib: CalibrationData | None, *,
                    progress: bool = True, fill: Callable[[int, MoEBlock], None] | None = None,
                    done: Callable[[int, MoEBlock], None] | None = None) -> dict[str, Any]:
    """Quantize each MoE layer's experts with its own preset (steps in the module docstring); `fill`: puts
    layer `position`'s float experts in place first, `done`: called with the layer once it is quantized
    (experts left in the checkpoint; module docstring)."""
    from tqdm.auto import tqdm

    blocks = model.moe_blocks()
    # 1. check everything before changing anything ("auto" counts the experts' weights: meta tensors too)
    if len(p.precisions) != len(blocks):
        raise CompressionError(f"quantize_layers: {len(p.precisions)} precisions for {len(blocks)} MoE layers")
    quantizers = [layer_quantizer(name) for name in p.precisions]
    for block, q in zip(blocks, quantizers):
        if q is not None or fill is not None:
            plain_experts(block, "quantize_layers")
    algorithms = {q.algorithm: resolve_algorithm(model, q.algorithm) for q in quantizers if q is not None}
    # 2. layer by layer
    errors: dict[str, float] = {}
    for pos, (block, q) in enumerate(tqdm(list(zip(blocks, quantizers)), desc="quantize layers", unit="layer",
                                          disable=not progress or None)):
        if fill is not None:
            fill(pos, block)
        if q is not None:
            errors[str(block.layer_idx)] = quantize_layer_(block, q, algorithms[q.algorithm])
        if done is not None:
            done(pos, block)
    # 3. summary
    return {"precisions": list(p.precisions), "expert_rel_error": errors}
