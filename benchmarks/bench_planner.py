"""Planner benchmark: predicted vs measured decode/prefill tokens/s and quality for the plans
`moeinfer plan` chooses (and its runners-up) at several memory budgets, on the shipped model or on a
real-shape random-weight model whose routing is replayed from a real routing trace.

    PYTHONPATH=. python benchmarks/bench_planner.py [--model tiny] [--budgets auto | 80MB,120MB,...]
        [--tokens 32] [--rounds 21] [--max-bytes 16384] [--out planner-bench.json]
    PYTHONPATH=. python benchmarks/bench_planner.py --real-shape mixtral [--budgets auto] [--tokens 8] [--rounds 3]
        [--prefill-tokens N] [--float-only]

For each budget (default: three budgets from the model's own sizes: a few float experts over the
fixed memory, half the float experts, all of them), plan with the default settings, then for the
chosen plan, its `--runners` runners-up and the issue's baselines that fit the budget (`baselines`:
the default, a `--fit`-like memory-only rule, uniform int4, for the "at least as fast as the best of
them" check):
1. load each configuration (`apply_plan_`; a real-shape model: `load_planned`, experts left in the
   checkpoint, and `replay_routing_` of the trace the plan was priced with), warm it up;
2. time it in `--rounds` rounds, each a greedy generation of `--tokens` tokens from a prompt of
   `PROMPT_TOKENS` held-out tokens (the length of the planner's prefill sequences): a decode step is
   the time from one decode forward's start to the next's (as a generation runs it, the loop's own work
   included, as the planner's decode figures are measured), a prefill the prompt forward's own time
   (`forward_seconds`; until the seventeenth session both came from moeinfer.bench.instrument, whose
   routing observers added 13% to the shipped model's decode steps). The configurations of a budget are
   *interleaved*: round r runs every configuration once, starting at a different one each round, so
   a change of load on the machine touches all of them alike. Each round (and --real-shape's separate
   prefill forward) runs right after `SETTLE_TOKENS` untimed tokens of the same configuration
   (`Runner.settle`, since the eighteenth session), as a user's next request meets the model;
3. the statistic (why: docs/planner.md, "The planner benchmark"): a round's decode tokens/s is its
   decode tokens over the sum of its decode steps' times (the mean step, cache misses included, not
   the median or the fastest step: an offloaded plan's steps differ by their misses, and the planner
   predicts their mean); the reported figure is the median round (until the fifteenth session the
   best round, recorded beside it: on the Intel VM one to three rounds in 21 ran 1.3-1.7x faster for
   every configuration at once, a passing fast phase of the machine, and the best round was that
   phase). Prefill alike: prompt tokens / the prefill forward's time, median round, of a
   forward of the prompt run again right after the round's generation (the model warm, as a loaded
   model meets its next request); the generation's own prefill, the configuration's first forward
   after the others of the round ran, is recorded beside it (`prefill_first_tok_s`): on the Intel
   machine it ran 10-40% slower in that position, and the machine profile prices warm forwards;
4. quality (the shipped model): bits per byte on the held-out english text (`moeinfer.evaluate`,
   first `--max-bytes` bytes, fp32 compute on the CPU like `moeinfer eval`) against the
   unquantized model (plans whose experts all stay in float keep the weights: loss 0 without an
   evaluation);
5. print a table and write everything, with the machine profile and load average, as JSON; beside each
   budget's timings, the machine's memory read rate (against the profile's, the same measurement) and fp32
   matmul rate measured just before and just after them (`machine_now`): a VM whose speed drifts shows
   it there. Those rates did not follow the Intel VM's swings (the same plan's decode doubled within 20
   minutes while the read rate moved 17 -> 22 GB/s), so beside them the planner's probe on the model's
   own shape (`ShapeProbe`, moeinfer.planning.speed_probe `Probe`): the shape's 1-layer model with one
   layer of int4 experts, its prompt forward right after decode steps against the cost model's price
   of it, and the same model's one-token decode step with stubbed experts against the shape's.
6. the same probe, short (`ROUND_PROBES` rounds), right before every round of every configuration: the
   planner scales its predictions by the speed its probe read at plan time, and the machine moves in the
   minutes between plan and timings (sixteenth session, run o: the probe read 0.88x then 0.57-0.65x of the
   profile around timings planned at a faster reading). Each figure is also reported at the speed the
   planner probed (`*_ratio_probed`: the median over rounds of the round's figure over its probe's
   speed, times the planner's speed, against the prediction), which takes the drift out and leaves the
   cost model's error; the plain ratio (`*_ratio`, what the issue's target reads) stays beside it.

`--real-shape mixtral`: a random-weight Mixtral-8x7B-shaped checkpoint cut to `--layers` (default
2: 6.3 GB of bf16 weights, 5.6 GB of them experts) is written once under benchmarks/.planner_real/
(`moeinfer init`, streamed; reused when present); the real Mixtral-8x7B-Instruct routing
(`$MOEINFER_MIXTRAL_TRACES`, default ../shared/data/traces/mixtral-8x7b-instruct/, both files) cut to
its first `--layers` MoE layers is both the planner's `trace` and the routing replayed while
measuring. Only speed is measured: the weights are random, so a quality loss means nothing.
- Precisions: unless `--float-only`, the planner may quantize (int8, int4) and the uniform-int4
  baseline is measured: `load_planned` quantizes while loading (one layer of float experts in memory
  at a time, so a checkpoint bigger than memory takes quantized plans too), then offloads when the plan
  does (its expert store in a temporary folder under benchmarks/.planner_real/, removed after). The
  planner cannot measure quality on random weights, so it is given `stand_in_quality`
  (moeinfer.planning.quality): each precision costs the loss measured for it on the shipped model, and
  --max-quality-loss acts as it does there. bf16 plans are loaded with the experts left in the checkpoint.
- Budgets (`default_budgets`): with quantized plans, below uniform int4 (only the --fit-like rule
  fits), just above it, and with every float expert resident (the default fits).
- Decode: its prompt is one token (`REAL_PROMPT_TOKENS`), so every forward replays one trace row, as
  the planner's decode view prices them: a prompt of several rows runs as one forward that loads every
  expert its rows use, which had flushed a small cache before each round's decode (at 6 of 16 slots,
  a live hit rate of 29% against 38-42% simulated: tests/plan/test_plan_replay_hits.py).
- Prefill: one separate forward of `--prefill-tokens` tokens (default: the mean length of the trace's
  sequences the plans' prefill predictions price, `prefill_length`; until the eighteenth session the
  shipped model's 64 tokens) per configuration, after its rounds (`Runner.prefill`: it
  replays the trace's first rows and puts the replay cursor back), so the decode rounds are unchanged;
  one forward, not the best of several (a second would meet the cache the first left).
- Each configuration (baselines too) also gets the cost model's figures for the rows its rounds and
  its prefill forward replayed (`replayed_prediction`; JSON `predicted_replayed`,
  `decode_ratio_replayed`, `prefill_ratio_replayed`): the rounds replay the trace's first rows only,
  and the plan's own prefill prediction prices the trace's four prompts (78-252 tokens) in one
  forward each, so these separate the cost model's error from the workload's.
Its configurations are measured one after the other (each holds up to its budget of memory, a
quantized one also one layer of float experts while it is quantized), rounds in a row.
Timing numbers from a shared or busy machine are not results: the script records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


PROMPT_TOKENS = 64
ROOT = Path(__file__).resolve().parents[1]
REAL_DIR = ROOT / "benchmarks" / ".planner_real"
# --real-shape name -> (moeinfer init shape preset, routing trace folder, its files)
REAL_SHAPES = {"mixtral": ("Mixtral-8x7B", "mixtral-8x7b-instruct", ("humaneval_2_routing.jsonl",
                                                                      "gsm8k_2_routing.jsonl"))}
REAL_PROMPT_TOKENS = 1  # --real-shape: one row per forward, the planner's decode view (module docstring)
WARM_UP_TOKENS = 4
# tokens a configuration generates, untimed, right before each round and its separate prefill forward:
# a timed generation or prompt meets the model right after its own decode steps, as a user's next request
# does and as the planner prices a prompt (shape_costs.AFTER_STEPS), not right after the probe's models or
# another configuration ran (eighteenth session: on the Mixtral shape the same int4 prompt took ~570 ms
# right after the probe, 380-440 ms after the model's own steps)
SETTLE_TOKENS = 16
ROUND_PROBES = 2  # step 6: probe rounds beside each configuration's round


@contextmanager
def forward_seconds(model: Any) -> Iterator[list[tuple[int, float, float]]]:
    """(rows x tokens, start, seconds) of every forward of `model` in the block: the clock read before
    and after each, nothing else (step 2: moeinfer.bench.instrument's routing observers added ~0.3 ms
    to each of the shipped model's int4 decode steps, 13% of them, which a user's generation does not
    pay)."""
    records: list[tuple[int, float, float]] = []
    started: list[tuple[int, float]] = []

    def sync() -> None:
        if model.device.type == "cuda":
            import torch

            torch.cuda.synchronize(model.device)

    def pre(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        sync()
        started.append((ids.numel(), time.perf_counter()))

    def post(_module: Any, _args: Any, _kwargs: Any, _out: Any) -> None:
        sync()
        n, t0 = started.pop()
        records.append((n, t0, time.perf_counter() - t0))
    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


class Runner:
    """One configuration, loaded and warmed up; `round()` generates once and returns its timings."""

    def __init__(self, load: Callable[[], Any], plan: Any, prompt: list[int], *, trace: Any = None,
                 cleanup: Callable[[], None] | None = None) -> None:
        import moeinfer
        from moeinfer.offload.replay import replay_routing_

        self.cleanup = cleanup  # called by close(): e.g. removing a quantized plan's expert store
        self.model = load()
        self.plan, self.prompt = plan, prompt
        self.cursor = replay_routing_(self.model, trace, wrap=True) if trace is not None else None
        moeinfer.generate(self.model, [prompt], max_new_tokens=WARM_UP_TOKENS, ignore_eos=True)  # warm-up

    def round(self, tokens: int) -> dict[str, float]:
        import moeinfer

        B = self.plan.batch_size
        cache = getattr(getattr(self.model, "offload", None), "cache", None)
        before = (cache.stats.hits, cache.stats.misses) if cache is not None else None
        with forward_seconds(self.model) as forwards:
            moeinfer.generate(self.model, [self.prompt] * B, max_new_tokens=tokens, ignore_eos=True)
        # a decode step as a generation runs it: from one decode forward's start to the next's (no
        # `on_token`: a callback makes `generate` detokenize every token, which the planner does not price)
        starts = [t0 for _, t0, _ in forwards[1:]]
        dec = [b - a for a, b in zip(starts, starts[1:])]
        first = forwards[0][0] / forwards[0][2] if forwards else float("nan")
        out = {"decode_tok_s": B * len(dec) / sum(dec) if dec else float("nan"), "prefill_tok_s": first,
               "fastest_decode_step_tok_s": B / min(dec) if dec else float("nan")}
        if cache is not None and before is not None:  # the live cache's hit rate (prefill and decode)
            hits, misses = cache.stats.hits - before[0], cache.stats.misses - before[1]
            out["hit_rate"] = hits / max(1, hits + misses)
        if self.cursor is None and B == 1:  # step 3: the prompt again, the model warm from its generation
            out["prefill_first_tok_s"] = first
            out["prefill_tok_s"] = self.prefill(self.prompt)
        return out

    def settle(self) -> None:
        """`SETTLE_TOKENS` tokens generated untimed (routing replayed: the trace's next rows)."""
        import moeinfer

        moeinfer.generate(self.model, [self.prompt], max_new_tokens=SETTLE_TOKENS, ignore_eos=True)

    def prefill(self, prompt: list[int]) -> float:
        """Prefill tokens/s of one forward of `prompt`, on its own (after the rounds: they are unchanged).
        With routing replayed, the forward replays the trace's first len(prompt) rows and the cursor is
        put back after it (`replayed_prediction` prices exactly that forward)."""
        import moeinfer

        at = self.cursor.next if self.cursor is not None else 0
        if self.cursor is not None:
            self.cursor.next = 0
        try:
            with forward_seconds(self.model) as forwards:
                moeinfer.generate(self.model, [prompt], max_new_tokens=1, ignore_eos=True)
        finally:
            if self.cursor is not None:
                self.cursor.next = at
        return forwards[0][0] / forwards[0][2] if forwards else float("nan")

    def runs_as(self) -> str:
        """What this configuration runs once loaded: per MoE layer its experts' module, kernel (a plan's
        'auto' resolved) and widths, the dense path's linear, the offload runtime's slots and policy.
        Two plans that read differently ('kernel auto' and 'kernel cpu' where auto picks cpu) run the
        same model when these are equal: their measured ratio is then noise."""
        layers = [(type(b.experts).__name__, getattr(b.experts, "kernel", None),
                   tuple(sorted(set(getattr(b.experts, "bits", ()) or ()))),
                   bool(getattr(b.experts, "fp32_weights", False))) for b in self.model.moe_blocks()]
        attn = getattr(self.model.layers[0], "self_attn", None)
        dense = type(getattr(attn, "q_proj", None)).__name__
        off = getattr(self.model, "offload", None)
        slots = None if off is None else (off.cache.num_slots, off.config.policy, off.config.prefetch, off.config.scope)
        return repr((layers, dense, slots))

    def close(self) -> None:
        import gc

        off = getattr(self.model, "offload", None)
        if off is not None:
            off.close()
        del self.model
        gc.collect()  # the next configuration may need this one's memory (real-shape models)
        if self.cleanup is not None:
            self.cleanup()


def replayed_prediction(plan: Any, model_name: str, trace: Any, profile: Any, *, rounds: int,
                        tokens: int, prefill_tokens: int = 0, speed: float = 1.0,
                        decode_speed: float = 1.0) -> dict[str, float]:
    """--real-shape: the cost model's decode tokens/s and hit rate for the rows the rounds replayed (the
    warm-up's WARM_UP_TOKENS rows, then per round `Runner.settle`'s SETTLE_TOKENS untimed rows and its
    `tokens` timed ones, one row per forward, wrapping), beside the plan's prediction for the whole trace:
    the rows differ (a few dozen of its hundreds), so this separates the cost model's error from the
    trace's. A round's time is the simulated time up to its end less that up to its start (the same cache
    decisions up to there). `prefill_tokens` > 0: also the prefill tokens/s of the separate prefill
    forward `Runner.prefill` runs after the rounds and another settling (the trace's first
    `prefill_tokens` rows in one forward, the cache as those left it), as the time up to that forward's
    end less that up to its start. `speed`, `decode_speed`: the machine's speed on prompts and on decode
    steps the planner probed for this budget (`Prediction.machine_speed`, `machine_decode_speed`), at
    which the rows are simulated as the plans' own predictions are (`simulate_plan(speed=)`)."""
    import numpy as np

    from moeinfer.planning import routing as routes
    from moeinfer.planning.costs import simulate_plan
    from moeinfer.planning.sizes import available_memory, sizes_from_checkpoint

    sizes = sizes_from_checkpoint(model_name)
    kernel = plan.kernel
    if kernel == "auto":  # the default baseline: priced with the kernel 'auto' resolves to here
        from moeinfer.kernels.registry import resolve

        kernel = resolve("auto", "cpu").name
    per_round = SETTLE_TOKENS + tokens
    settled = WARM_UP_TOKENS + rounds * per_round + SETTLE_TOKENS  # the rows before the prefill forward
    rows = np.arange(settled) % trace.num_tokens
    # the memory the plan leaves free holds the disk tier's pages, as the planner prices it
    memory = plan.predicted.memory_bytes if plan.predicted is not None else 0
    page_cache = max(0, available_memory("cpu") - memory)

    def run(n: int, prompt: int = 0, at: float = decode_speed) -> Any:
        # n rows one per forward, then (prompt > 0) the trace's first `prompt` rows in one forward
        ids = np.concatenate([rows[:n], np.arange(prompt) % trace.num_tokens])
        step = np.concatenate([np.arange(n), np.full(prompt, n)])
        return simulate_plan(routes.forwards(trace, ids, step), sizes, profile, plan.precisions, kernel=kernel,
                             fp32_weights=plan.fp32_weights, offload=plan.offload, page_cache_bytes=page_cache,
                             speed=at)

    seconds = hits = misses = 0.0
    for r in range(rounds):
        start = WARM_UP_TOKENS + r * per_round + SETTLE_TOKENS
        a, b = run(start), run(start + tokens)
        seconds += b.time_s - a.time_s
        hits += b.cache["hits"] - a.cache["hits"]
        misses += b.cache["misses"] - a.cache["misses"]
    out = {"decode_tok_s": rounds * tokens / seconds, "hit_rate": hits / max(1, hits + misses)}
    if prefill_tokens > 0:
        before, pre = run(settled, at=speed), run(settled, prefill_tokens, at=speed)
        out["prefill_tok_s"] = prefill_tokens / (pre.time_s - before.time_s)
        hits, misses = pre.cache["hits"] - before.cache["hits"], pre.cache["misses"] - before.cache["misses"]
        out["prefill_hit_rate"] = hits / max(1, hits + misses)
    return out


# step 6: a round's figure -> the probe's speed that prices it (decode steps; prompts after decode steps)
PROBED = {"decode_tok_s": "probe_decode_speed", "prefill_tok_s": "probe_prompt_speed"}


def summarize(rounds: list[dict[str, float]], *, prefill: float | None = None,
              prefill_probe: dict[str, float] | None = None) -> dict[str, Any]:
    """Median and best round of each figure (module docstring, step 3). `prefill`: the tokens/s of a
    separate prefill forward (--real-shape), which then replaces the rounds' (one-token) prefill;
    `prefill_probe`: the probe taken right before it. Where the rounds carry the probe's speeds (step 6),
    each figure also at the profile's speed: the median over rounds of the figure over its probe's speed."""
    out: dict[str, Any] = {"rounds": rounds}
    for k in ("decode_tok_s", "prefill_tok_s", "prefill_first_tok_s"):
        vals = [r[k] for r in rounds if k in r]
        if vals:
            out[k] = statistics.median(vals)
            out[f"{k}_best_round"] = max(vals)
        at = [r[k] / r[PROBED[k]] for r in rounds if k in PROBED and k in r and PROBED[k] in r]
        if at:
            out[f"{k}_at_profile_speed"] = statistics.median(at)
    if prefill is not None:
        out["prefill_tok_s"] = out["prefill_tok_s_best_round"] = prefill
        out["prefill_separate_forward"] = True
        out.pop("prefill_tok_s_at_profile_speed", None)
        if prefill_probe is not None:
            out["prefill_tok_s_at_profile_speed"] = prefill / prefill_probe[PROBED["prefill_tok_s"]]
    out["decode_best_step_tok_s"] = max(r["fastest_decode_step_tok_s"] for r in rounds)
    if "hit_rate" in rounds[0]:
        out["hit_rate"] = statistics.mean(r["hit_rate"] for r in rounds)
    return out


def time_configs(configs: dict[str, Any], make: Callable[[Any], Runner], *, rounds: int, tokens: int,
                 interleave: bool, prefill_prompt: list[int] | None = None,
                 probe: Callable[[], dict[str, float]] | None = None) -> dict[str, dict[str, Any]]:
    """Step 2 for the configurations of one budget (name -> plan): name -> `summarize` of its rounds.
    Each round and the separate prefill forward run right after `Runner.settle` (the configuration's own
    untimed decode steps: a timed generation meets the model as a user's next request does, not right
    after the probe or another configuration). `prefill_prompt` (not interleaved only): one prefill
    forward of it per configuration, after its rounds (`Runner.prefill`), so the rounds see the cache
    exactly as without it. `probe` (step 6): called right before each settling and round (and before
    the settling and separate prefill forward), its speeds kept with that round."""
    names = list(configs)
    got: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    pre: dict[str, float] = {}
    pre_probe: dict[str, dict[str, float]] = {}
    if interleave and prefill_prompt is not None:
        raise ValueError("a separate prefill forward is measured only with interleave=False")
    runs_as: dict[str, str] = {}

    def probed(run: Runner, call: Callable[[], Any]) -> tuple[dict[str, float], Any]:
        """The probe, then the configuration's settling, then the timed `call`."""
        speeds = probe() if probe is not None else {}
        run.settle()
        return speeds, call()

    def one_round(run: Runner) -> dict[str, float]:
        speeds, out = probed(run, lambda: run.round(tokens))
        return {**out, **speeds}
    if interleave:
        runners = {n: make(configs[n]) for n in names}
        runs_as = {n: run.runs_as() for n, run in runners.items()}
        try:
            for r in range(rounds):
                for i in range(len(names)):
                    n = names[(r + i) % len(names)]  # each round starts at another configuration
                    got[n].append(one_round(runners[n]))
        finally:
            for run in runners.values():
                run.close()
    else:
        for n in names:
            run = make(configs[n])
            runs_as[n] = run.runs_as()
            try:
                got[n] = [one_round(run) for _ in range(rounds)]
                if prefill_prompt is not None:
                    pre_probe[n], pre[n] = probed(run, lambda: run.prefill(prefill_prompt))
            finally:
                run.close()
    return {n: {**summarize(got[n], prefill=pre.get(n), prefill_probe=pre_probe.get(n) or None),
                "runs_as": runs_as[n]} for n in names}


def distinct_configs(configs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the configurations to measure, name -> the earlier name it duplicates): a baseline that is the
    chosen plan itself (`describe()` equal: precisions, placement, cache, kernel, batch) is measured once
    and reported with its twin's figures (--real-shape: each load of a quantized configuration costs
    minutes of quantization)."""
    first: dict[str, str] = {}
    same: dict[str, str] = {}
    for name, p in configs.items():
        key = p.describe()
        if key in first:
            same[name] = first[key]
        else:
            first[key] = name
    return {n: p for n, p in configs.items() if n not in same}, same


def quality(model_name: str, plan: Any, *, max_bytes: int, base_bpb: float) -> dict[str, Any]:
    """Step 4: measured quality loss of `plan` (0 without an evaluation for float experts)."""
    import moeinfer

    if all(p == "bf16" for p in plan.precisions):  # offloading and kernels do not change the weights
        return {"bits_per_byte": base_bpb, "quality_loss": 0.0,
                "quality_note": "float experts: the unquantized model's bits per byte"}
    qmodel = moeinfer.load(model_name, progress=False, dtype="float32")
    moeinfer.apply_plan_(qmodel, plan)
    bpb = moeinfer.evaluate(qmodel, "english", max_bytes=max_bytes, progress=False).bits_per_byte
    off = getattr(qmodel, "offload", None)
    if off is not None:
        off.close()
    return {"bits_per_byte": bpb, "quality_loss": (bpb - base_bpb) / base_bpb}


def baselines(model_name: str, budget: int, *, quantized: bool = True) -> dict[str, Any]:
    """The issue's comparison points at `budget` (those that fit by the planner's memory model):
    (a) the default: every expert resident in float, kernel auto; (b) a memory-only rule like
    llama.cpp's --fit: float weights, experts spilled to the slow tier with every slot the budget
    leaves (with the transient buffer, as the planner counts memory) in a plain LRU cache, run by the
    kernel 'auto' picks here (as the default is: llama.cpp's --fit keeps its fast kernels; until
    session 6 this rule ran 'reference', which flattered the planner where the native kernels are
    built); (c) uniform int4, resident (not with `quantized=False`)."""
    from moeinfer.kernels.registry import resolve
    from moeinfer.planning import Plan, PlanOffload
    from moeinfer.planning.costs import expert_bytes, fixed_bytes
    from moeinfer.planning.planner import offload_slots
    from moeinfer.planning.sizes import sizes_from_checkpoint

    s = sizes_from_checkpoint(model_name)
    fixed = fixed_bytes(s, batch=1, context=min(1024, s.max_context))
    n, L = s.num_layers * s.num_experts, s.num_layers
    common = dict(model=model_name, device="cpu", budget_bytes=budget, objective="latency")
    out: dict[str, Any] = {}
    if fixed + n * expert_bytes(s, "bf16") <= budget:
        out["default"] = Plan(precisions=("bf16",) * L, kernel="auto", **common)
    else:
        slots = offload_slots(budget - fixed, s, "bf16")  # with the transient buffer, as the planner counts
        if slots >= 1:
            out["fit-rule"] = Plan(precisions=("bf16",) * L, kernel=resolve("auto", "cpu").name,
                                   offload=PlanOffload(tier="disk", cache_experts=slots, policy="lru"), **common)
    if quantized and fixed + n * expert_bytes(s, "int4") <= budget:
        out["uniform-int4"] = Plan(precisions=("int4",) * L, kernel="auto", **common)
    return out


def default_budgets(model_name: str, *, real_shape: bool = False, quantized: bool = True) -> list[int]:
    """The fixed memory plus experts, n of them in the model:
    - the shipped model: k = n/8, n/2 and n + 1 float experts (the last: every expert resident);
    - a real-shape one with quantized plans (`quantized`): three budgets at which the issue's baselines
      differ: 3/4 of the experts in int4 (below uniform int4: only the --fit-like rule fits), all of
      them in int4 + 1 float expert (uniform int4 fits, and the --fit-like rule), and n + 1 float
      experts (the default fits, and uniform int4);
    - a real-shape one, float experts only: n/5, 3n/8 and 5n/8 float experts (all offloaded, each
      under ~5 GB for the 2-layer Mixtral shape)."""
    from moeinfer.planning.costs import expert_bytes, fixed_bytes
    from moeinfer.planning.sizes import sizes_from_checkpoint

    s = sizes_from_checkpoint(model_name)
    fixed = fixed_bytes(s, batch=1, context=min(1024, s.max_context))
    one = expert_bytes(s, "bf16")
    n = s.num_layers * s.num_experts
    if real_shape and quantized:
        int4 = n * expert_bytes(s, "int4")
        return [int(fixed + b) + 1 for b in (0.75 * int4, int4 + one, (n + 1) * one)]
    counts = (max(2, n // 5), 3 * n // 8, 5 * n // 8) if real_shape else (max(2, n // 8), n // 2, n + 1)
    return [int(fixed + k * one) + 1 for k in counts]


def real_shape_model(name: str, *, layers: int, traces: Path, progress: bool = True) -> tuple[Path, Any]:
    """(checkpoint, routing trace) of `--real-shape name`: the random-weight checkpoint under
    REAL_DIR, written once (reused when present), and the real trace cut to its MoE layers."""
    from moeinfer.loading.random_init import init_checkpoint
    from moeinfer.planning import routing as routes
    from moeinfer.traces.convert import convert_mixtral

    shape, folder, files = REAL_SHAPES[name]
    path = REAL_DIR / f"{shape.lower()}-{layers}l"
    if not (path / "config.json").is_file():
        init_checkpoint(path, shape=shape, layers=layers, progress=progress)
    missing = [f for f in files if not (traces / f).is_file()]
    if missing:
        raise SystemExit(f"routing trace files {missing} not found in {traces} (set MOEINFER_MIXTRAL_TRACES or "
                         "--traces to the folder of the real Mixtral-8x7B-Instruct traces)")
    trace = routes.layers(convert_mixtral([traces / f for f in files]), list(range(layers)))
    return path, trace


def prefill_length(trace: Any) -> int:
    """--real-shape's default prefill forward: the mean length of the sequences the plans' prefill
    predictions price (the planner keeps the trace's first whole sequences in `MAX_SIM_TOKENS` tokens,
    `routes.first_sequences`; each is one prompt forward). The cost model's prompt is linear in its
    tokens beyond its active experts' fixed costs, which a prompt of ~20 tokens or more pays in full: one
    forward of the mean length has the same predicted tokens/s. Until the eighteenth session the forward
    had the shipped model's 64 tokens, then (eighteenth) the mean of all the Mixtral trace's four
    sequences (78-252 tokens: 144) where the planner priced its first two (166 and 78: 122), and the
    offloaded plans' prompts measured 1.13-1.29x their prediction."""
    import numpy as np

    from moeinfer.planning import routing as routes
    from moeinfer.planning.planner import MAX_SIM_TOKENS

    _, counts = np.unique(routes.first_sequences(trace, MAX_SIM_TOKENS).seq, return_counts=True)
    return max(1, round(float(counts.mean())))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--real-shape", choices=sorted(REAL_SHAPES), default=None,
                    help="a random-weight real-shape model with real routing replayed, instead of --model")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers of the --real-shape model (default: 2)")
    ap.add_argument("--traces", type=Path, default=None,
                    help="folder of the real routing traces (default: $MOEINFER_MIXTRAL_TRACES, else "
                         "../shared/data/traces/mixtral-8x7b-instruct beside the checkout)")
    ap.add_argument("--budgets", default="auto")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per round (default: 32; --real-shape: 8)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration (default: 21; "
                                                               "--real-shape: 3)")
    ap.add_argument("--no-interleave", action="store_true",
                    help="time each configuration's rounds in a row (always so with --real-shape)")
    ap.add_argument("--max-bytes", type=int, default=16384)
    ap.add_argument("--max-quality-loss", type=float, default=0.01)
    ap.add_argument("--runners", type=int, default=None, help="runners-up measured per budget (default: 3; "
                                                                "--real-shape: 1)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the default / --fit-like / int4 baselines")
    ap.add_argument("--prefill-tokens", type=int, default=None,
                    help="--real-shape: tokens of the separate prefill forward measured after each configuration's "
                         "rounds (default: the trace's mean sequence length, what the plans' prefill predictions "
                         "price; 0: none)")
    ap.add_argument("--float-only", action="store_true",
                    help="--real-shape: plan float experts only (no quantization while loading)")
    ap.add_argument("--refresh-profile", action="store_true", help="measure the machine profile again first")
    ap.add_argument("--out", default="planner-bench.json")
    args = ap.parse_args(argv)
    real = args.real_shape is not None
    args.tokens = (8 if real else 32) if args.tokens is None else args.tokens
    # the shipped model: 21 short rounds, whose median a passing fast or slow phase of the VM leaves alone
    args.rounds = (3 if real else 21) if args.rounds is None else args.rounds
    args.runners = (1 if real else 3) if args.runners is None else args.runners
    if args.tokens < 2 or args.rounds < 1 or args.layers < 1 or args.runners < 0:
        ap.error("--tokens must be >= 2, --rounds and --layers >= 1, --runners >= 0")
    if not real and (args.prefill_tokens is not None or args.float_only):
        ap.error("--prefill-tokens and --float-only apply to --real-shape only (the shipped model's rounds prefill "
                 f"a {PROMPT_TOKENS}-token prompt and plan every precision)")
    if args.prefill_tokens is not None and args.prefill_tokens < 0:
        ap.error("--prefill-tokens must be >= 0")
    args.interleave = not (args.no_interleave or real)
    if real and args.traces is None:
        args.traces = Path(os.environ.get("MOEINFER_MIXTRAL_TRACES",
                                          ROOT.parent / "shared" / "data" / "traces" / REAL_SHAPES[args.real_shape][1]))
    return args


