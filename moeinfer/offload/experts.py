"""`OffloadedExperts`: the MoE block's expert-compute stage with weights fetched through a cache.

Shapes: N tokens, D hidden, K top-k, E experts, I expert inner size, S = N*K token-slots.

Replaces `MoEBlock.experts` (same `forward(x, routing)`), like expert parallelism does; the router,
dispatch and combine stages are the reference ones. Per forward of MoE layer l:
1. dispatch the token-slots by expert (reference `dispatch`), make the layer's `Visit`;
2. the shared `ExpertCache` decides hits, misses, placements (`OffloadRuntime.cache.visit`);
3. issue the demand loads into slots and the first load that has no slot, then ask the prefetcher
   about later layers and issue those loads: they run behind this layer's compute on the loader's
   thread / copy stream;
4. compute the hits first, then CPU-assisted experts, then each loaded expert as it arrives,
   every expert exactly as the reference `expert_compute` does (bit-identical outputs); quantized
   experts (slots of byte blobs, moeinfer.offload.packed) exactly as QuantizedExperts' eager reference.
   Loads without a slot (a pool smaller than the visit's experts: a prompt's layer needs most of
   them) stream one after another through one transient buffer (`cache.transient_buffers`: what the
   planner's memory model counts), each issued once the previous one is computed. The buffer is
   kept: on a CPU a fresh expert-sized allocation is mapped and page-faulted by its read (measured
   on a 352 MB Mixtral expert: ~1.1 GB/s against ~5 into kept pages); the loader knows it by the
   slot id `TRANSIENT`, so a GPU copy into it waits for the compute that last read it, as a
   slot's does;
5. combine (reference `combine`).
With kernel 'cpu' on a CPU (no CPU-assisted experts, no dynamic gating), a one-token step, and a
prompt or a few tokens of quantized experts, take steps 2-4 without the dispatch and the combine: the
cached experts in one native call over the slots, each load's experts as they land, then the
resident native schedule's own sum (moeinfer/offload/slot_experts.py): the resident layer's output
on that kernel bit for bit; a one-token step ~190 us a layer instead of ~450 on the shipped model
(resident: ~110).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from moeinfer.fsutil import remove_scratch
from moeinfer.kernels.cpu import one_expert
from moeinfer.model.mlp import swiglu
from moeinfer.model.moe import Routing, combine, dispatch
from moeinfer.offload.cache import ExpertCache, Load
from moeinfer.offload.cpu_assist import CpuExperts
from moeinfer.offload.errors import OffloadError
from moeinfer.offload.packed import PackedFormat, SlotViews, native_expert_fn
from moeinfer.offload.prefetch import LayerContext, Prefetcher
from moeinfer.offload.slot_experts import SlotExperts, SlotStep
from moeinfer.offload.transfer import Handle
from moeinfer.offload.visits import visit_of

Key = tuple[int, int]
TRANSIENT = -1  # the loader's slot id for the transient buffer (step 4)


@dataclass
class RunStats:
    """Measured on the live run (the cache's own counters are in `cache.stats`)."""

    steps: int = 0
    tokens: int = 0
    stall_s: float = 0.0  # time compute waited for transfers
    assisted_s: float = 0.0
    loads_waited: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def expert_fn(kernel: str, packed: PackedFormat | None, device: torch.device, *, engine: str | None = None,
              activations: str | None = None, slots: SlotViews | None = None) -> Any:
    """(xs [n, D], gate_up, down) -> SwiGLU [n, D] of one cached expert, by `kernel` ('reference' or
    'cpu'): float weights as eager SwiGLU, or through the CPU kernel on a CPU (`one_expert`: its bits
    for this expert, without its sort and combine); quantized experts (`packed`: slots of byte blobs)
    through the native quantized kernels on the slot's codes with 'cpu' where built (`engine`,
    `activations`: a native variant and decode activations forced; `slots`: the slots' views, made
    once), else their eager reference, each matrix dequantized from the blob."""
    if packed is not None and kernel == "cpu" and device.type == "cpu":
        native = native_expert_fn(packed, engine=engine, activations=activations, slots=slots)
        if native is not None:
            return native
    if packed is not None:
        def run_packed(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
            return swiglu(xs, packed.dequantize(gate_up, "gate_up", xs.dtype),
                          packed.dequantize(down, "down", xs.dtype))

        return run_packed
    if kernel != "cpu" or device.type != "cpu":
        return swiglu
    return one_expert


class OffloadRuntime:
    """Everything the offloaded layers of one model share: cache, store, loader, slots, prefetcher."""

    def __init__(self, *, cache: ExpertCache, prefetcher: Prefetcher, store: Any, loader: Any,
                 gate_up_shape: tuple[int, int], down_shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device, cpu_experts: CpuExperts | None = None, config: Any = None,
                 packed: PackedFormat | None = None, midpoints: bool = False) -> None:
        self.cache, self.prefetcher, self.store, self.loader = cache, prefetcher, store, loader
        self.packed = packed  # quantized experts: slots hold byte blobs in this format (None: float weights)
        self.midpoints = midpoints  # quantized: every offloaded expert's zeros are midpoints (packed.midpoint_zeros)
        self.gate_up_shape, self.down_shape = gate_up_shape, down_shape
        self.dtype, self.device = dtype, device
        self.cpu_experts = cpu_experts
        self.config = config
        S = cache.num_slots
        self.slot_gate_up = torch.empty(S, *gate_up_shape, dtype=dtype, device=device)  # [S, 2I, D]
        self.slot_down = torch.empty(S, *down_shape, dtype=dtype, device=device)  # [S, D, I]
        # quantized slots on a CPU: each slot's views for the native kernels, made once
        self.slot_views = (SlotViews(packed, self.slot_gate_up, self.slot_down, midpoints=midpoints)
                           if packed is not None and device.type == "cpu" else None)
        self._slot_experts: dict[tuple[str | None, str | None], SlotExperts | None] = {}
        self.pending: dict[int, Handle] = {}  # slot -> its latest load, until waited
        self._transient: tuple[torch.Tensor, torch.Tensor] | None = None  # made on first use (step 4)
        self._transient_busy = False  # a load without a slot was issued and its expert not yet computed
        self.stats = RunStats()
        self.closed = False
        self.token_handle: Any = None  # the model's token observer that begins each step (offload_)
        self.scratch: Any = None  # the store's folder when it is a scratch folder to delete on close (offload_)

    def slot_experts(self, engine: str | None, activations: str | None) -> SlotExperts | None:
        """The native expert stage over the slots for this engine and these activations (made once; None
        where it cannot run: moeinfer/offload/slot_experts.py)."""
        key = (engine, activations)
        if key not in self._slot_experts:
            self._slot_experts[key] = SlotExperts.of(gate_up=self.slot_gate_up, down=self.slot_down,
                                                     packed=self.packed, midpoints=self.midpoints, engine=engine,
                                                     activations=activations)
        return self._slot_experts[key]

    # -- steps and transfers ------------------------------------------------------------------------
    def begin_step(self, new_request: bool, num_tokens: int) -> None:
        self.stats.steps += 1
        self.stats.tokens += num_tokens
        if new_request:
            self.cache.begin_request()

    def issue(self, loads: list[Load]) -> dict[int, tuple[torch.Tensor, torch.Tensor, Handle, int | None]]:
        """Start the transfers of `loads` in order; expert -> (gate_up, down, handle, slot)."""
        out = {}
        for ld in loads:
            if ld.slot is None:
                g, d = self._transient_buffer()
            else:
                g, d = self.slot_gate_up[ld.slot], self.slot_down[ld.slot]
            h = self.loader.submit(ld.key, self._reader(ld.key, ld.low_bit), g, d,
                                   TRANSIENT if ld.slot is None else ld.slot)
            if ld.slot is not None:
                self.pending[ld.slot] = h
            out[ld.key[1]] = (g, d, h, ld.slot)
        return out

    def _transient_buffer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer a load without a slot streams through (step 4 of the module docstring), one load at
        a time."""
        if self._transient_busy:
            raise OffloadError("a second load without a slot was issued before the first one's expert was computed")
        self._transient_busy = True
        if self._transient is None:
            # made on first use, often inside a forward under inference mode: a normal tensor all the same,
            # since the loader's thread (outside inference mode) writes into it
            with torch.inference_mode(False):
                self._transient = (torch.empty(self.gate_up_shape, dtype=self.dtype, device=self.device),
                                   torch.empty(self.down_shape, dtype=self.dtype, device=self.device))
        return self._transient

    def begin_visit(self) -> None:
        """A layer's visit starts: the transient buffer is free (a visit that raised may have left a load
        in it unconsumed; the loader reads in issue order, so the next load overwrites it after)."""
        self._transient_busy = False

    def computed(self, slot: int | None) -> None:
        """The caller finished computing the expert of `slot` (None: the transient buffer is free again)."""
        self.loader.used(TRANSIENT if slot is None else slot)
        if slot is None:
            self._transient_busy = False

    def _reader(self, key: Key, low_bit: bool = False):
        fn = self.store.read_low_bit if low_bit else self.store.read

        def read(g: torch.Tensor, d: torch.Tensor) -> None:
            fn(key, g, d)
        return read

    def wait(self, h: Handle, slot: int | None) -> None:
        if slot is not None and self.pending.get(slot) is not h:
            return  # a newer load owns the slot's pending entry
        if not h.done():
            self.stats.loads_waited += 1
        try:
            h.wait()
        except BaseException:
            if slot is not None:
                self.pending.pop(slot, None)
                self.cache.drop(h.key)  # its slot holds garbage: load it again next time
            raise
        self.stats.stall_s += h.stall_s
        if slot is not None:
            self.pending.pop(slot, None)

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pending.get(slot)
        if h is not None:
            self.wait(h, slot)
        return self.slot_gate_up[slot], self.slot_down[slot]

    def warm(self) -> None:
        """Load the policy's warm keys (static placement) and wait for them."""
        for (_, _, h, slot) in self.issue(self.cache.warm()).values():
            self.wait(h, slot)
        for slot in list(self.pending):
            self.wait(self.pending[slot], slot)

    def close(self) -> None:
        if not self.closed:
            if self.token_handle is not None:
                self.token_handle.remove()
            self.loader.close()
            if self.cpu_experts is not None:
                self.cpu_experts.close()
            self.store.close()
            if self.scratch is not None:
                remove_scratch(self.scratch)
            self.closed = True


class OffloadedExperts(nn.Module):
    """The experts of one MoE layer, served from the offload runtime (steps in the module docstring)."""

    # ExpertStage (moeinfer/model/moe.py): its own expert stage over the cache; each cached or loaded
    # expert runs as eager SwiGLU ('reference') or through the CPU kernel on a CPU fast tier ('cpu').
    kernels = ("reference", "cpu")
    kernel = "reference"
    graph_safe = False  # visits the cache on the host
    # quantized experts with kernel 'cpu' (as QuantizedExperts): a native variant forced by hand, and
    # the decode activations ("q8" / "f32"; None = the kernels' default)
    cpu_engine: str | None = None
    cpu_activations: str | None = None

    def __init__(self, *, layer: int, num_experts: int, runtime: OffloadRuntime) -> None:
        super().__init__()
        self.layer = layer
        self._num_experts = num_experts
        self.runtime = runtime

    @property
    def num_experts(self) -> int:
        return self._num_experts

    def extra_repr(self) -> str:
        c = self.runtime.cache
        return (f"layer={self.layer}, experts={self._num_experts}, policy={c.policy.name}, "
                f"prefetch={self.runtime.prefetcher.name}, slots={c.num_slots}")

    def _expert_fn(self, x: torch.Tensor) -> Any:
        return expert_fn(self.kernel, self.runtime.packed, x.device, engine=self.cpu_engine,
                         activations=self.cpu_activations, slots=self.runtime.slot_views)

    def _slot_step(self, x: torch.Tensor, routing: Routing) -> SlotStep | None:
        """This forward over the slots, where it takes that path: kernel 'cpu' on a CPU, no CPU-assisted
        experts, no dynamic gating, a resident schedule the slots run (moeinfer/offload/slot_experts.py)."""
        if (self.kernel != "cpu" or x.device.type != "cpu" or routing.k is not None
                or self.runtime.cpu_experts is not None):
            return None
        slots = self.runtime.slot_experts(self.cpu_engine, self.cpu_activations)
        return slots.step(x, routing.indices) if slots is not None else None

    def _visit(self, x: torch.Tensor, routing: Routing) -> tuple[Any, list[Load], dict[int, Any], Any]:
        """Steps 1-3 without the dispatch: the cache's plan, the loads without a slot, the issued loads
        (expert -> gate_up, down, handle, slot), and the routing read to the host."""
        rt = self.runtime
        idx = routing.indices.detach().cpu().numpy()
        w = routing.weights.detach().float().cpu().numpy()
        plan = rt.cache.visit(visit_of(self.layer, idx, w))
        # 3. demand loads into slots and the first without a slot, then the prefetcher's
        streamed = [ld for ld in plan.loads if ld.slot is None]
        rt.begin_visit()
        loaded = rt.issue([ld for ld in plan.loads if ld.slot is not None] + streamed[:1])
        hidden = x if rt.prefetcher.needs_hidden else None
        for target, experts in rt.prefetcher.predict(LayerContext(self.layer, idx, w, hidden)):
            rt.issue(rt.cache.prefetch(target, experts))
        return plan, streamed, loaded, idx

    def _over_slots(self, x: torch.Tensor, routing: Routing, step: SlotStep) -> torch.Tensor:
        """Steps 2-5 through the slots: the cached experts in one call, then each load's experts as they
        land (those landed together in one call), then the resident schedule's sum."""
        rt = self.runtime
        plan, streamed, loaded, idx = self._visit(x, routing)
        slot_of = np.full(self._num_experts + 1, -1, dtype=np.int64)  # expert -> slot; [-1]: a skipped row

        def in_slots(slots: dict[int, int]) -> np.ndarray:  # [N, K]: each (n, k)'s slot, -1 if not among these
            slot_of[:] = -1
            for e, s in slots.items():
                slot_of[e] = s
            return slot_of[idx]

        # 4. the hits, one call (after any load still landing in their slots)
        if plan.hits:
            for slot in plan.hits.values():
                rt.slot_weights(slot)
            step.rows(in_slots(plan.hits))
            for slot in plan.hits.values():
                rt.computed(slot)
        # then the loads: whatever has landed in one call, waiting for the first when none has
        waiting = dict(loaded)
        rest = streamed[1:]  # loads without a slot after the first: each once the transient buffer is free
        while waiting:
            landed = {e: v for e, v in waiting.items() if v[2].done()} or dict([next(iter(waiting.items()))])
            for e, (_, _, h, slot) in landed.items():
                del waiting[e]
                rt.wait(h, slot)
            slotted = {e: v[3] for e, v in landed.items() if v[3] is not None}
            if slotted:
                step.rows(in_slots(slotted))
            for e, (gate_up, down, _, slot) in landed.items():
                if slot is None:
                    step.one(idx == e, gate_up, down)
                rt.computed(slot)
            if not waiting and rest:
                waiting = dict(rt.issue([rest.pop(0)]))
        return step.combine(routing.weights)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        step = self._slot_step(x, routing)
        if step is not None:
            return self._over_slots(x, routing, step)
        rt = self.runtime
        expert = self._expert_fn(x)
        N = x.shape[0]
        # 1. dispatch and the visit
        d = dispatch(routing.indices, self._num_experts)
        plan, streamed, loaded, _ = self._visit(x, routing)
        # 4. compute: hits, then assisted experts, then loads as they land
        x_sorted = x[d.tokens]  # [S, D]
        y = torch.empty_like(x_sorted)
        counts = d.counts.tolist()
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()

        def seg(e: int) -> slice:
            return slice(int(starts[e]), int(starts[e + 1]))

        for e, slot in plan.hits.items():
            gate_up, down = rt.slot_weights(slot)
            y[seg(e)] = expert(x_sorted[seg(e)], gate_up, down)
            rt.computed(slot)
        if plan.assisted:
            assert rt.cpu_experts is not None
            t0 = time.perf_counter()
            jobs = [(x_sorted[seg(e)], *rt.store.host((self.layer, e))) for e in plan.assisted]
            for e, out in zip(plan.assisted, rt.cpu_experts.compute(jobs)):
                y[seg(e)] = out
            rt.stats.assisted_s += time.perf_counter() - t0

        def run_loaded(e: int, gate_up: torch.Tensor, down: torch.Tensor, h: Handle, slot: int | None) -> None:
            rt.wait(h, slot)
            y[seg(e)] = expert(x_sorted[seg(e)], gate_up, down)
            rt.computed(slot)

        for e, issued in loaded.items():
            run_loaded(e, *issued)
        for ld in streamed[1:]:  # the rest without a slot, each issued once the transient buffer is free
            run_loaded(ld.key[1], *rt.issue([ld])[ld.key[1]])
        # 5. combine
        return combine(y, d, routing.weights, N)
