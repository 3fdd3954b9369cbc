"""The machine profile completed for one model shape: what a forward costs on this machine for the
model being planned, measured on that model's own shapes once and cached with the profile.

The machine profile (moeinfer/planning/profile.py) is measured on small random models and experts
of two fixed sizes, and prices any model from those figures. Decode predictions came within 25% of
the measured rates that way; prompt forwards did not (up to 2x too fast on the Intel machine,
docs/planner.md "Tenth session"), because a short prefill of a small model is mostly per-call and
per-row work that does not scale from other shapes. So, per model shape:
1. the costs outside the routed experts (moeinfer/planning/shape_costs.py): 1- and 3-layer models
   of the shape, routed experts stubbed, timed on prompts of two lengths;
2. per expert variant the profile measured (precision x kernel), one experts module of the model's
   own E, D, I, timed on prompts of `EXPERT_TOKENS` (two lengths) routed uniformly at its top-k: the
   difference of the two prices a token, the rest (less the profile's call_s) an active expert
   (`ShapeCosts.experts`; moeinfer/planning/costs.py prices a prompt's experts with it). The
   profile's fit, made on two other sizes at one length, priced the shipped model's experts in its
   64-token prompts (16 tokens an expert on average) at 0.88x what they took in bf16 and 0.6x in
   int4 on the Intel machine; a correction measured at one length did not carry over to another
   (bf16: 0.69x at 32 tokens an expert). A variant whose module would take more than a third of the
   free memory is not measured (the fit prices it). Each length runs right after a reference (step
   1's 1-layer model on its shorter prompt, `Reference`: an expert stage runs right after its layer's
   attention), in turn for `EXPERT_ROUNDS` rounds, each time priced against the reference's
   (moeinfer/planning/in_turn.py). As the least of 3 runs of its own, back to back, an int4 expert of
   the shipped shape was priced 23 us in one profile and 41 in another of the same afternoon on the
   Intel machine, and the longer length, timed right after the shorter, ran relatively faster;
3. an offloaded layer runs one call per cached expert (moeinfer/offload/experts.py `expert_fn`),
   quantized ones each with its own activation quantization: per variant, that call on one expert of
   the shape timed on two token counts (`ShapeCosts.offloaded`: per call, per token; each right after
   the reference, as in step 2). On the Intel machine the shipped model's offloaded int4 plan with
   every expert cached spent ~14 ms on a 64-token prompt where the resident one spent ~6.5 (twelfth
   session; quantized prompts now run over the slots, moeinfer/offload/slot_experts.py);
4. per variant whose experts stay in the last-level cache (5 layers of them fit), a one-row decode
   step's expert stage measured in situ: decode steps of 1- and 5-layer models of the shape with
   stubbed experts and with each such variant's experts, all in turn in the same rounds, the median
   of the rounds' figures (`ShapeCosts.decode_experts`). A lone experts module called back to back
   measured 39 us for the shipped model's bf16 experts at decode, the same experts inside the model
   ~90 us a layer (between two layers' calls run attention and the router: which cache or thread
   state that costs is not measured), while the profile's fit priced 58. Measured variant by
   variant, each the difference of four least-of-9 times, the figures moved +-15% between
   measurements (bf16 87-108 us, int8 61-102 on the Intel machine) and once priced int4 and bf16
   alike, so the planner took bf16 for a tie where int4 ran 8% faster; all in turn with the median
   of 30 rounds they stay within +-5% (bf16 96-100, int4 70-78, int8 79-88 in four measurements);
5. on a CPU, per offloaded-expert variant the profile measured host costs for (`offload_host`: "bf16",
   "bf16/cpu", each quantize preset), the same measurement (moeinfer/planning/profile.py
   `measure_offload`: decode steps and prompts, resident against offloaded with every expert cached and
   with a cache that misses every expert, in turn) on a `OFFLOAD_LAYERS`-layer random model of the
   shape with its experts (`ShapeCosts.offload_host`), where its three models take at most a third of
   the free memory; a load's bytes are taken off at the page-cache read rate the simulator prices a
   fresh store's loads at. The profile's figures come from 64-wide experts, an extrapolation to any
   other shape: on the Intel machine (seventeenth session) the shipped shape measured 102-118 us a
   decode load and 121-155 a decode visit where the profile's model gave 64-106 and 155-209 (an int8
   6-slot decode step's price moved 3-10%); its prompt figures are noisier (a bf16/cpu prompt visit
   368 then 622 us).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from moeinfer.config import ModelConfig
from moeinfer.fsutil import atomic_write_text
from moeinfer.loading.expert_files import memory_available
from moeinfer.offload.experts import expert_fn
from moeinfer.offload.packed import PackedFormat, SlotViews
from moeinfer.planning.in_turn import priced_by_reference, rounds_in_turn, timed
from moeinfer.planning.profile import (
    MachineProfile,
    decode_gap_rounds,
    experts_module,
    machine_key,
    measure_offload,
    offload_host_settings,
    profile_path,
    stored_expert_bytes,
    uniform_routing,
)
from moeinfer.planning.shape_costs import (
    ShapeCosts,
    measure_shape_costs,
    prefill_seconds,
    prompt_ids,
    random_model,
    shape_key,
)

EXPERT_TOKENS = (32, 256)  # step 2's two prompt lengths: T x top-k token-slots over the experts
OFFLOADED_TOKENS = (8, 64)  # step 3's two token counts of one expert
# step 4's MoE layers: the difference of 4 layers' expert stages (of 2 it moved 2x between two profiles)
DECODE_LAYERS = (1, 5)
EXPERT_ROUNDS = 7  # steps 2-3's rounds
DECODE_ROUNDS = 30  # step 4's rounds (module docstring: why the median of many)
OFFLOAD_LAYERS = 3  # step 5's MoE layers (as the profile's own offload measurement)


def offloaded_expert(variant: str, config: ModelConfig, device: torch.device) -> Any:
    """Step 3's call: x [n, D] -> SwiGLU of one expert of `variant` and of `config`'s shape, as an
    offloaded layer computes a cached expert (`moeinfer.offload.experts.expert_fn`: float weights by
    the variant's kernel, quantized codes from a slot's blobs with their views made once)."""
    D, I = config.hidden_size, config.moe_intermediate_size
    mod = experts_module(variant, 1, D, I, device)
    if variant.startswith("bf16/"):
        kernel = variant.removeprefix("bf16/").partition("+")[0]
        gate_up, down = mod.gate_up_proj[0], mod.down_proj[0]
        fn = expert_fn(kernel, None, device)
    else:
        packed = PackedFormat.of(mod)
        blobs = [b.to(device) for b in packed.stacked(mod)]
        gate_up, down = blobs[0][0], blobs[1][0]
        slots = SlotViews(packed, *blobs) if device.type == "cpu" else None
        fn = expert_fn("cpu", packed, device, slots=slots)
    return lambda x: fn(x, gate_up, down)


@dataclass(frozen=True)
class Reference:
    """The call every expert figure is priced against (moeinfer/planning/in_turn.py): the shape's
    1-layer model's prompt of the shorter length, and its seconds in the shape costs' fit. The call
    runs the prompt twice and returns the second's time: right after an experts call that read more
    than the last-level cache, the Mixtral-8x7B shape's reference took 34-64 ms where back to back it
    took 20-22 (its weights read from memory again), which priced that shape's experts ~2x too cheap."""

    call: Callable[[], float]
    seconds: float

    @classmethod
    def of(cls, costs: ShapeCosts, config: ModelConfig, dtype: str, device: torch.device) -> Reference:
        model, ids = random_model(config, 1, getattr(torch, dtype), device), prompt_ids(costs.tokens[0])

        def warm() -> float:
            prefill_seconds(model, ids)
            return prefill_seconds(model, ids)
        return cls(call=warm, seconds=costs.reference_seconds())