class ShapeProbe:
    """Step 5's probe: the machine's speed now on the planned model's shape, against the cost model
    (moeinfer.planning.speed_probe, what `moeinfer.plan` scales its predictions by): the probe model's
    prompt right after decode steps, and its one-token decode step."""

    def __init__(self, model_name: str, profile: Any) -> None:
        from moeinfer.planning.sizes import config_of, sizes_from_checkpoint
        from moeinfer.planning.speed_probe import Probe

        self.probe = Probe(profile, sizes_from_checkpoint(model_name), config_of(model_name), "cpu")

    def __call__(self, **rounds: Any) -> dict[str, Any]:
        """{prompt_s, profiled_prompt_s (the cost model's price), prompt_speed (priced / now: > 1 the machine
        is faster), decode_s, profiled_decode_s, decode_speed}; `rounds`: `probe_seconds`'s repeats and
        least_s (default: the planner's)."""
        prompt, decode = self.probe.seconds(**rounds)
        speed = self.probe.speed(prompt, decode)
        return {"prompt_s": prompt, "profiled_prompt_s": self.probe.priced[0], "prompt_speed": speed.prompt,
                "decode_s": decode, "profiled_decode_s": self.probe.priced[1], "decode_speed": speed.decode,
                "probe_experts": self.probe.variant or "stubbed"}

    def round(self) -> dict[str, float]:
        """Step 6: the same probe, `ROUND_PROBES` rounds after its warm-up one, beside one round of a
        configuration: {probe_prompt_speed, probe_decode_speed}."""
        got = self(repeats=ROUND_PROBES, least_s=0.0)
        return {"probe_prompt_speed": got["prompt_speed"], "probe_decode_speed": got["decode_speed"]}


