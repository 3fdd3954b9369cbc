"""Routing traces: which experts every real token chose at every MoE layer, recorded opt-in.

Shapes: N recorded tokens, L MoE layers, K top-k, E experts; B batch, T tokens of one forward.

    with record_routing(model) as rec:          # attach observers to every MoEBlock
        generate(model, prompts, max_new_tokens=32)
    trace = rec.trace()                         # RoutingTrace, sorted by (seq, pos)
    trace.save("run.npz"); RoutingTrace.load("run.npz")

A trace is the input of expert-offload simulators and cache policies, in the spirit of the expert
traces of MoE-Infinity (Xue et al., 2024) and Pre-gated MoE (Hwang et al., 2024). The file format
(one compressed .npz, format version 1) is documented in docs/traces.md; statistics over a trace
are in moeinfer.traces.stats, the Mixtral-8x7B converter in moeinfer.traces.convert.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeinfer.fsutil import publishable_
from moeinfer.model.moe import Routing
from moeinfer.model.transformer import MoEModel

FORMAT_NAME = "moeinfer-routing-trace"
FORMAT_VERSION = 1
REQUIRED_ARRAYS = ("experts", "weights", "seq", "pos", "is_prompt", "layers", "meta")
OPTIONAL_ARRAYS = ("logits", "step")
_DERIVED_META = ("format", "version", "num_experts", "top_k")  # written by save() from the arrays


class TraceError(ValueError):
    """A routing trace (file or arrays) is malformed; the message names the file and array at fault."""


@dataclass
class RoutingTrace:
    """Routing of N tokens over L MoE layers, one row per token (arrays use the file's dtypes).

    experts [N, L, K] int16 (-1 marks an unused slot when a layer chose fewer than K experts),
    weights [N, L, K] float32, seq [N] int32 (sequence id, e.g. the prompt's index in generate),
    pos [N] int32 (position in the sequence), is_prompt [N] bool (prompt token vs generated token),
    layers [L] int32 (model layer index of each MoE layer), logits [N, L, E] float16 or None,
    step [N] int32 or None (which forward call routed the token; tokens of one step ran as a batch).
    """

    experts: np.ndarray
    weights: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    is_prompt: np.ndarray
    layers: np.ndarray
    num_experts: int
    logits: np.ndarray | None = None
    step: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.experts = np.asarray(self.experts, dtype=np.int16)
        self.weights = np.asarray(self.weights, dtype=np.float32)
        self.seq = np.asarray(self.seq, dtype=np.int32)
        self.pos = np.asarray(self.pos, dtype=np.int32)
        self.is_prompt = np.asarray(self.is_prompt, dtype=bool)
        self.layers = np.asarray(self.layers, dtype=np.int32)
        if self.logits is not None:
            self.logits = np.asarray(self.logits, dtype=np.float16)
        if self.step is not None:
            self.step = np.asarray(self.step, dtype=np.int32)
        self._check()

    def _check(self) -> None:
        if self.experts.ndim != 3:
            raise TraceError(f"experts must be [tokens, layers, top_k], got shape {self.experts.shape}")
        N, L, K = self.experts.shape
        expect = {"weights": (N, L, K), "seq": (N,), "pos": (N,), "is_prompt": (N,), "layers": (L,)}
        if self.logits is not None:
            expect["logits"] = (N, L, self.num_experts)
        if self.step is not None:
            expect["step"] = (N,)
        for name, shape in expect.items():
            got = getattr(self, name).shape
            if got != shape:
                raise TraceError(f"{name} has shape {got}, expected {shape} "
                                 f"(experts is {self.experts.shape}, num_experts={self.num_experts})")
        if self.num_experts < 1:
            raise TraceError(f"num_experts must be >= 1, got {self.num_experts}")
        if N and (self.experts.min() < -1 or self.experts.max() >= self.num_experts):
            raise TraceError(f"experts holds ids outside -1..{self.num_experts - 1} "
                             f"(min {self.experts.min()}, max {self.experts.max()})")

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the trace as one compressed .npz (docs/traces.md), atomically.

        1. Collect the arrays and the JSON metadata (format name and version first).
        2. Write them to a temp file in the target directory, flush and fsync it.
        3. Rename it over `path`; on any error the temp file is removed and `path` is untouched.
        """
        path = Path(path)
        # 1. Arrays and metadata.
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "num_experts": self.num_experts,
                "top_k": self.top_k, **{k: v for k, v in self.meta.items() if k not in _DERIVED_META}}
        meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        arrays: dict[str, np.ndarray] = {
            "experts": self.experts, "weights": self.weights, "seq": self.seq, "pos": self.pos,
            "is_prompt": self.is_prompt, "layers": self.layers, "meta": np.array(json.dumps(meta))}
        if self.logits is not None:
            arrays["logits"] = self.logits
        if self.step is not None:
            arrays["step"] = self.step
        # 2. Temp file beside the target, so that the rename stays on one filesystem.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            publishable_(tmp)  # mkstemp creates 0600; give the file the usual permissions
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            # 3. Publish.
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.meta = {**self.meta, "created": meta["created"]}
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingTrace:
        """Read a trace written by `save`; errors name the file and the array or field at fault."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"routing trace {path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
            raise TraceError(f"routing trace {path} is not a readable .npz file ({type(e).__name__}: {e})") from e
        missing = [k for k in REQUIRED_ARRAYS if k not in data]
        if missing:
            raise TraceError(f"routing trace {path} lacks array(s) {missing}; format v{FORMAT_VERSION} "
                             f"needs {list(REQUIRED_ARRAYS)}")
        try:
            meta = json.loads(str(data["meta"]))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise TraceError(f"routing trace {path}: array 'meta' is not a JSON object ({e})") from e
        if meta.get("format") != FORMAT_NAME:
            raise TraceError(f"routing trace {path}: meta.format is {meta.get('format')!r}, "
                             f"expected {FORMAT_NAME!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise TraceError(f"routing trace {path}: format version {meta.get('version')!r}, "
                             f"this moeinfer reads version {FORMAT_VERSION}")
        if not isinstance(meta.get("num_experts"), int):
            raise TraceError(f"routing trace {path}: meta.num_experts must be an integer, "
                             f"got {meta.get('num_experts')!r}")
        try:
            return cls(experts=data["experts"], weights=data["weights"], seq=data["seq"], pos=data["pos"],
                       is_prompt=data["is_prompt"], layers=data["layers"], num_experts=meta["num_experts"],
                       logits=data.get("logits"), step=data.get("step"),
                       meta={k: v for k, v in meta.items() if k not in _DERIVED_META})
        except TraceError as e:
            raise TraceError(f"routing trace {path}: {e}") from e


@dataclass
class _Step:
    """Routing of one forward call, kept on the model's device until the call is complete."""

    rows: torch.Tensor  # [n] flat index (b*T + t) of each real token
    num_tokens: int  # B*T, real and padding
    seq: torch.Tensor  # [n]
    pos: torch.Tensor  # [n]
    is_prompt: bool
    experts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, K]
    weights: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, K]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, E]


