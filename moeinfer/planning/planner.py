"""`moeinfer.plan(model, budget)`: choose expert precision, placement, caching, kernel and batch size
for a memory budget, from measured costs and measured quality (docs/planner.md).

Shapes: L MoE layers, E experts per layer, P precisions, B batch rows.

1. sizes from config.json and safetensors headers (moeinfer.planning.sizes): the model is never loaded
   for this, so a checkpoint bigger than memory is planned as well;
2. the machine profile (moeinfer.planning.profile), measured once and cached, with the costs measured
   on this model's own shapes (moeinfer.planning.shape_profile), once per shape; and, with this
   machine's profile, how fast the machine runs that shape now against the profile
   (moeinfer.planning.speed_probe): every prediction is simulated at that speed (the compute faster
   or slower, a load's transfer as profiled: moeinfer.planning.costs.simulate_plan);
3. when the model fits in memory (or is given loaded): its routing on the calibration text and its
   quality model (moeinfer.planning.quality); otherwise the user's trace or uniform routing, and either
   a stand-in quality model measured on `quality_from` (another model, e.g. a smaller one of the same
   family: `stand_in_quality`) or only lossless choices (the plan's notes say which). Quantized plans
   of a model bigger than memory are priced at their quantized sizes like any other: `load_planned`
   quantizes them while loading, one layer of float experts in memory at a time;
4. the search space (each family priced by the offload simulator's clock, moeinfer.planning.costs):
   a. every expert resident, per-layer precision (float / each quantize preset) chosen by the
      layer search (moeinfer.planning.search: exact or DP) under the memory left after dense weights,
      KV cache and working memory, and under `max_quality_loss`; for each kernel variant and batch;
   b. every expert in the slow tier (disk on a CPU, host memory on CUDA) at one precision for all
      layers (the checkpoint's, or a quantize preset within the quality budget: its codes move between
      the tiers) with a fast-tier cache of all the slots the budget leaves at that precision (and the
      transient buffer a cache smaller than a layer's experts streams a prompt's other misses
      through: `cached_experts`), for each cache policy and prefetcher (and CPU assist on CUDA,
      float experts only);
5. predict decode (at the batch) and prefill tokens/s (each sequence's prompt after the trace's decode,
   with the expert cache a generation leaves) of each candidate with `simulate`, rank by
   decode tokens/s (the objective sets the batch sizes tried: 1 for latency); candidates predicted
   within `TIE` of the fastest (decode and prefill) are a tie, ranked by quality loss, then speed
   (`_rank`): the cost model
   does not resolve smaller differences (docs/planner.md), so a 1% predicted gain never costs quality;
   keep the best and the next three distinct ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from moeinfer.planning import routing as routes
from moeinfer.planning.costs import (
    MeasuredCosts,
    ModelSizes,
    expert_bytes,
    fixed_bytes,
    layer_seconds,
    simulate_plan,
)
from moeinfer.planning.search import Option, search
from moeinfer.planning.spec import FLOAT, OBJECTIVES, Plan, PlanError, PlanOffload, Prediction
from moeinfer.api import load
from moeinfer.compress.methods.quantize_layers import layer_quantizer
from moeinfer.eval.perplexity import as_eval_text
from moeinfer.model.transformer import MoEModel
from moeinfer.offload.apply import as_trace
from moeinfer.offload.cache import transient_buffers
from moeinfer.offload.config import parse_size
from moeinfer.planning.profile import MachineProfile, machine_key, machine_profile
from moeinfer.planning.quality import QualityModel, cached_quality, measure_quality, stand_in_quality
from moeinfer.planning.shape_profile import with_shape_costs
from moeinfer.planning.speed_probe import MachineSpeed, machine_speed
from moeinfer.planning.sizes import available_memory, config_of, sizes_from_checkpoint, sizes_from_model

DEFAULT_PRECISIONS = (FLOAT, "int8", "int4")
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
POLICIES = ("lru", "lfu")  # policies that need no calibration trace at run time
# next-layer needs hidden states (the simulator replays routing only); transition/mlp need a calibration
# trace at run time, which a plan file does not carry
PREFETCHERS = ("none",)
MAX_SIM_TOKENS = 256


def parse_budget(budget: int | str) -> int:
    """Bytes from an int or a size such as "8GB", "512MiB"."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        if budget < 1:
            raise PlanError(f"memory budget must be > 0 bytes, got {budget}")
        return budget
    try:
        size = parse_size(str(budget))
    except ValueError:
        raise PlanError(f"memory budget {budget!r} is not a size (e.g. 8GB, 512MB, 1.5GiB)") from None
    if size.bytes is None:
        raise PlanError(f"memory budget {budget!r} needs a unit (e.g. 8GB, 512MB)")
    if size.bytes < 1:
        raise PlanError(f"memory budget must be > 0 bytes, got {budget!r}")
    return size.bytes