def _fmt(x: float | None, width: int = 8) -> str:
    return f"{x:{width}.2f}" if x is not None else " " * (width - 1) + "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a run stopped by SIGTERM exits as on Ctrl-C, so its temporary expert stores are removed (a killed
    # Mixtral-shape run had left 757 MB under benchmarks/.planner_real/)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    import moeinfer
    from moeinfer.eval.datasets import load_dataset
    from moeinfer.planning.planner import DEFAULT_PRECISIONS, parse_budget
    from moeinfer.planning.profile import host_rates, machine_profile
    from moeinfer.planning.shape_profile import with_shape_costs
    from moeinfer.planning.sizes import config_of, sizes_from_checkpoint

    t_start = time.perf_counter()
    real = args.real_shape is not None
    profile = machine_profile("cpu", variants=("int8", "int4"), refresh=args.refresh_profile, progress=True)
    quantized, quality_model, prefill_prompt = True, None, None
    if real:
        from moeinfer.planning.load import streams_experts
        from moeinfer.planning.quality import cached_quality, stand_in_quality
        from moeinfer.planning.sizes import available_memory, checkpoint_bytes

        path, trace = real_shape_model(args.real_shape, layers=args.layers, traces=args.traces)
        model_name, base = str(path), None
        prompt = list(range(1, REAL_PROMPT_TOKENS + 1))  # routing is replayed: the ids do not matter
        if args.prefill_tokens is None:
            args.prefill_tokens = prefill_length(trace)
        if args.prefill_tokens:
            prefill_prompt = list(range(1, args.prefill_tokens + 1))
        quantized = not args.float_only
        print(f"real-shape model: {checkpoint_bytes(model_name) / 1e9:.1f} GB of weights, "
              f"{available_memory('cpu') / 1e9:.1f} GB available: " +
              ("quantized plans are quantized while loading, then offloaded when the plan does; quality is not "
               "judged on its random weights: each precision is charged the shipped model's measured loss "
               "(stand_in_quality)" if quantized else
               "float experts only (--float-only), loaded with the experts left in the checkpoint"), flush=True)
        if quantized:
            precisions = tuple(DEFAULT_PRECISIONS)
            shipped = cached_quality("tiny", moeinfer.load("tiny", progress=False, dtype="float32"), "english",
                                     precisions, progress=True)
            quality_model = stand_in_quality(args.layers, shipped, name="the shipped model")
        else:
            precisions = ("bf16",)

        def make(plan: Any) -> Runner:
            if streams_experts(plan, "cpu"):
                return Runner(lambda: moeinfer.load_planned(path, plan, progress=False), plan, prompt, trace=trace)
            # quantized while loading; a quantized offloaded plan writes its expert store here, removed by close()
            tmp = tempfile.TemporaryDirectory(dir=REAL_DIR, prefix="offload-")
            return Runner(lambda: moeinfer.load_planned(path, plan, offload_dir=tmp.name, progress=False), plan,
                          prompt, trace=trace, cleanup=tmp.cleanup)
    else:
        model_name, trace, precisions = args.model, None, tuple(DEFAULT_PRECISIONS)
        base = moeinfer.evaluate(moeinfer.load(model_name, progress=False, dtype="float32"), "english",
                                 max_bytes=args.max_bytes, progress=False).bits_per_byte
        tok = moeinfer.load(model_name, progress=False).tokenizer
        # a prompt as long as the planner's prefill sequences (64 tokens of held-out text)
        prompt = tok.encode(load_dataset("english").text[:4000])[:PROMPT_TOKENS]

        def make(plan: Any) -> Runner:
            return Runner(lambda: moeinfer.apply_plan_(moeinfer.load(model_name, progress=False), plan), plan, prompt)
    # the costs measured on this model's own shapes, as `moeinfer.plan` adds them to the profile it measures
    profile = with_shape_costs(profile, config_of(model_name), sizes_from_checkpoint(model_name).dtype,
                               progress=True)
    probe = ShapeProbe(model_name, profile)
    budgets = (default_budgets(model_name, real_shape=real, quantized=quantized) if args.budgets == "auto"
               else [parse_budget(b) for b in args.budgets.split(",")])
    rows = []
    for budget in budgets:
        t0 = time.perf_counter()
        chosen = moeinfer.plan(model_name, budget, max_quality_loss=args.max_quality_loss, profile=profile,
                               trace=trace, precisions=precisions, quality=quality_model)
        plan_s = time.perf_counter() - t0
        speed, decode_speed = ((chosen.predicted.machine_speed, chosen.predicted.machine_decode_speed)
                               if chosen.predicted is not None else (1.0, 1.0))
        configs: dict[str, Any] = {f"#{i + 1}": p for i, p in enumerate((chosen, *chosen.runners_up[:args.runners]))}
        if not args.no_baselines:
            configs.update(baselines(model_name, budget, quantized=quantized))
        # --real-shape: a configuration listed twice (a baseline that is the chosen plan) is measured once
        measured, same = distinct_configs(configs) if real else (configs, {})
        before, probe_before = host_rates(), probe()
        timed = time_configs(measured, make, rounds=args.rounds, tokens=args.tokens, interleave=args.interleave,
                             prefill_prompt=prefill_prompt, probe=probe.round)
        after, probe_after = host_rates(), probe()
        # the machine's speed beside the timings, against the profile the predictions came from
        # (the profile's read rate is this same measurement; its matmul rate is another, so only the read compares)
        drift = {"read_gbps": [before[0], after[0]], "gflops": [before[1], after[1]],
                 "profile_read_gbps": profile.mem_read_gbps, "shape_probe": [probe_before, probe_after]}
        timed.update({n: timed[twin] for n, twin in same.items()})
        for name, p in configs.items():
            got = timed[name]
            if not real:
                got.update(quality(model_name, p, max_bytes=args.max_bytes, base_bpb=base))
            pr = p.predicted
            row = {"budget": budget, "config": name, "plan": p.describe(), "plan_s": plan_s if name == "#1" else None,
                   "measured_as": same.get(name),
                   "predicted": vars(pr) if pr is not None else None, "measured": got,
                   "load_avg": os.getloadavg()[0], "machine_now": drift}
            if pr is not None:
                row["decode_ratio"] = got["decode_tok_s"] / pr.decode_tok_s
                row["prefill_ratio"] = (None if real and prefill_prompt is None
                                        else got["prefill_tok_s"] / pr.prefill_tok_s)
                # step 6: measured at the speed the planner probed (the rounds' figures over their probe's
                # speed, times the planner's) against the prediction
                for k, speed_k, pred in (("decode", decode_speed, pr.decode_tok_s), ("prefill", speed, pr.prefill_tok_s)):
                    at = got.get(f"{k}_tok_s_at_profile_speed")
                    if at is not None and row[f"{k}_ratio"] is not None:
                        row[f"{k}_ratio_probed"] = at * speed_k / pred
            replayed = ""
            if real:  # the cost model on the rows the rounds replayed (baselines too)
                rp = row["predicted_replayed"] = replayed_prediction(
                    p, model_name, trace, profile, rounds=args.rounds, tokens=args.tokens,
                    prefill_tokens=args.prefill_tokens, speed=speed, decode_speed=decode_speed)
                row["decode_ratio_replayed"] = got["decode_tok_s"] / rp["decode_tok_s"]
                replayed = (f"  replayed rows: predicted {rp['decode_tok_s']:.2f} "
                            f"({row['decode_ratio_replayed']:.2f}x), hit rate {rp['hit_rate']:.0%}")
                if "prefill_tok_s" in rp:  # the separate prefill forward, priced on its own rows
                    row["prefill_ratio_replayed"] = got["prefill_tok_s"] / rp["prefill_tok_s"]
                    replayed += (f"; prefill {rp['prefill_tok_s']:.2f} ({row['prefill_ratio_replayed']:.2f}x, "
                                 f"{args.prefill_tokens}-token forward)")
            rows.append(row)
            hits = ""
            if "hit_rate" in got:  # predicted (the simulator, decode) and live (the rounds) cache hit rates
                want = pr.hit_rate if pr is not None and pr.hit_rate is not None else float("nan")
                hits = f"  hit rate {want:.0%} -> {got['hit_rate']:.0%}"
            q = ""
            if not real:
                q = f"  quality {100 * (pr.quality_loss or 0):+.2f}% -> " if pr else "  quality "
                q += f"{100 * got['quality_loss']:+.2f}%"
            label = f"{name}={same[name]}" if name in same else name  # measured once, as its twin
            print(f"{budget / 1e6:9.1f} MB  {label:<16} {p.describe():<60}  decode {_fmt(pr and pr.decode_tok_s)} -> "
                  f"{_fmt(got['decode_tok_s'])} ({_fmt(row.get('decode_ratio'), 5)}x; at the probed speed "
                  f"{_fmt(row.get('decode_ratio_probed'), 5)}x; best round "
                  f"{_fmt(got['decode_tok_s_best_round'])})  prefill {_fmt(pr and pr.prefill_tok_s)} -> "
                  f"{_fmt(got['prefill_tok_s'])} ({_fmt(row.get('prefill_ratio'), 5)}x; at the probed speed "
                  f"{_fmt(row.get('prefill_ratio_probed'), 5)}x){q}{hits}{replayed}", flush=True)
        print(f"{budget / 1e6:9.1f} MB  machine beside these timings: memory read {before[0]:.1f} / {after[0]:.1f} GB/s "
              f"(before / after; the profile's {profile.mem_read_gbps:.1f}), fp32 matmul {before[1]:.0f} / {after[1]:.0f} "
              "GFLOP/s", flush=True)
        print(f"{budget / 1e6:9.1f} MB  machine on this model's shape (1-layer, experts "
              f"{probe_before['probe_experts']}): prompt of "
              f"{probe.probe.tokens} tokens after decode steps {probe_before['prompt_s'] * 1e3:.2f} / "
              f"{probe_after['prompt_s'] * 1e3:.2f} ms "
              f"(the cost model's price {probe_before['profiled_prompt_s'] * 1e3:.2f}: speed "
              f"{probe_before['prompt_speed']:.2f}x / {probe_after['prompt_speed']:.2f}x), decode step "
              f"{probe_before['decode_s'] * 1e3:.3f} / {probe_after['decode_s'] * 1e3:.3f} ms (priced "
              f"{probe_before['profiled_decode_s'] * 1e3:.3f}: speed {probe_before['decode_speed']:.2f}x / "
              f"{probe_after['decode_speed']:.2f}x); the planner's predictions scaled by its own probe: prompts "
              f"{speed:.2f}x, decode {decode_speed:.2f}x",
              flush=True)
        base_names = [n for n in configs if not n.startswith("#")]
        if base_names:  # the check: the chosen plan against the best baseline, measured together
            best = max(base_names, key=lambda n: timed[n]["decode_tok_s"])
            speedup = timed["#1"]["decode_tok_s"] / timed[best]["decode_tok_s"]
            # the same plan, or two plans that load into the same model: then the ratio is the noise alone
            same_cfg = (configs[best].describe() == configs["#1"].describe()
                        or timed[best]["runs_as"] == timed["#1"]["runs_as"])
            rows.append({"budget": budget, "summary": True, "best_baseline": best, "chosen_over_best_baseline": speedup,
                         "same_configuration": same_cfg})
            print(f"{budget / 1e6:9.1f} MB  chosen / best baseline ({best}): {speedup:.2f}x decode"
                  + (" (the same configuration" + (", measured once)" if best in same else
                                                    ": this ratio is measurement noise)") if same_cfg else ""),
                  flush=True)
    for k in ("decode", "prefill"):
        ratios = [r[f"{k}_ratio"] for r in rows if r.get(f"{k}_ratio") is not None]
        probed = [r[f"{k}_ratio_probed"] for r in rows if r.get(f"{k}_ratio_probed") is not None]
        if ratios:
            print(f"{k} within 25% of its prediction: {sum(abs(x - 1.0) <= 0.25 for x in ratios)} of {len(ratios)} "
                  f"plans; at the speed the planner probed: {sum(abs(x - 1.0) <= 0.25 for x in probed)} of "
                  f"{len(probed)}", flush=True)
    if real:
        again = [r["decode_ratio_replayed"] for r in rows if r.get("decode_ratio") is not None]
        print(f"decode within 25% of the cost model on the replayed rows: "
              f"{sum(abs(x - 1.0) <= 0.25 for x in again)} of {len(again)} plans", flush=True)
    out = {"model": model_name, "real_shape": args.real_shape, "trace": trace.meta if trace is not None else None,
           "tokens": args.tokens, "rounds": args.rounds, "interleave": args.interleave,
           "precisions": list(precisions), "quality_model": quality_model.to_dict() if quality_model else None,
           "prefill_tokens_separate": len(prefill_prompt) if prefill_prompt else None,
           "statistic": "median round of decode tokens / summed decode step time (best round beside it)",
           "profile": profile.to_dict(), "base_bits_per_byte": base, "rows": rows,
           "wall_s": time.perf_counter() - t_start,
           "note": "timings from the machine this ran on; check load_avg before reading them as results"}
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out} ({out['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
