"""The planner's cost model: what a configuration costs in time and memory on this machine.

Shapes: L MoE layers, E experts per layer, K top-k, D hidden, I expert inner size, B batch rows.

Time comes from the offload simulator's clock (`moeinfer.offload.simulator.simulate`, the engine of
`moeinfer simulate`), fed with `MeasuredCosts`, which prices each piece of a step from the machine
profile (moeinfer.planning.profile) instead of from datasheet rates:
- the dense part of a MoE layer (attention, norms, router), on the dense path a planned model runs
  (moeinfer/planning/dense.py): layer_fixed_s + dense bytes / that path's one-token read rate
  (`MachineProfile.dense_read_rate`) or its matmul flops / its matmul rate in the checkpoint's dtype,
  whichever is larger, + (T - 1) layer_token_s for a forward of T tokens; where the profile holds the
  model's shape, a one-row decode step's dense part is the one measured on that shape
  (`ShapeCosts.decode_layer_s`, the rates above adding what more rows cost) and so are the step's
  once-a-step costs (`decode_step_s`: embeddings, final norm, LM head row, Python);
- an expert of layer l at precision p_l with t tokens: the fitted rate of that precision and kernel,
  expert_fixed_s + max(stored bytes / bytes_per_s, 6 D I t / flops_per_s) + (t - 1) slot_s, plus the experts
  module's call_s once per layer (charged with the dense part); bytes_per_s is the rate of weights
  streamed from memory (`stream_bytes_per_s`) when the weights a decode step reads (dense part, LM
  head, top-k experts of every layer) do not fit in the last-level cache (`MachineProfile.streams`),
  else the in-cache one;
- once per step: step_fixed_s + the LM head likewise (or the shape's `decode_step_s`), for the last
  position of each sequence the step holds (generation keeps those logits only: a prompt's forward,
  one row);
- a step holding prompt rows (more rows than sequences) instead pays, per layer and once, the costs
  outside the routed experts measured on the model's own shapes where the profile holds them
  (`MachineProfile.shapes`, moeinfer/planning/shape_costs.py: a short prefill is mostly per-call
  and per-row host work that the figures above, measured on a 2-head 64-wide model, under-price),
  plus the experts module's call_s per layer and the head rows of the step's other sequences (the
  measured prompt costs as a prompt meets the machine after decode steps: `ShapeCosts.after_decode`); an
  expert with more than DECODE_TOKENS tokens costs what the experts module of the model's own shape
  measured per active expert and per token on prompts of two lengths (`ShapeCosts.experts`,
  moeinfer/planning/shape_profile.py) where the profile holds that, instead of the fit above (an
  offloaded layer's float experts: one expert's module, one call each, `ShapeCosts.offloaded`; its
  quantized experts on a CPU, and float ones where the cpu kernel runs its native rows kernel, run the
  resident schedule over the cache's slots, priced as resident, but a load streamed through the
  transient buffer, without a slot, runs a call of its own and is priced as one); and a one-row
  decode step's expert stage is what a model of the shape measured in situ where it did
  (`ShapeCosts.decode_experts`: experts that stay in the last-level cache), the difference from the
  fit charged with the dense part (`_in_situ`);
- offloaded: each layer visit and each load pay the host costs the profile measured for offloaded
  experts of the plan's precision (`MachineProfile.offload_costs`; those measured on the model's own
  shape where they were, `ShapeCosts.offload_host`), on top of the resident rates;
  a disk tier's misses are read from the page cache in the share of the store that fits in the
  memory the plan leaves free (`cached_fraction`), at the profile's cached-read rate; a layer's loads
  overlap its compute only where the profile found a read hidden behind expert decode
  (`MachineProfile.overlaps_reads`, moeinfer/planning/reads.py), else they add to it; on a CPU a
  prompt's loads always add to it (its experts keep every core busy).
A resident configuration is simulated with a cache that holds every expert (static placement, warm
before the first step), so it reduces to the sum above; an offloaded one with the real policy,
prefetcher and link. `layer_seconds` gives the same sum split per layer, which the search uses.

Memory (`fixed_bytes` + per-layer expert bytes): dense weights and embeddings in the checkpoint's
dtype, each layer's experts in its precision (codes plus fp32 scale and zero per group; an fp32
compute copy when the kernel keeps one), the expert cache's slots, the KV cache of B rows x context
tokens, and working memory (the logits of a prefill chunk, plus a fixed 64 MiB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from moeinfer.kernels import native
from moeinfer.kernels.cpu import rows_schedule
from moeinfer.kernels.quantized_cpu import Q8_DECODE_SLOTS_PER_EXPERT
from moeinfer.planning.profile import MachineProfile, stored_expert_bytes
from moeinfer.planning.spec import FLOAT
from moeinfer.offload.config import OffloadConfig
from moeinfer.offload.hardware import ModelShape
from moeinfer.offload.simulator import StepCosts, simulate
from moeinfer.offload.visits import planned_steps
from moeinfer.traces.trace import RoutingTrace

WORKING_BYTES = 64 * 2**20
# tokens of one expert up to which it is priced as decode (no prompt correction): as far as the quantized
# CPU kernel runs its token-by-token path
DECODE_TOKENS = Q8_DECODE_SLOTS_PER_EXPERT
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class ModelSizes:
    """What the cost and memory models need of a model, read from config.json alone."""

    name: str
    num_layers: int  # MoE layers
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    dtype_bytes: int
    dense_params_per_layer: int
    other_params: int  # embeddings + LM head
    head_params: int  # LM head alone (read every step)
    kv_bytes_per_token: int  # all layers, K and V, in the checkpoint's dtype
    vocab: int
    max_context: int
    dtype: str = "bfloat16"  # the dense weights' dtype (torch name): their matmul rate
    shape_key: str = ""  # the config's one-layer shape and dtype (shape_costs.shape_key; "": unknown)

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.inter

    @property
    def dense_bytes(self) -> int:
        return (self.dense_params_per_layer * self.num_layers + self.other_params) * self.dtype_bytes

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.num_layers * self.num_experts * self.expert_params * self.dtype_bytes

    def shape(self) -> Any:
        """The offload simulator's ModelShape."""
        return ModelShape(name=self.name, num_layers=self.num_layers, num_experts=self.num_experts, top_k=self.top_k,
                          hidden=self.hidden, inter=self.inter, dtype_bytes=self.dtype_bytes,
                          dense_params_per_layer=self.dense_params_per_layer, other_params=self.other_params)