def expert_line(prof: MachineProfile, variant: str, config: ModelConfig, device: torch.device, *,
                reference: Reference, lengths: tuple[int, int] = EXPERT_TOKENS, one: bool = False,
                rounds: int = EXPERT_ROUNDS) -> tuple[float, float]:
    """Step 2 for one variant: (seconds per active expert, per token) of an experts module of `config`'s
    shape, from its times on prompts of the two `lengths` (both >= 0), less the module's call_s (the
    cost model charges that once per layer). `one`: step 3, one cached expert of an offloaded layer
    (`offloaded_expert`) with `lengths` tokens; its whole call is the expert's cost. Each round the
    reference, then one length, the reference, the other length; for `rounds` rounds, each length's time
    priced against the reference's."""
    E, D, I, K = config.num_experts, config.hidden_size, config.moe_intermediate_size, config.top_k
    if one:
        E = K = 1
        one_call = offloaded_expert(variant, config, device)
        run: Any = lambda x, routing: one_call(x)  # noqa: E731
    else:
        run = experts_module(variant, E, D, I, device)
    call_s = 0.0 if one else prof.rate(variant).call_s
    shapes, calls = [], []
    for T in lengths:
        routing = uniform_routing(T, K, E, device)
        x = torch.randn(T, D, device=device).to(torch.bfloat16)

        def call(x: torch.Tensor = x, routing: Any = routing) -> None:
            with torch.inference_mode():
                run(x, routing)
        # each length right after the reference, as an expert stage runs right after its layer's
        # attention and router: timed back to back instead, the length after the other one ran faster
        calls += [reference.call, timed(call, device)]
        shapes.append((int((torch.bincount(routing.indices.reshape(-1), minlength=E) > 0).sum()), T * K))
    priced = priced_by_reference(rounds_in_turn(calls, rounds), seconds=reference.seconds)[1::2]
    points = [(a, s, p - call_s) for (a, s), p in zip(shapes, priced)]
    # per_expert * active + per_token * slots = seconds at both lengths; a negative term (noise): the other alone
    (a1, s1, t1), (a2, s2, t2) = points
    det = a1 * s2 - a2 * s1
    if det == 0:  # the two prompts differ in nothing the line can tell apart: all of it per token
        return 0.0, max(0.0, t2 / s2)
    per_expert, per_token = (t1 * s2 - t2 * s1) / det, (a1 * t2 - a2 * t1) / det
    if per_token < 0:
        return max(0.0, t1 / a1), 0.0
    if per_expert < 0:
        return 0.0, max(0.0, t2 / s2)
    return per_expert, per_token


