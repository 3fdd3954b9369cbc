"""Calibration data for compression: what each MoE layer sees on representative input.

Sources (CalibrationConfig.source):
  "heldout"            the shipped held-out texts, both domains (english + python), half each;
  "english", "python"  one shipped domain (task-specific pruning, TSEP-style);
  a text file/folder   the user's own text;
  a routing trace      a `.npz` from `moeinfer trace` (or the Mixtral converter): expert frequencies
                       and gate weights only, so it serves methods that need "routing", not "activations".

Shapes: N calibration tokens, D hidden, E experts, K top-k.

Steps:
1. tokenize the text and cut it into windows of `seq_len` tokens, taking the *end* of each shipped
   held-out text (the compression benchmark evaluates the beginning, so the two never overlap);
2. run the model once over the windows, recording the input x [N, D] of every MoE block;
3. routing is recomputed from x on demand with the block's current router, so a step that changes a
   router (pruning, merging) is seen by the steps after it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeinfer.compress.registry import CompressionError
from moeinfer.eval.datasets import load_dataset
from moeinfer.model.moe import MoEBlock, Routing, route
from moeinfer.model.transformer import MoEModel
from moeinfer.traces.trace import RoutingTrace

SHIPPED = ("english", "python")


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "heldout"
    max_tokens: int = 4096
    seq_len: int = 256

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.seq_len < 2:
            raise CompressionError(f"calibration needs max_tokens >= 1 and seq_len >= 2, got "
                                   f"{self.max_tokens} and {self.seq_len}")

    @property
    def is_trace(self) -> bool:
        return str(self.source).endswith(".npz")


@dataclass
class LayerCalibration:
    """One MoE layer's calibration: inputs x [N, D] (None from a trace) and the trace's routing."""

    layer: int
    x: torch.Tensor | None
    trace_indices: torch.Tensor | None = None  # [N, K] (trace only)
    trace_weights: torch.Tensor | None = None  # [N, K]

    def routing(self, block: MoEBlock) -> Routing:
        """The routing of the calibration tokens under `block`'s current router."""
        if self.x is None:
            return Routing(indices=self.trace_indices, weights=self.trace_weights,
                           logits=torch.empty(0, block.experts.num_experts))
        g = block.gate
        r = route(self.x, g.weight, g.cfg, g.e_score_correction_bias)
        if getattr(g, "expert_map", None) is not None:  # merged experts: router rows -> experts rows
            r.indices = g.expert_map[r.indices]
        return r

    def frequency(self, block: MoEBlock) -> torch.Tensor:
        """Tokens routed to each expert, f [E] float (a token counts once per chosen expert)."""
        r = self.routing(block)
        idx = r.indices[r.indices >= 0]
        return torch.bincount(idx, minlength=block.experts.num_experts).float()

    def gate_mass(self, block: MoEBlock) -> torch.Tensor:
        """Sum of the gate weights each expert received, g [E] float."""
        r = self.routing(block)
        ok = r.indices >= 0
        return torch.zeros(block.experts.num_experts).index_add_(0, r.indices[ok], r.weights[ok].float())


@dataclass
class CalibrationData:
    source: str
    tokens: int
    layers: dict[int, LayerCalibration] = field(default_factory=dict)

    @property
    def has_activations(self) -> bool:
        return all(lc.x is not None for lc in self.layers.values())

    def layer(self, block: MoEBlock) -> LayerCalibration:
        if block.layer_idx not in self.layers:
            raise CompressionError(f"calibration data has no MoE layer {block.layer_idx}")
        return self.layers[block.layer_idx]

    def check(self, method: str, needs: str) -> None:
        if needs == "activations" and not self.has_activations:
            raise CompressionError(f"method {method!r} needs activations: calibrate on text (held-out texts or "
                                   f"a text file), not on the routing trace {self.source}")


