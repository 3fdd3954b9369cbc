"""Per-forward instrumentation for the benchmark: time, shape and expert use of every forward.

Shapes: B rows, T new tokens per row, L MoE layers, E experts.

`with instrument(model) as ins:` attaches, for the duration of the block:
1. a forward pre-hook on the model that notes B, T and the attended key slots S (the cache's
   longest row + T, or T without a cache) and starts the clock (after a device sync on CUDA);
2. a routing observer on every MoEBlock, chained to any observer already there, that adds the
   forward's expert choices to per-layer counts on the device (no sync inside the forward);
3. a forward hook that syncs, stops the clock, turns the layer counts into distinct experts d_l and
   token-slots per layer, and appends a ForwardRecord; c [L, E] accumulates over the whole block.
The hooks cost a few microseconds per forward and per layer; the device sync per forward makes GPU
timings per forward exact rather than overlapped, as in MoE-CAP's per-step accounting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from moeinfer.bench.metrics import ForwardRecord


class Instrument:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.blocks = model.moe_blocks()
        E = self.blocks[0].experts.num_experts if self.blocks else 0
        self.counts = np.zeros((len(self.blocks), E), dtype=np.int64)
        self.forwards: list[ForwardRecord] = []
        self._pos = {id(b): i for i, b in enumerate(self.blocks)}
        self._layer_counts: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._pending: tuple[float, int, int, int] | None = None
        self._handles: list[Any] = []
        self._observers: list[Any] = []  # ObserverHandle of each block
        self.cuda = model.device.type == "cuda"

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.model.device)

    # 1.
    def _pre(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        B, T = ids.shape
        cache = kwargs.get("cache")
        end = (int(cache.lengths.max()) + T) if cache is not None else T
        self._layer_counts = [None] * len(self.blocks)
        self._sync()
        self._pending = (time.perf_counter(), B, T, end)

    # 2.
    def _observer(self, block: Any) -> Any:
        i = self._pos[id(block)]
        E = self.counts.shape[1]

        def on_routing(layer_idx: int, routing: Any) -> None:
            idx = routing.indices
            k = getattr(routing, "k", None)  # dynamic gating: token n uses its first k[n] slots only
            if k is not None:
                idx = idx[torch.arange(idx.shape[1], device=idx.device)[None, :] < k[:, None]]
            self._layer_counts[i] = torch.bincount(idx.reshape(-1), minlength=E)
        return on_routing

    # 3.
    def _post(self, _module: Any, _args: Any, _kwargs: Any, _out: Any) -> None:
        self._sync()
        t1 = time.perf_counter()
        if self._pending is None:
            return
        t0, B, T, end = self._pending
        self._pending = None
        distinct, slots = [], []
        for i, c in enumerate(self._layer_counts):
            if c is None:
                continue
            arr = c.cpu().numpy()
            self.counts[i] += arr
            distinct.append(int((arr > 0).sum()))
            slots.append(int(arr.sum()))
        self.forwards.append(ForwardRecord(t1 - t0, B, T, end, tuple(distinct), tuple(slots)))

    def attach(self) -> Instrument:
        self._handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.model.register_forward_hook(self._post, with_kwargs=True)]
        self._observers = [b.add_routing_observer(self._observer(b)) for b in self.blocks]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        for o in self._observers:
            o.remove()
        self._handles, self._observers = [], []


@contextmanager
def instrument(model: Any) -> Iterator[Instrument]:
    ins = Instrument(model).attach()
    try:
        yield ins
    finally:
        ins.detach()