def decode_experts(variants: list[str], config: ModelConfig, dtype: str, device: torch.device, *,
                   rounds: int = DECODE_ROUNDS, layers: tuple[int, int] = DECODE_LAYERS) -> dict[str, float]:
    """Step 4 for `variants`: per variant, seconds a one-row decode step spends in one layer's expert
    stage (its top-k experts of one token and the call), from decode steps of random models of the
    shape with `layers` MoE layers, with the routed experts stubbed and with each variant's experts,
    all of them in turn in every round (`decode_gap_rounds`): per round, the per-layer difference of
    the variant's pair less the stubbed pair's; the median over the rounds."""
    E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
    models = []
    for variant in (None, *variants):
        for n in layers:
            m = random_model(config, n, getattr(torch, dtype), device)
            if variant is not None:
                for block in m.moe_blocks():
                    block.experts = experts_module(variant, E, D, I, device).requires_grad_(False)
            models.append(m)
    by_round, _ = decode_gap_rounds(models, rounds)
    span = layers[1] - layers[0]
    out = {}
    for i, variant in enumerate(variants, start=1):
        per_round = [((t[2 * i + 1] - t[2 * i]) - (t[1] - t[0])) / span for t in by_round]
        out[variant] = max(0.0, statistics.median(per_round))
    return out


def _in_cache(variant: str, config: ModelConfig, llc_bytes: int) -> bool:
    """Whether step 4's larger model's experts of `variant` fit in the last-level cache (its regime)."""
    E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
    return llc_bytes > 0 and DECODE_LAYERS[1] * E * stored_expert_bytes(variant, D, I) <= llc_bytes