def _texts(source: str) -> list[tuple[str, str, bool]]:
    """(name, text, take_from_end) per text."""
    if source == "heldout":
        return [(n, load_dataset(n).text, True) for n in SHIPPED]
    if source in SHIPPED:
        return [(source, load_dataset(source).text, True)]
    if not Path(source).exists():
        raise CompressionError(f"calibration source {source!r} is neither 'heldout', a shipped domain "
                               f"({', '.join(SHIPPED)}), an existing text file/folder, nor a .npz trace")
    data = load_dataset(source)
    return [(data.name, data.text, False)]


def _windows(model: MoEModel, cfg: CalibrationConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Token windows of `seq_len` tokens, and the shorter tail windows."""
    tok = model.tokenizer
    if tok is None:
        raise CompressionError("calibrating on text needs the model's tokenizer (tokenizer.json); none is loaded")
    texts = _texts(cfg.source)
    seq = min(cfg.seq_len, model.config.max_position_embeddings)
    per_text = max(seq, cfg.max_tokens // len(texts))
    rows: list[torch.Tensor] = []
    for name, text, from_end in texts:
        # Tokenize only as much text as needed (about 8 bytes per token is generous).
        chunk = text[-per_text * 8:] if from_end else text[: per_text * 8]
        ids = torch.tensor(tok.encode(chunk), dtype=torch.long)
        ids = ids[-per_text:] if from_end else ids[:per_text]
        if len(ids) < 2:
            raise CompressionError(f"calibration text {name!r} is too short ({len(ids)} tokens)")
        rows.extend(ids[i:i + seq] for i in range(0, len(ids) - 1, seq))
    full = [r for r in rows if len(r) == seq]
    rest = [r for r in rows if len(r) != seq]
    return full, rest


@torch.no_grad()
def collect(model: MoEModel, cfg: CalibrationConfig | None = None, *, progress: bool = True) -> CalibrationData:
    """Run the model over the calibration text and record every MoE block's input x [N, D]."""
    cfg = cfg or CalibrationConfig()
    blocks = model.moe_blocks()
    if not blocks:
        raise CompressionError("the model has no MoE layers to calibrate")
    if cfg.is_trace:
        return _from_trace(model, cfg)
    full, rest = _windows(model, cfg)
    captured: dict[int, list[torch.Tensor]] = {b.layer_idx: [] for b in blocks}

    def hook(block: MoEBlock, args: tuple[Any, ...]) -> None:
        captured[block.layer_idx].append(args[0].reshape(-1, args[0].shape[-1]).detach())

    handles = [b.register_forward_pre_hook(hook) for b in blocks]
    device = next(model.parameters()).device
    batches = [torch.stack(full[i:i + 4]) for i in range(0, len(full), 4)] + [r[None] for r in rest]
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress or None):
            model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    n = sum(b.numel() for b in batches)
    layers = {i: LayerCalibration(i, torch.cat(xs)) for i, xs in captured.items()}
    return CalibrationData(source=cfg.source, tokens=n, layers=layers)


def _from_trace(model: MoEModel, cfg: CalibrationConfig) -> CalibrationData:
    trace = RoutingTrace.load(cfg.source)
    moe = [b.layer_idx for b in model.moe_blocks()]
    layers = [int(x) for x in trace.layers]
    if layers != moe or trace.num_experts != model.config.num_experts:
        raise CompressionError(f"routing trace {cfg.source} has layers {layers} with {trace.num_experts} experts; "
                               f"the model has MoE layers {moe} with {model.config.num_experts} experts")
    n = min(len(trace.experts), cfg.max_tokens)
    idx = torch.from_numpy(trace.experts[:n].astype("int64"))  # [N, L, K]
    w = torch.from_numpy(trace.weights[:n])
    data = CalibrationData(source=os.fspath(cfg.source), tokens=n)
    for j, layer in enumerate(layers):
        data.layers[layer] = LayerCalibration(layer, None, idx[:, j], w[:, j])
    return data