def variant(precision: str, kernel: str, fp32_weights: bool) -> str:
    """The profile's name of an expert-stage variant: "bf16/<kernel>[+fp32]" or the quantize preset."""
    if precision == FLOAT:
        return f"bf16/{kernel}{'+fp32' if fp32_weights else ''}"
    return precision


def expert_bytes(sizes: ModelSizes, precision: str, *, fp32_weights: bool = False) -> float:
    """Memory one expert takes at `precision` (with the kernel's fp32 compute copy for float experts)."""
    if precision == FLOAT:
        return sizes.expert_params * (sizes.dtype_bytes + (4 if fp32_weights else 0))
    return stored_expert_bytes(precision, sizes.hidden, sizes.inter)


def fixed_bytes(sizes: ModelSizes, *, batch: int, context: int) -> int:
    """Memory that does not depend on the experts' placement or precision."""
    logits = min(context, PREFILL_CHUNK) * sizes.vocab * 4
    return int(sizes.dense_bytes + sizes.kv_bytes_per_token * batch * context + logits + WORKING_BYTES)


class MeasuredCosts:
    """`StepCosts` for the simulator from a machine profile and per-layer precisions (module docstring)."""

    def __init__(self, sizes: ModelSizes, profile: MachineProfile, precisions: Sequence[str], *,
                 kernel: str, fp32_weights: bool = False, offloaded: bool = False) -> None:
        if len(precisions) != sizes.num_layers:
            raise ValueError(f"{len(precisions)} precisions for {sizes.num_layers} MoE layers")
        self.sizes, self.profile = sizes, profile
        self.rates = [profile.rate(variant(p, kernel, fp32_weights)) for p in precisions]
        self.stored = [stored_expert_bytes(variant(p, kernel, fp32_weights), sizes.hidden, sizes.inter,
                                           sizes.dtype_bytes) for p in precisions]
        self.dense_bw = profile.dense_read_rate()  # dense part and head: the planned dense path's rates,
        self.flops = profile.matmul_rate(sizes.dtype)  # in the checkpoint's dtype
        # what one decode step reads: dense part and head, and top-k experts of every layer
        step_bytes = ((sizes.dense_params_per_layer * sizes.num_layers + sizes.head_params) * sizes.dtype_bytes
                      + sizes.top_k * sum(self.stored))
        self.streamed = profile.streams(step_bytes)
        self.shape_costs = profile.shapes.get(sizes.shape_key) if sizes.shape_key else None
        self.variants = [variant(p, kernel, fp32_weights) for p in precisions]
        # an offloaded layer's prompt: quantized experts on a CPU run over the cache's slots on the resident
        # layer's own schedule (moeinfer/offload/slot_experts.py), priced as resident; float ones too where
        # the cpu kernel runs them in its native rows kernel; else one call each
        over_slots = profile.device == "cpu" and native.unavailable_reason() is None
        float_rows = kernel == "cpu" and not fp32_weights and rows_schedule(getattr(torch, sizes.dtype))
        self.one_call = [offloaded and not (over_slots and (p != FLOAT or float_rows)) for p in precisions]

    def dense_s(self, layer: int, tokens: int, sequences: int = 1) -> float:
        if self.shape_costs is not None and tokens > sequences:  # prompt rows: measured on the model's shapes
            return self.shape_costs.layer(tokens) + self.rates[layer].call_s
        per_token = max(0, tokens - 1) * self.profile.layer_token_s
        return (self._dense_rows_s(self.sizes.dense_params_per_layer, tokens) + self._decode_layer_fixed()
                + self.rates[layer].call_s + per_token + self._in_situ(layer, tokens))

    def _dense_rows_s(self, params: int, tokens: int) -> float:
        """A matmul of `params` dense weights on `tokens` rows: its read or its flops, whichever is larger."""
        s = self.sizes
        return max(params * s.dtype_bytes / self.dense_bw, 2.0 * params * tokens / self.flops)

    def _decode_layer_fixed(self) -> float:
        """What one layer of a decode step pays beyond its dense matmuls: the layer's decode step measured on
        the model's shape (`ShapeCosts.decode_layer_s`) less the matmuls' price for one row (the profile's
        rates then give only how a step grows with rows); the profile's layer_fixed_s where not measured."""
        c = self.shape_costs
        if c is None or c.decode_layer_s <= 0:
            return self.profile.layer_fixed_s
        return c.decode_layer_s - self._dense_rows_s(self.sizes.dense_params_per_layer, 1)

    def _in_situ(self, layer: int, tokens: int) -> float:
        """A one-row decode step's expert stage as measured in a model of this shape, less what the fit
        prices it at (call_s + top-k one-token experts): 0 where not measured."""
        measured = self.shape_costs.decode_experts.get(self.variants[layer]) if self.shape_costs is not None else None
        if measured is None or tokens != 1:
            return 0.0
        return measured - self.rates[layer].call_s - self.sizes.top_k * self._fit_expert_s(layer, 1)

    def _fit_expert_s(self, layer: int, tokens: int) -> float:
        return self.rates[layer].expert_s(self.stored[layer], 6.0 * self.sizes.hidden * self.sizes.inter * tokens,
                                          streamed=self.streamed, tokens=tokens)

    def expert_s(self, layer: int, tokens: int, alone: bool = False) -> float:
        if self.shape_costs is not None and tokens > DECODE_TOKENS:  # a prompt's GEMMs, measured on this shape
            one = self.one_call[layer] or alone  # `alone`: a streamed load, one call of its own
            measured = self.shape_costs.expert(self.variants[layer], tokens, offloaded=one)
            if measured is None and one:
                measured = self.shape_costs.expert(self.variants[layer], tokens)
            if measured is not None:
                return measured
        return self._fit_expert_s(layer, tokens)

    def head_s(self, tokens: int, rows: int = 1) -> float:
        s, c = self.sizes, self.shape_costs
        if c is not None and rows > tokens:  # prompt rows; the measured forward kept one head row
            return c.forward(rows) + 2.0 * s.head_params * (tokens - 1) / self.flops
        if c is not None and c.decode_step_s > 0:  # a decode step's once-a-step costs, measured on the shape
            return c.decode_step_s + self._dense_rows_s(s.head_params, tokens) - self._dense_rows_s(s.head_params, 1)
        return self.profile.step_fixed_s + self._dense_rows_s(s.head_params, tokens)


