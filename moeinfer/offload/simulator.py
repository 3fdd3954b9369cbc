"""Trace-driven offload simulator: replay a routing trace through the real cache, policy and prefetcher.

Shapes: N trace tokens, L MoE layers, K top-k, E experts.

The decisions come from the same objects the live model uses (`build_cache`: `ExpertCache`, the
registered policy and prefetcher), so on the same trace and settings the hit counts equal the live
run's exactly. Only the clock is modelled, from a `HardwareProfile` and a `ModelShape`:
1. group the trace into steps (`trace_steps`); a step that starts a request tells the policy;
2. per MoE layer of a step: the dense part of the layer costs max(bytes / fast-memory bandwidth,
   flops / compute), plus the profile's host time per offloaded layer visit (`host_us_per_layer`,
   measured from a live run: routing read back, cache bookkeeping); then the cache decides the visit;
3. demand loads, then the prefetcher's loads, queue on one link (FIFO): each costs latency +
   bytes / link bandwidth and is ready when it leaves the queue (a step holding prompt rows pays the
   profile's prompt figures for the visit's host time and the latency where it has them:
   `HardwareProfile.host_s`, `latency_s`);
4. experts run one after another: hits first, then CPU-assisted experts (on the CPU, concurrently
   with the fast tier's work: the layer waits for the later of the two), then loaded experts; an
   expert starts when its weights are ready (the wait is stall time) and costs
   max(expert bytes / fast-memory bandwidth, 6 D I tokens / compute);
   with overlap=False (the on-demand baseline) each layer first waits for all its loads (with
   overlap_prompts=False, only the layers of steps holding prompt rows do);
5. report hits, bytes moved, stall, total time and tokens/s, and the lower bound
   (bytes moved / link bandwidth).
The costs of steps 2 and 4 and of the LM head come from a `StepCosts` (default `RooflineCosts`: the
formulas above, from the profile alone); the planner (moeinfer.planning) passes its measured per-layer,
per-precision costs instead, so `moeinfer plan` and `moeinfer simulate` share this one clock.
Not modelled: attention's KV-cache reads, kernel launch overheads (unless a StepCosts or
`host_us_per_layer` measures them),
contention of the link by other traffic, page-cache effects of a disk tier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from moeinfer.offload.apply import as_trace, build_cache
from moeinfer.offload.cache import Load
from moeinfer.offload.config import OffloadConfig
from moeinfer.offload.cpu_assist import CostModel
from moeinfer.offload.hardware import HardwareProfile, ModelShape
from moeinfer.offload.lowbit import low_bit_bytes as estimate
from moeinfer.offload.prefetch import LayerContext
from moeinfer.offload.visits import planned_steps
from moeinfer.traces.trace import RoutingTrace, TraceError


@dataclass
class SimResult:
    tokens: int
    steps: int
    time_s: float
    stall_s: float
    bytes_moved: int
    link_bound_s: float  # bytes moved / link bandwidth: no schedule can beat it
    cache: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time_s if self.time_s > 0 else float("inf")

    @property
    def hit_rate(self) -> float:
        return float(self.cache["hit_rate"])

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "hit_rate": self.hit_rate}


class StepCosts(Protocol):
    """Seconds the simulator charges; `tokens` = rows of the step (dense), sequences of the step (head:
    generation keeps the logits of each sequence's last position) or tokens routed to the expert;
    `sequences` (dense) and `rows` (head): the step's other count (rows > sequences: prompt rows)."""

    def dense_s(self, layer: int, tokens: int, sequences: int = 1) -> float: ...

    def expert_s(self, layer: int, tokens: int, alone: bool = False) -> float:
        """`alone`: the expert runs in a call of its own (a load streamed through the transient buffer),
        where its layer runs its other experts together."""
        ...

    def head_s(self, tokens: int, rows: int = 1) -> float: ...


@dataclass(frozen=True)
class RooflineCosts:
    """The default clock: max(bytes / fast-memory bandwidth, flops / compute) from a profile and a shape."""

    shape: ModelShape
    hardware: HardwareProfile

    def dense_s(self, layer: int, tokens: int, sequences: int = 1) -> float:
        mem_bw, flops = self.hardware.fast_mem_gbps * 1e9, self.hardware.compute_tflops * 1e12
        return max(self.shape.dense_bytes_per_layer / mem_bw, 2.0 * self.shape.dense_params_per_layer * tokens / flops)

    def expert_s(self, layer: int, tokens: int, alone: bool = False) -> float:
        mem_bw, flops = self.hardware.fast_mem_gbps * 1e9, self.hardware.compute_tflops * 1e12
        return max(self.shape.expert_bytes / mem_bw, self.shape.expert_flops(tokens) / flops)

    def head_s(self, tokens: int, rows: int = 1) -> float:
        return self.shape.other_params * self.shape.dtype_bytes / (self.hardware.fast_mem_gbps * 1e9)


def cost_model_for(shape: ModelShape, hw: HardwareProfile, *, weights_on_host: bool = True) -> CostModel:
    """The CPU-assist cost model a profile implies (the live run calibrates its own)."""
    cpu_token = shape.expert_flops(1) / (hw.cpu_gflops * 1e9)
    return CostModel(expert_bytes=shape.expert_bytes, activation_bytes=2 * shape.hidden * shape.dtype_bytes,
                     link_bytes_per_s=hw.link_gbps * 1e9, cpu_s_per_token=cpu_token,
                     cpu_s_fixed=shape.expert_bytes / (hw.cpu_mem_gbps * 1e9), weights_on_host=weights_on_host)


def simulate(trace: RoutingTrace | str, *, shape: ModelShape, config: OffloadConfig, hardware: HardwareProfile,
             cost_model: CostModel | None = None, low_bit_bytes: int | None = None, overlap: bool = True,
             progress: bool = False, costs: StepCosts | None = None, expert_bytes: int | None = None,
             overlap_prompts: bool | None = None) -> SimResult:
    """Replay `trace` (steps 1-5 of the module docstring); `costs`: the clock (default RooflineCosts);
    `expert_bytes`: bytes one expert moves over the link (default the shape's: its float weights; the
    stored size for quantized experts); `overlap_prompts`: whether steps holding prompt rows overlap
    too (default: as `overlap`; False where a prompt's compute leaves no core to a load's copy)."""
    trace = as_trace(trace, "trace")
    if (trace.num_layers, trace.num_experts) != (shape.num_layers, shape.num_experts):
        raise TraceError(f"routing trace has {trace.num_layers} MoE layers x {trace.num_experts} experts; the "
                         f"model shape {shape.name!r} {shape.num_layers} x {shape.num_experts}")
    if config.low_bit_threshold is not None and low_bit_bytes is None:
        low_bit_bytes = estimate(shape.expert_bytes, bits=config.low_bit_bits, group=config.low_bit_group_size,
                                 dtype_bytes=shape.dtype_bytes)
    assist = None
    if config.cpu_assist:
        assist = cost_model or cost_model_for(shape, hardware, weights_on_host=config.tier == "cpu")
    cache, prefetcher = build_cache(config, num_layers=shape.num_layers, num_experts=shape.num_experts,
                                    top_k=trace.top_k, expert_bytes=expert_bytes or shape.expert_bytes, assist=assist,
                                    low_bit_bytes=low_bit_bytes)
    cache.warm()
    link_bw = hardware.link_gbps * 1e9
    clock: StepCosts = costs if costs is not None else RooflineCosts(shape, hardware)
    now = link_free = stall = 0.0
    slot_ready: dict[int, float] = {}

    def queue(loads: list[Load], latency: float) -> dict[int, float]:
        nonlocal link_free
        ready = {}
        for ld in loads:
            nbytes = cache.load_bytes(ld.low_bit)
            link_free = max(link_free, now) + latency + nbytes / link_bw
            ready[ld.key[1]] = link_free
            if ld.slot is not None:
                slot_ready[ld.slot] = link_free
        return ready

    steps = planned_steps(trace)
    it: Any = steps
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(steps, desc="simulate", unit="step")
    for step, visits in it:
        # 1. requests
        if step.new_request:
            cache.begin_request()
        n = len(step.rows)
        prompt = n > step.sequences
        host_s, latency = hardware.host_s(prompt), hardware.latency_s(prompt)
        for v in visits:
            # 2. the dense part of the layer, the host's share of the visit, then the cache's decision
            now += clock.dense_s(v.layer, n, step.sequences) + host_s
            plan = cache.visit(v)
            # 3. demand loads, then prefetches, on one FIFO link
            ready = queue(plan.loads, latency)
            ctx = LayerContext(v.layer, trace.experts[step.rows, v.layer], trace.weights[step.rows, v.layer])
            for target, experts in prefetcher.predict(ctx):
                queue(cache.prefetch(target, experts), latency)
            # 4. experts (a load without a slot streams through the transient buffer: a call of its own)
            tokens = dict(zip(v.experts, v.tokens))
            streamed = {ld.key[1] for ld in plan.loads if ld.slot is None}
            hide = overlap and (n == step.sequences or overlap_prompts is not False)
            if not hide and ready:
                wait = max(ready.values()) - now
                if wait > 0:
                    stall += wait
                    now += wait
            start = now
            for e, slot in plan.hits.items():
                t_ready = slot_ready.get(slot, 0.0)
                if t_ready > now:
                    stall += t_ready - now
                    now = t_ready
                now += clock.expert_s(v.layer, tokens[e])
            cpu_end = start + sum(assist.cpu_s(tokens[e]) for e in plan.assisted) if assist is not None else start
            for e in ready:
                if ready[e] > now:
                    stall += ready[e] - now
                    now = ready[e]
                now += clock.expert_s(v.layer, tokens[e], alone=e in streamed)
            if cpu_end > now:
                stall += cpu_end - now
                now = cpu_end
        # the LM head and embeddings once per step, for each sequence's last position (as generation keeps)
        now += clock.head_s(step.sequences, n)
    st = cache.stats
    settings = {"policy": config.policy, "prefetch": config.prefetch, "cache": str(config.cache),
                "scope": config.scope, "slots": cache.num_slots, "cpu_assist": config.cpu_assist,
                "overlap": overlap, "hardware": hardware.name, "shape": shape.name,
                "low_bit_threshold": config.low_bit_threshold}
    return SimResult(tokens=trace.num_tokens, steps=len(steps), time_s=now, stall_s=stall,
                     bytes_moved=st.bytes_loaded, link_bound_s=st.bytes_loaded / link_bw,
                     cache=st.as_dict(), settings=settings)