class RoutingRecorder:
    """Records the routing of the real tokens of every forward of `model`.

    Follows the observer design of the MoE block: nothing is recorded unless attached.
    1. attach(): install a token observer on the model (valid mask and positions of each forward)
       and a routing observer on every MoEBlock, chaining any observer already there.
    2. Per forward: the token observer opens a step and numbers its rows; a forward that starts
       new sequences (no cache or an empty one) gets fresh sequence ids and marks its tokens as
       prompt tokens, a forward over a filled cache continues the previous rows and marks them as
       generated. Padding and the rows generate() has finished are masked out by the model's mask.
    3. Per MoE layer: keep experts, weights (and logits) of the step's real tokens, on device.
    4. After the forward's last MoE layer the step is moved to the CPU as numpy arrays (a step
       left incomplete by an exception is dropped at the next forward).
    5. trace(): concatenate the steps and sort the tokens by (seq, pos, step).

    generate() feeds the last sampled token of a row to the model only if the row goes on, so a
    row's final token has no routing: a row records len(prompt) + len(generated) - 1 tokens.
    """

    def __init__(self, model: MoEModel, *, logits: bool = True, meta: dict[str, Any] | None = None) -> None:
        blocks = model.moe_blocks()
        if not blocks:
            raise ValueError("the model has no MoE layers: nothing to trace")
        self.model = model
        self.record_logits = logits
        self.meta = dict(meta or {})
        self._blocks = blocks
        self._layers = [b.layer_idx for b in blocks]
        self._num_experts = blocks[0].experts.num_experts
        self._saved: tuple[Any, Any] | None = None  # the ObserverHandles while attached
        self._step: _Step | None = None
        self._rows: torch.Tensor | None = None  # [B] sequence id of each batch row
        self._next_seq = 0
        self._num_steps = 0
        self._chunks: list[dict[str, np.ndarray]] = []

    # 1. Attach / detach.
    def attach(self) -> RoutingRecorder:
        if self._saved is not None:
            raise RuntimeError("this RoutingRecorder is already attached")
        self._saved = (self.model.add_token_observer(self._on_tokens),
                       self.model.add_routing_observer(self._on_routing))
        return self

    def detach(self) -> None:
        if self._saved is None:
            return
        self._flush()
        for handle in self._saved:
            handle.remove()
        self._saved = None

    # 2. One step per forward.
    def _on_tokens(self, valid: torch.Tensor, positions: torch.Tensor, new_sequences: bool) -> None:
        self._flush()
        B = valid.shape[0]
        if new_sequences or self._rows is None or self._rows.numel() != B:
            self._rows = torch.arange(self._next_seq, self._next_seq + B, device=valid.device)
            self._next_seq += B
        flat = valid.reshape(-1).nonzero().squeeze(1)  # [n]
        T = valid.shape[1]
        self._step = _Step(rows=flat, num_tokens=valid.numel(), seq=self._rows[flat // T],
                           pos=positions.reshape(-1)[flat], is_prompt=new_sequences)

    # 3. One call per MoE layer.
    def _on_routing(self, layer_idx: int, routing: Routing) -> None:
        step = self._step
        if step is None:
            raise RuntimeError(f"MoE layer {layer_idx} routed tokens outside MoEModel.forward; the routing "
                               "recorder needs the model's token mask to tell real tokens from padding")
        if routing.indices.shape[0] != step.num_tokens:
            raise RuntimeError(f"MoE layer {layer_idx} routed {routing.indices.shape[0]} tokens, but the "
                               f"forward has {step.num_tokens} (batch x tokens)")
        step.experts[layer_idx] = routing.indices.detach()[step.rows]
        step.weights[layer_idx] = routing.weights.detach().float()[step.rows]
        if self.record_logits:
            step.logits[layer_idx] = routing.logits.detach()[step.rows].half()
        if len(step.experts) == len(self._layers):
            self._flush()  # the forward's last MoE layer: the step is complete

    # 4. Move a finished step to the CPU.
    def _flush(self) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        if len(step.experts) != len(self._layers):
            # The forward stopped early (an exception): its routing is incomplete, drop it.
            return
        K = max(step.experts[i].shape[1] for i in self._layers)

        def stack(d: dict[int, torch.Tensor], fill: float) -> np.ndarray:
            parts = [torch.nn.functional.pad(d[i], (0, K - d[i].shape[1]), value=fill) for i in self._layers]
            return torch.stack(parts, dim=1).cpu().numpy()  # [n, L, K]

        chunk = {"experts": stack(step.experts, -1).astype(np.int16),
                 "weights": stack(step.weights, 0.0).astype(np.float32),
                 "seq": step.seq.cpu().numpy().astype(np.int32),
                 "pos": step.pos.cpu().numpy().astype(np.int32),
                 "is_prompt": np.full(step.rows.numel(), step.is_prompt),
                 "step": np.full(step.rows.numel(), self._num_steps, dtype=np.int32)}
        if self.record_logits:
            chunk["logits"] = torch.stack([step.logits[i] for i in self._layers], dim=1).cpu().numpy()
        self._chunks.append(chunk)
        self._num_steps += 1

    # 5. Assemble.
    def trace(self) -> RoutingTrace:
        """Everything recorded so far, sorted by (seq, pos, step)."""
        self._flush()
        L, E = len(self._layers), self._num_experts
        chunks = self._chunks
        K = max((c["experts"].shape[2] for c in chunks), default=self.model.config.top_k)

        def cat(name: str, empty_shape: tuple[int, ...], dtype: Any, pad_k: float | None = None) -> np.ndarray:
            if not chunks:
                return np.zeros((0, *empty_shape), dtype=dtype)
            parts = [c[name] for c in chunks]
            if pad_k is not None:  # K can differ between steps under dynamic gating
                parts = [np.pad(a, ((0, 0), (0, 0), (0, K - a.shape[2])), constant_values=pad_k) for a in parts]
            return np.concatenate(parts)

        seq, pos, step = cat("seq", (), np.int32), cat("pos", (), np.int32), cat("step", (), np.int32)
        order = np.lexsort((step, pos, seq))
        meta = {"model": self.model.source_dir, "model_type": self.model.config.model_type,
                "source": "moeinfer record_routing", **self.meta}
        return RoutingTrace(
            experts=cat("experts", (L, K), np.int16, pad_k=-1)[order],
            weights=cat("weights", (L, K), np.float32, pad_k=0.0)[order],
            seq=seq[order], pos=pos[order], is_prompt=cat("is_prompt", (), bool)[order],
            layers=np.array(self._layers), num_experts=E, step=step[order], meta=meta,
            logits=cat("logits", (L, E), np.float16)[order] if self.record_logits else None)


@contextmanager
def record_routing(model: MoEModel, *, logits: bool = True,
                   meta: dict[str, Any] | None = None) -> Iterator[RoutingRecorder]:
    """`with record_routing(model) as rec: ...` records every forward inside the block; the
    observers are removed on exit (also on error). `rec.trace()` gives the RoutingTrace."""
    rec = RoutingRecorder(model, logits=logits, meta=meta).attach()
    try:
        yield rec
    finally:
        rec.detach()
