"""The planner's quality model: what each layer's expert precision costs in bits per byte, measured.

Shapes: T calibration tokens, D hidden, L MoE layers, P precisions.

As MC-MoE (Huang et al., 2024) measures each expert's quantization loss as the error of its output
on calibration inputs, this measures each MoE layer's loss at each precision and maps it to bits per
byte with a fit on the model itself:
1. one forward over the calibration tokens captures every MoE layer's input x [T, D];
2. per layer and precision: quantize the layer's experts with the preset (as `compress_` would),
   run both on x with the layer's own routing, and record the relative output error
   err[l, p] = ||y_p - y||^2 / ||y||^2;
3. measure bits per byte of the model at the checkpoint precision and with every layer at each
   quantized precision (`moeinfer.evaluate` on the calibration text), then fit one slope
   bpb(plan) - bpb(float) = alpha * sum_l err[l, p_l] (least squares through the origin over the
   uniform precisions; alpha >= 0);
4. a plan's predicted quality loss is alpha * sum_l err[l, p_l] / bpb(float) (0.01 = 1% more bits
   per byte); `fit` records the measured points, so the fit's residuals are visible.
Errors add over layers in this model; the benchmark (benchmarks/bench_planner.py) checks the
prediction against `moeinfer eval` for each chosen plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moeinfer.planning.spec import FLOAT
from moeinfer.compress.methods.quantize import resolve_algorithm
from moeinfer.compress.methods.quantize_layers import layer_quantizer
from moeinfer.eval import evaluate
from moeinfer.eval.perplexity import as_eval_text
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.fsutil import atomic_write_text
from moeinfer.models import resolve_model_path
from moeinfer.planning.profile import cache_dir


@dataclass(frozen=True)
class QualityModel:
    base_bpb: float
    alpha: float  # bits per byte per unit of summed relative output error
    errors: dict[str, list[float]]  # precision -> err per MoE layer (FLOAT: zeros)
    fit: dict[str, float] = field(default_factory=dict)  # precision -> measured bpb with every layer at it
    source: str = ""

    def delta_bpb(self, precisions: Sequence[str]) -> float:
        return self.alpha * sum(self.errors[p][l] for l, p in enumerate(precisions))

    def loss(self, precisions: Sequence[str]) -> float:
        """Predicted relative increase in bits per byte (step 4)."""
        return self.delta_bpb(precisions) / self.base_bpb

    def layer_cost(self, layer: int, precision: str) -> float:
        """The relative loss one layer adds at `precision` (losses add over layers)."""
        return self.alpha * self.errors[precision][layer] / self.base_bpb

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualityModel:
        return cls(**d)


@torch.inference_mode()
def layer_errors(model: Any, ids: torch.Tensor, precisions: Sequence[str], *,
                 keep: dict[str, list[Any]] | None = None) -> dict[str, list[float]]:
    """Steps 1-2: err[l, p] for each quantized precision; ids [R, T] token rows. `keep`, when given,
    receives each precision's quantized experts per layer (reused for the uniform evaluations)."""
    blocks = model.moe_blocks()
    inputs: dict[int, torch.Tensor] = {}

    def capture(i: int) -> Any:
        def hook(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            inputs[i] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    hooks = [b.register_forward_pre_hook(capture(i)) for i, b in enumerate(blocks)]
    try:
        model(ids.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, list[float]] = {FLOAT: [0.0] * len(blocks)}
    for p in precisions:
        if p == FLOAT:
            continue
        q = layer_quantizer(p)
        assert q is not None
        errs, mods = [], []
        for i, b in enumerate(blocks):
            x = inputs[i]
            routing = b.gate(x)
            ex = b.experts
            y = ex(x, routing).float()
            qex = QuantizedExperts.from_float(ex.gate_up_proj.data, ex.down_proj.data, [q.bits] * ex.num_experts,
                                              group_size=q.group_size, algorithm=resolve_algorithm(model, q.algorithm))
            yq = qex(x, routing).float()
            errs.append(float((yq - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)))
            mods.append(qex)
        out[p] = errs
        if keep is not None:
            keep[p] = mods
    return out


def fit_alpha(base_bpb: float, measured: dict[str, float], errors: dict[str, list[float]]) -> float:
    """Step 3: least squares through the origin of (bpb_p - base) against sum_l err[l, p]; >= 0."""
    num = den = 0.0
    for p, bpb in measured.items():
        e = sum(errors[p])
        num += (bpb - base_bpb) * e
        den += e * e
    return max(0.0, num / den) if den > 0 else 0.0


def measure_quality(model: Any, text: Any, precisions: Sequence[str], *, max_bytes: int = 16384,
                    tokens: int = 512, progress: bool = False) -> QualityModel:
    """Steps 1-4 on `text` (a dataset name, file or EvalText); `model` is not changed."""
    if model.tokenizer is None:
        raise ValueError("measuring quality needs the model's tokenizer (tokenizer.json)")
    data = as_eval_text(text)
    ids = model.tokenizer.encode(data.text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore"))
    width = min(model.config.max_position_embeddings, 256)
    rows = max(1, min(len(ids), tokens) // width)
    batch = torch.tensor([ids[r * width:(r + 1) * width] for r in range(rows)], dtype=torch.long)
    quantized: dict[str, list[Any]] = {}
    errors = layer_errors(model, batch, precisions, keep=quantized)
    base = evaluate(model, data, max_bytes=max_bytes, progress=progress).bits_per_byte
    measured: dict[str, float] = {}
    blocks = model.moe_blocks()
    originals = [b.experts for b in blocks]
    try:
        for p, mods in quantized.items():  # every layer at p: the experts quantized in step 2
            for b, mod in zip(blocks, mods):
                b.experts = mod
            measured[p] = evaluate(model, data, max_bytes=max_bytes, progress=progress).bits_per_byte
    finally:
        for b, ex in zip(blocks, originals):
            b.experts = ex
    alpha = fit_alpha(base, measured, errors)
    return QualityModel(base_bpb=base, alpha=alpha, errors=errors, fit=measured,
                        source=f"{data.name} (first {max_bytes} bytes)")


def cached_quality(path: Any, model: Any, text: Any, precisions: Sequence[str], *, max_bytes: int = 16384,
                   progress: bool = False) -> QualityModel:
    """`measure_quality`, cached in the user cache folder by checkpoint files (names, sizes, times),
    calibration text and precisions, so planning the same model again measures nothing."""
    import hashlib
    import json

    root = resolve_model_path(path).resolve()
    data = as_eval_text(text)
    h = hashlib.sha256()
    for f in sorted(root.glob("*.safetensors")) + [root / "config.json"]:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    digest = hashlib.sha256(data.text.encode()).hexdigest()
    h.update(f"{data.name}:{digest}:{max_bytes}:{sorted(precisions)}:v1".encode())
    file = cache_dir() / "quality" / f"{h.hexdigest()[:24]}.json"
    if file.is_file():
        try:
            return QualityModel.from_dict(json.loads(file.read_text()))
        except (json.JSONDecodeError, TypeError):
            pass  # measured again
    q = measure_quality(model, data, precisions, max_bytes=max_bytes, progress=progress)
    atomic_write_text(file, json.dumps(q.to_dict(), indent=1) + "\n")
    return q


def stand_in_quality(layers: int, source: QualityModel, *, name: str = "another model") -> QualityModel:
    """A quality model for a model that cannot be measured (bigger than memory, or random weights whose
    own loss means nothing), from `source`, another model's measured QualityModel: each precision
    costs the loss measured for it on that model (bits per byte with every layer at it), spread evenly
    over `layers`, so a uniform plan's predicted loss is the source's and `max_quality_loss` acts as on
    it. Only as good as the source is like the model (a smaller model of the same family, say); `name`
    names the source in the model's `source`."""
    loss = {p: max(0.0, (bpb - source.base_bpb) / source.base_bpb) for p, bpb in source.fit.items()}
    errors = {FLOAT: [0.0] * layers, **{p: [v / layers] * layers for p, v in loss.items()}}
    return QualityModel(base_bpb=1.0, alpha=1.0, errors=errors, fit={p: 1.0 + v for p, v in loss.items()},
                        source=f"stand-in: {name}'s measured loss per precision ({source.source})")