def layer_seconds(trace: Any, costs: MeasuredCosts) -> tuple[list[float], float]:
    """A resident configuration's time on `trace`, split: (seconds per MoE layer, seconds per-step
    costs); their total equals `simulate` with every expert resident (tested)."""
    per_layer = [0.0] * costs.sizes.num_layers
    steps = 0.0
    for step, visits in planned_steps(trace):
        n = len(step.rows)
        for v in visits:
            per_layer[v.layer] += (costs.dense_s(v.layer, n, step.sequences)
                                   + sum(costs.expert_s(v.layer, t) for t in v.tokens))
        steps += costs.head_s(step.sequences, n)
    return per_layer, steps


def cached_fraction(sizes: ModelSizes, profile: MachineProfile, precision: str, *, tier: str,
                    page_cache_bytes: int) -> float:
    """The share of a disk tier's misses the page cache serves: the memory a plan leaves free over the
    store's bytes (every expert at `precision`), at most 1. The kernel keeps recently read pages; with
    misses spread over the store, that share of them finds their pages cached (a first-order model:
    a store that fits is read from RAM, as every run of the shipped model is)."""
    if tier != "disk" or page_cache_bytes <= 0:
        return 0.0
    store = sizes.num_layers * sizes.num_experts * stored_expert_bytes(variant(precision, "reference", False),
                                                                       sizes.hidden, sizes.inter, sizes.dtype_bytes)
    return min(1.0, page_cache_bytes / store)