@dataclass(frozen=True)
class _Candidate:
    precisions: tuple[str, ...]
    kernel: str
    fp32: bool
    batch: int
    offload: PlanOffload | None = None

    def __post_init__(self) -> None:
        if FLOAT not in self.precisions:  # no float experts: the kernel choice does not apply
            object.__setattr__(self, "kernel", "auto")
            object.__setattr__(self, "fp32", False)


def _kernels(profile: MachineProfile) -> list[tuple[str, bool]]:
    out = []
    for v in profile.experts:
        if v.startswith("bf16/"):
            k, _, extra = v.removeprefix("bf16/").partition("+")
            out.append((k, extra == "fp32"))
    return out


def offload_slots(room: int, sizes: ModelSizes, precision: str) -> int:
    """The most slots of a global LRU/LFU cache of `precision` experts whose memory (`cached_experts`)
    fits in `room` bytes (0: none)."""
    slots = int(room // expert_bytes(sizes, precision)) if room > 0 else 0
    while slots > 0 and cached_experts(slots, sizes) * expert_bytes(sizes, precision) > room:
        slots -= 1
    return slots


def cached_experts(slots: int, sizes: ModelSizes) -> int:
    """Experts' worth of memory a global LRU/LFU cache of `slots` takes: its slots and, when they are
    fewer than a layer's experts, the transient buffer misses without a slot stream through."""
    return slots + transient_buffers([slots], sizes.num_experts)


def _memory(sizes: ModelSizes, c: _Candidate, context: int) -> int:
    fixed = fixed_bytes(sizes, batch=c.batch, context=context)
    if c.offload is not None:  # offloaded experts share one precision (Plan)
        return int(fixed + cached_experts(c.offload.cache_experts, sizes) * expert_bytes(sizes, c.precisions[0]))
    return int(fixed + sum(sizes.num_experts * expert_bytes(sizes, p, fp32_weights=c.fp32) for p in c.precisions))


def _load_peak(sizes: ModelSizes, c: _Candidate, context: int) -> int:
    """The most memory `load_planned` takes while it builds candidate `c` from the checkpoint: where a layer
    is quantized, its float experts are read and quantized one MoE layer at a time
    (moeinfer.planning.quantize_load), beside every layer's experts at their plan precision, or, for a plan
    that offloads quantized experts to disk, beside one quantized layer (each is written to the expert
    store once made); else the plan's own memory (float experts stream from the checkpoint)."""
    memory = _memory(sizes, c, context)
    if all(p == FLOAT for p in c.precisions):
        return memory
    layers = [sizes.num_experts * expert_bytes(sizes, p) for p in c.precisions]
    spilled = c.offload is not None and c.offload.tier == "disk" and FLOAT not in c.precisions
    held = int(fixed_bytes(sizes, batch=c.batch, context=context) + (max(layers) if spilled else sum(layers)))
    return max(memory, held + int(sizes.num_experts * expert_bytes(sizes, FLOAT)))


def _resident_candidates(views: dict[int, Any], sizes: ModelSizes, profile: MachineProfile,
                         quality: QualityModel | None,
                         precisions: Sequence[str], budget: int, max_loss: float, batches: Sequence[int],
                         context: int) -> list[_Candidate]:
    """Step 4a."""
    L, E = sizes.num_layers, sizes.num_experts
    out: list[_Candidate] = []
    for B in batches:
        tr = views[B]
        room = budget - fixed_bytes(sizes, batch=B, context=context)
        if room <= 0:
            continue
        for kernel, fp32 in _kernels(profile):
            times = {p: layer_seconds(tr, MeasuredCosts(sizes, profile, [p] * L, kernel=kernel, fp32_weights=fp32))[0]
                     for p in precisions}
            options = [[Option(time=times[p][l], memory=E * expert_bytes(sizes, p, fp32_weights=fp32),
                               quality=quality.layer_cost(l, p) if quality is not None else 0.0)
                        for p in precisions] for l in range(L)]
            best = search(options, memory=room, quality=max_loss)
            if best is not None:
                out.append(_Candidate(tuple(precisions[c] for c in best.picks), kernel, fp32, B))
            for p in precisions:  # uniform precisions: runners-up and baselines
                q = quality.loss([p] * L) if quality is not None else 0.0
                if E * L * expert_bytes(sizes, p, fp32_weights=fp32) <= room and q <= max_loss:
                    out.append(_Candidate((p,) * L, kernel, fp32, B))
    return out


def _offload_candidates(sizes: ModelSizes, device: str, budget: int, batches: Sequence[int], context: int,
                        precisions: Sequence[str], quality: QualityModel | None,
                        max_loss: float, profile: MachineProfile | None = None) -> list[_Candidate]:
    """Step 4b: for each precision (float, or a preset within the quality budget), every slot the budget
    leaves at that precision's stored expert size; float experts on a CPU fast tier also with the 'cpu'
    kernel when the profile measured it (offloaded experts run 'reference' or 'cpu')."""
    out = []
    L = sizes.num_layers
    float_kernels = ["reference"]
    if device == "cpu" and profile is not None and "bf16/cpu" in profile.experts:
        float_kernels.append("cpu")
    usable = [p for p in precisions
              if p == FLOAT or (quality is not None and quality.loss([p] * L) <= max_loss)]
    for B in batches:
        room = budget - fixed_bytes(sizes, batch=B, context=context)
        for p in usable:
            slots = min(offload_slots(room, sizes, p), L * sizes.num_experts - 1)
            if slots < 1:
                continue
            for policy in POLICIES:
                for prefetch in PREFETCHERS:
                    for assist in ((False, True) if device == "cuda" and p == FLOAT else (False,)):
                        off = PlanOffload(tier="disk" if device == "cpu" else "cpu", cache_experts=slots,
                                          scope="global", policy=policy, prefetch=prefetch, cpu_assist=assist)
                        for kernel in (float_kernels if p == FLOAT and not assist else ["reference"]):
                            out.append(_Candidate((p,) * L, kernel, False, B, off))
    return out


def _predict(c: _Candidate, views: dict[int, Any], prefill: Any, sizes: ModelSizes, profile: MachineProfile,
             quality: QualityModel | None, context: int, free_bytes: int = 0,
             from_checkpoint: bool = False, speed: MachineSpeed = MachineSpeed()) -> Prediction:
    """Step 5 (`views`: the decode trace per batch size, and at 1; one object each, so the simulator's
    step grouping is computed once; `prefill`: `routes.after_decode` of the trace, the prompts after its
    batch-1 decode; `free_bytes`: memory free when planning, of which what the plan does not take holds
    a disk tier's pages; `from_checkpoint`: the load peak is priced, `_load_peak`; `speed`: the
    machine's speed now, step 2: decode simulated at its decode figure, prefill at its prompt one)."""
    memory = _memory(sizes, c, context)
    peak = _load_peak(sizes, c, context) if from_checkpoint else 0
    cache = max(0, free_bytes - memory)

    def run(view: Any, at: float) -> Any:
        return simulate_plan(view, sizes, profile, c.precisions, kernel=c.kernel, fp32_weights=c.fp32,
                             offload=c.offload, page_cache_bytes=cache, speed=at)
    dec = run(views[c.batch], speed.decode)
    # the prompts as they meet the expert cache in use, after a generation's decode (prompt speed for both
    # runs: only the prompts' difference counts); until the nineteenth session they met an empty cache,
    # which priced offloaded plans' prompts 4-8% slower (Mixtral-8x7B shape, 12-15 slots) to 21% (the
    # shipped model, 31 slots) than after decode
    before = dec if (c.batch, speed.prompt) == (1, speed.decode) else run(views[1], speed.prompt)
    pre_s = run(prefill, speed.prompt).time_s - before.time_s
    lossless = all(p == FLOAT for p in c.precisions)
    loss = 0.0 if lossless else (quality.loss(c.precisions) if quality is not None else None)
    bpb = None
    if quality is not None:
        bpb = quality.base_bpb + (0.0 if lossless else quality.delta_bpb(c.precisions))
    return Prediction(decode_tok_s=dec.tokens_per_s, prefill_tok_s=views[1].num_tokens / pre_s,
                      memory_bytes=memory, quality_loss=loss, bits_per_byte=bpb,
                      step_ms=1e3 * dec.time_s / max(1, dec.steps),
                      hit_rate=dec.hit_rate if c.offload is not None else None, load_peak_bytes=peak,
                      machine_speed=speed.prompt, machine_decode_speed=speed.decode)


def _load_for_measurement(path: Any, sizes: ModelSizes) -> Any:
    """The model in fp32 on the CPU when it (and one quantized copy) fits comfortably in free memory."""
    need = 2 * sizes.total_bytes * 4 // sizes.dtype_bytes
    if need > available_memory("cpu") // 2:
        return None

    return load(path, dtype="float32", progress=False)


def _calibration_ids(model: Any, text: Any, max_bytes: int = 65536) -> list[int]:
    data = as_eval_text(text)
    return model.tokenizer.encode(data.text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore"))


def plan(model_or_path: Any, budget: int | str, *, device: str = "cpu", max_quality_loss: float = 0.01,
         objective: str = "latency", trace: Any = None, calibration: Any = None,
         precisions: Sequence[str] = DEFAULT_PRECISIONS, context: int = 1024,
         batch_sizes: Sequence[int] = BATCH_SIZES, profile: MachineProfile | None = None,
         quality: QualityModel | None = None, quality_from: Any = None, probe: bool = True,
         progress: bool = False) -> Plan:
    """The best configuration of `model_or_path` (a loaded MoEModel, a checkpoint folder or a shipped
    model name) in `budget` bytes (an int, or "8GB") on `device`; steps in the module docstring.

    max_quality_loss: the largest predicted relative bits-per-byte increase allowed (0.01 = 1%);
    trace: a routing trace (.npz path or RoutingTrace) to price routing with; calibration: the text
    the quality model and routing are measured on (a dataset name or file; default "english");
    profile / quality: use these instead of measuring (tests, a profile from another machine; a given
    profile prices with the costs it holds for this model's shape, if any: `with_shape_costs`);
    quality_from: a model (path or shipped name) whose measured quality stands in when this one's cannot
    be measured (it does not fit in memory to measure): quantized precisions are then considered;
    probe: with this machine's profile holding costs for the model's shape, scale the predictions by the
    machine's speed on that shape now (moeinfer.planning.speed_probe; a second or two, ~20 s on a
    Mixtral-8x7B-shaped model).
    """
    if objective not in OBJECTIVES:
        raise PlanError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if device not in ("cpu", "cuda"):
        raise PlanError(f"device must be cpu or cuda, got {device!r}")
    if not 0 <= max_quality_loss < 1:
        raise PlanError(f"max_quality_loss is a fraction (0.01 = 1%), got {max_quality_loss}")

    precisions = tuple(dict.fromkeys(precisions))
    for p in precisions:
        if p != FLOAT:
            layer_quantizer(p)  # a clear error for an unknown precision, before anything is measured
    if FLOAT not in precisions:
        precisions = (FLOAT, *precisions)
    budget_bytes = parse_budget(budget)
    notes: list[str] = []
    # 1. sizes
    loaded = model_or_path if isinstance(model_or_path, MoEModel) else None
    if loaded is not None:
        sizes = sizes_from_model(loaded)
        name = str(loaded.source_dir) if getattr(loaded, "source_dir", None) else sizes.name
    else:
        sizes = sizes_from_checkpoint(model_or_path)
        name = os.fspath(model_or_path)
    context = min(context, sizes.max_context)
    # memory free now, before anything is loaded to measure: what a plan leaves of it caches a disk tier
    free_bytes = available_memory("cpu") if device == "cpu" else 0
    # 2. machine
    if profile is None:
        profile = machine_profile(device, variants=tuple(p for p in precisions if p != FLOAT), progress=progress)
        profile = with_shape_costs(profile, config_of(model_or_path), sizes.dtype, progress=progress)
    notes.append(f"machine profile {profile.key} ({profile.cpu}, {profile.threads} threads; {profile.measured})")
    speed = MachineSpeed()
    shape = profile.shapes.get(sizes.shape_key) if sizes.shape_key else None
    if probe and shape is not None and profile.key == machine_key(device):
        speed = machine_speed(profile, sizes, config_of(model_or_path), device)
        notes.append(f"the machine runs this model's shape at {speed.prompt:.2f}x its profile's speed on prompts "
                     f"and {speed.decode:.2f}x on decode steps now (a probe on the shape): predictions scaled by them")
    if profile.cached_link_gbps is not None and device == "cpu":
        notes.append(f"{free_bytes / 1e9:.1f} GB free when planned: what a plan leaves of it holds a disk tier's "
                     f"pages (read at {profile.cached_link_gbps:.1f} GB/s, the disk at {profile.link_gbps:.2f})")
    if profile.read_overlap is not None and not profile.overlaps_reads():
        notes.append(f"a disk tier's reads priced as not overlapping expert compute (the profile found "
                     f"{profile.read_overlap:.0%} of a read hidden behind it)")
    # 3. routing and quality
    wants_quality = quality is None and any(p != FLOAT for p in precisions)
    model = loaded
    if model is None and (trace is None or wants_quality):
        model = _load_for_measurement(model_or_path, sizes)
    text = calibration if calibration is not None else "english"
    stand_in = wants_quality and model is None and quality_from is not None
    if wants_quality and model is not None:
        if loaded is None:
            quality = cached_quality(model_or_path, model, text, precisions, progress=progress)
        else:
            quality = measure_quality(model, text, precisions, progress=progress)
    elif stand_in:  # too big to measure: another model's loss stands in
        source = load(quality_from, dtype="float32", progress=False)
        quality = stand_in_quality(sizes.num_layers, cached_quality(quality_from, source, text, precisions,
                                                                    progress=progress), name=str(quality_from))
        del source
    if quality is not None and stand_in:
        notes.append(f"quality not measured on this model (it does not fit in memory for measurement): "
                     f"{quality.source}; uniform " + ", ".join(f"{p} +{quality.loss([p] * sizes.num_layers):.2%}"
                                                         for p in quality.fit))
    elif quality is not None:
        notes.append(f"quality measured on {quality.source}: bpb {quality.base_bpb:.4f} at {FLOAT}; uniform "
                     + ", ".join(f"{p} {b:.4f}" for p, b in quality.fit.items()) + f"; slope {quality.alpha:.4g}")
    elif any(p != FLOAT for p in precisions):
        notes.append("quality not measured (the model does not fit in memory for measurement): only "
                     f"{FLOAT} experts considered (quality_from / --quality-from: another model's loss stands in)")
        precisions = (FLOAT,)
    if trace is not None:
        trace = as_trace(trace, "trace")
        notes.append(f"routing from the trace {trace.meta.get('source') or trace.meta.get('model') or 'given'}")
    elif model is not None and model.tokenizer is not None:
        trace = routes.record(model, _calibration_ids(model, text))
        notes.append(f"routing recorded on the calibration text ({trace.num_tokens} tokens)")
    else:
        trace = routes.uniform(num_layers=sizes.num_layers, num_experts=sizes.num_experts, top_k=sizes.top_k)
        notes.append("routing assumed uniform (no trace given, model not loaded): caches are predicted pessimistically")
    if (trace.num_layers, trace.num_experts) != (sizes.num_layers, sizes.num_experts):
        raise PlanError(f"the routing trace has {trace.num_layers} MoE layers x {trace.num_experts} experts; "
                        f"the model {sizes.num_layers} x {sizes.num_experts}")
    if trace.num_tokens > MAX_SIM_TOKENS:
        trace = routes.first_sequences(trace, MAX_SIM_TOKENS)
    # 4. candidates
    batches = (1,) if objective == "latency" else tuple(batch_sizes)
    views = {B: routes.batched(trace, B) for B in (1, *batches)}
    prefill_view = routes.after_decode(trace)
    cands = _resident_candidates(views, sizes, profile, quality, precisions, budget_bytes, max_quality_loss,
                                 batches, context)
    cands += _offload_candidates(sizes, device, budget_bytes, batches, context, precisions, quality,
                                 max_quality_loss, profile)
    cands = list(dict.fromkeys(cands))
    if not cands:
        floor = fixed_bytes(sizes, batch=1, context=context) + expert_bytes(sizes, FLOAT)
        raise PlanError(f"nothing fits in {budget_bytes:,} bytes: dense weights, a {context}-token KV cache, working "
                        f"memory and one expert take {floor:,} bytes")
    # 5. predict and rank
    scored = []
    from_checkpoint = loaded is None  # built by load_planned, which quantizes while loading
    for c in cands:
        pred = _predict(c, views, prefill_view, sizes, profile, quality, context, free_bytes, from_checkpoint, speed)
        if pred.memory_bytes <= budget_bytes:
            scored.append((c, pred))
    scored = _rank(scored)
    plans: list[Plan] = []
    for c, pred in scored:
        p = Plan(model=name, device=device, budget_bytes=budget_bytes, objective=objective, precisions=c.precisions,
                 offload=c.offload, kernel=c.kernel, fp32_weights=c.fp32, batch_size=c.batch, predicted=pred)
        if all(p.describe() != q.describe() for q in plans):
            plans.append(p)
        if len(plans) == 4:
            break
    peak = plans[0].predicted.load_peak_bytes if plans[0].predicted else 0
    if peak > budget_bytes:
        notes.append(f"loading this plan from the checkpoint (load_planned) peaks at {peak / 1e9:.2f} GB, above the "
                     f"budget: its quantized layers are quantized while loading, one layer of float experts at a time, "
                     f"beside the quantized experts held; load it where that much memory is free")
    return replace(plans[0], notes=tuple(notes), runners_up=tuple(plans[1:]))


TIE = 0.05  # predicted decode and prefill rates within 5% of the fastest's: a tie (step 5)


def _rank(scored: list[tuple[Any, Prediction]]) -> list[tuple[Any, Prediction]]:
    """Step 5's order: by predicted decode tokens/s, except that the candidates within `TIE` of the fastest
    in decode and in prefill come first by quality loss (not measured: last), then speed, then memory.
    On this project's development VM one configuration's measured rate moves 10-25% between
    half-minutes, and the planner had picked int8 or mixed int4/int8 plans over lossless bf16 for 1-5%
    predicted gains that measured 0.86-0.95x of the bf16 plan. A tie in decode alone is not one: the
    shipped model's bf16 plan, predicted 4% behind int4 in decode and 39% in prefill, won the tie by
    quality and measured 0.93-0.96x int4's decode and 0.55-0.64x its prefill (fifteenth session)."""
    ranked = sorted(scored, key=lambda cp: (-cp[1].decode_tok_s, cp[1].memory_bytes))
    if not ranked:
        return ranked
    fastest = ranked[0][1]
    floor, prefill_floor = (1.0 - TIE) * fastest.decode_tok_s, (1.0 - TIE) * fastest.prefill_tok_s
    tied = [cp for cp in ranked if cp[1].decode_tok_s >= floor and cp[1].prefill_tok_s >= prefill_floor]
    rest = [cp for cp in ranked if cp not in tied]
    tied.sort(key=lambda cp: (float("inf") if cp[1].quality_loss is None else cp[1].quality_loss,
                              -cp[1].decode_tok_s, cp[1].memory_bytes))
    return tied + rest