def _fits(variant: str, config: ModelConfig, device: str) -> bool:
    """Whether one layer of `variant` experts of this shape (bf16 weights drawn, the variant's copy, an
    fp32 compute copy for '+fp32') takes at most a third of the free memory of `device`."""
    E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
    extra = 4 * 3 * D * I if variant.endswith("+fp32") else stored_expert_bytes(variant, D, I)
    return E * (2 * 3 * D * I + extra) <= memory_available(device) // 3


def _offload_fits(config: ModelConfig, device: str) -> bool:
    """Whether step 5's three models (bf16 experts drawn, then their copy at a preset) take at most a
    third of the free memory of `device`."""
    E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
    return 3 * OFFLOAD_LAYERS * E * 2 * (2 * 3 * D * I) <= memory_available(device) // 3


def offload_host(prof: MachineProfile, config: ModelConfig, dtype: str,
                 device: torch.device) -> dict[str, tuple[float, float, float, float]]:
    """Step 5: per key of the profile's `offload_host`, (decode visit, decode load, prompt visit, prompt
    load) seconds on the shape; {} where the models do not fit or off a CPU."""
    if device.type != "cpu" or not _offload_fits(config, prof.device):
        return {}
    E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size

    def base() -> Any:
        m = random_model(config, OFFLOAD_LAYERS, getattr(torch, dtype), device)
        for block in m.moe_blocks():
            block.experts = experts_module("bf16/reference", E, D, I, device).requires_grad_(False)
        return m
    link = prof.cached_link_gbps or prof.link_gbps  # a fresh store's pages: read from the page cache
    out = {}
    for key in prof.offload_host:
        precision, kernel = offload_host_settings(key)
        stored = stored_expert_bytes("bf16/reference" if precision == "bf16" else precision, D, I)
        h = measure_offload(device, link, precision=precision, kernel=kernel, base=base, expert_bytes=stored)
        out[key] = (h.layer_s, h.load_latency_s, h.prompt_layer_s or 0.0, h.prompt_load_s or 0.0)
    return out


def with_shape_costs(prof: MachineProfile, config: ModelConfig, dtype: str, *,
                     progress: bool = False) -> MachineProfile:
    """`prof` with the costs of a model of `config` with weights in `dtype` (steps 1-5), measured
    now if it lacks them (seconds; a real-shape model's experts, up to a minute) and then cached with
    the profile when `prof` is this machine's cached one."""
    key = shape_key(config, dtype)
    if key in prof.shapes:
        return prof
    if progress:
        print("measuring costs on the model's own shapes ...", flush=True)
    device = torch.device(prof.device)
    t0 = time.time()
    costs = measure_shape_costs(config, dtype, device)
    reference = Reference.of(costs, config, dtype, device)
    lines, one, decode = {}, {}, {}
    for v in prof.experts:
        if progress:
            print(f"  experts {v} ...", flush=True)
        if _fits(v, config, prof.device):
            lines[v] = expert_line(prof, v, config, device, reference=reference)
        if not v.endswith("+fp32"):  # an offloaded layer keeps no fp32 copy
            one[v] = expert_line(prof, v, config, device, reference=reference, lengths=OFFLOADED_TOKENS, one=True)
    del reference
    in_cache = [v for v in prof.experts if _in_cache(v, config, prof.llc_bytes)]
    if in_cache:
        if progress:
            print(f"  decode experts {', '.join(in_cache)} ...", flush=True)
        decode = decode_experts(in_cache, config, dtype, device)
    if progress:
        print(f"  offloaded layers {', '.join(prof.offload_host)} ...", flush=True)
    host = offload_host(prof, config, dtype, device)
    stamp = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {time.time() - t0:.1f} s"
    costs = replace(costs, experts=lines, offloaded=one, decode_experts=decode, offload_host=host, measured=stamp)
    out = replace(prof, shapes={**prof.shapes, key: costs})
    if prof.key == machine_key(prof.device):
        atomic_write_text(profile_path(prof.device), json.dumps(out.to_dict(), indent=2) + "\n")
    return out