@dataclass(frozen=True)
class AtSpeed:
    """`StepCosts` of `costs` on a machine whose compute runs at `speed` times the profile's (the plan-time
    probe, moeinfer/planning/speed_probe.py): every dense, expert and head cost over it."""

    costs: StepCosts
    speed: float

    def dense_s(self, layer: int, tokens: int, sequences: int = 1) -> float:
        return self.costs.dense_s(layer, tokens, sequences) / self.speed

    def expert_s(self, layer: int, tokens: int, alone: bool = False) -> float:
        return self.costs.expert_s(layer, tokens, alone) / self.speed

    def head_s(self, tokens: int, rows: int = 1) -> float:
        return self.costs.head_s(tokens, rows) / self.speed


def simulate_plan(trace: Any, sizes: ModelSizes, profile: MachineProfile, precisions: Sequence[str], *,
                  kernel: str, fp32_weights: bool = False, offload: Any = None, page_cache_bytes: int = 0,
                  speed: float = 1.0) -> Any:
    """The offload simulator's replay of `trace` under a configuration; `offload` = a PlanOffload or
    None (every expert resident: a static cache of all L x E experts, warm before the first step);
    `page_cache_bytes`: memory left free for the page cache (a disk tier's misses then partly read
    from RAM, `cached_fraction`); `speed`: the machine's speed on the model's shape now over its
    profile's (the plan-time probe; the decode figure for a trace of decode steps, the prompt one for
    prompts): the step's compute and an offloaded layer's host time run that much faster, while a
    load's transfer over the link does not. Scaling the simulated time as a whole scaled the loads too:
    on the Intel machine an int4 Mixtral-8x7B expert's 92 MB page-cache read took ~15.5 ms on the loader
    thread (~6 GB/s, the profiles' 4.7-6.6) in a phase when the shape's decode ran 1.8x faster than
    profiled, and the offloaded plans measured 0.71-0.86 of their prediction (docs/planner.md,
    nineteenth session)."""
    costs = MeasuredCosts(sizes, profile, precisions, kernel=kernel, fp32_weights=fp32_weights,
                          offloaded=offload is not None)
    if offload is None:
        cfg = OffloadConfig(tier="cpu", cache=sizes.num_layers * sizes.num_experts, scope="global", policy="static",
                            calibration=_all_experts_trace(sizes))
    else:
        cfg = offload.config(offload_dir="unused-by-the-simulator")
    # offloaded quantized experts move their stored bytes (codes, scales, zeros) over the link
    moved = None
    if offload is not None and precisions[0] != FLOAT:
        moved = int(costs.stored[0])
    # and pay the host costs measured for offloaded layers of their precision (profile step 4)
    cached = 0.0 if offload is None else cached_fraction(sizes, profile, precisions[0], tier=offload.tier,
                                                         page_cache_bytes=page_cache_bytes)
    host_key = precisions[0] if precisions[0] != FLOAT or kernel != "cpu" else "bf16/cpu"
    hardware = profile.hardware(offloaded=offload is not None, precision=host_key, cached_fraction=cached,
                                shape=costs.shape_costs)
    if speed != 1.0:
        prompt_host = hardware.prompt_host_us_per_layer
        hardware = replace(hardware, host_us_per_layer=hardware.host_us_per_layer / speed,
                           prompt_host_us_per_layer=None if prompt_host is None else prompt_host / speed)
    # loads overlap compute where the profile found reads hidden behind it (on a CPU a page-cached read is
    # a memcpy that shares cores and memory bandwidth with expert decode)
    overlap = offload is None or profile.overlaps_reads()
    # but not behind a prompt's experts on a CPU: they keep every core busy, and a load's page-cache copy
    # runs on those cores (the shipped model's 64-token prompts: ~100 us a load, none of it hidden)
    clock = costs if speed == 1.0 else AtSpeed(costs, speed)
    return simulate(trace, shape=sizes.shape(), config=cfg, hardware=hardware, costs=clock, expert_bytes=moved,
                    overlap=overlap, overlap_prompts=offload is None or profile.device != "cpu")


def _all_experts_trace(sizes: ModelSizes) -> Any:
    """A one-token-per-expert trace: the static policy's popularity then places every expert."""
    import numpy as np

    L, E, K = sizes.num_layers, sizes.num_experts, sizes.top_k
    rows = -(-E // K)
    experts = np.full((rows, L, K), -1, dtype=np.int16)
    for r in range(rows):
        ids = [e for e in range(r * K, min(E, (r + 1) * K))]
        experts[r, :, :len(ids)] = ids
    return RoutingTrace(experts=experts, weights=np.ones((rows, L, K), np.float32) / K, seq=np.arange(rows),
                        pos=np.zeros(rows), is_prompt=np.ones(rows, bool), layers=np.arange(L), num_experts=E)
