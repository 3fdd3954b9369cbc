"""How fast the machine runs a model's shape now, against the cost model the planner prices with.

The machine profile and the costs on a model's shapes (moeinfer/planning/shape_costs.py) are measured
once and cached; a VM's speed moves under them. On the Intel development VM the same plan's decode
rate doubled within 20 minutes (404 -> 874 tok/s) while its memory read rate moved 17 -> 22 GB/s, and
every prediction of a profile measured in a slow phase came out 1.2-1.7x too slow in a fast one
(docs/planner.md, fourteenth session). So, at plan time, a probe on the model's shape:
1. the probe's models (`Probe`), built for the probe and freed after it: the 1-layer model of step 1
   of shape_costs (the planned model's attention, widths and vocabulary, routed experts stubbed), and
   the same with one layer of routed experts at the first of `PROBE_VARIANTS` the shape's costs
   measured (moeinfer/planning/shape_profile.py step 2; random codes) for the prompt; where none was
   measured, the stubbed one for both.
   Until the eighteenth session the experts were always stubbed: on the Mixtral-8x7B shape the stub
   (attention and head, ~0.35 GB) stays in the last-level cache while a layer's int4 experts (0.7 GB)
   are read from memory, and the two moved apart: the stub's prompt read 1.36-1.6x its profiled speed
   while a 64-token int4 prompt ran at 0.4-0.55x its prediction (docs/planner.md, seventeenth
   session), and right after an expert stage the head's 262 MB read took 48-65 ms where back to back it
   took 11-17 (eighteenth session): a probe without the experts measures neither. Decode steps stay
   on the stubbed model: one layer of experts partly stays in the last-level cache between decode
   steps (Mixtral-8x7B shape, 0.7 GB of int4 experts beside a 0.48 GB cache: its step ran 1.6x faster
   than the cost model prices streamed experts, where the 2-layer model's plans ran as priced);
2. rounds (one to warm up, then at least `REPEATS` and at least `LEAST_S` seconds of them: on the
   shipped model's shape one prompt's probe of 21 rounds moved 0.52-0.66 between 12 probes in a
   row), each as a generation meets its next prompt: a generation's `AFTER_STEPS` decode steps
   (`shape_costs.mean_step`), then a prompt forward of the shorter measured length (with experts:
   both on the model with experts, then the stubbed model's decode steps, timed for decode).
   The prompt's median is the state a prompt meets in use (after decode steps), the rounds' median mean
   step a decode step (as step 5 of shape_costs measured it). Until the sixteenth session the prompts ran
   back to back and the profile's `after_decode` (measured once, with the profile) priced the state:
   it read 1.05 in a profile where, that afternoon, the shipped model's prompt ran 1.34x slower right
   after a generation than back to back (the probe's model: 1.28x), and every plan's prefill measured
   0.6-0.7x its prediction (docs/planner.md, sixteenth session);
3. speeds = the cost model's price of the probe's forwards / their times now (> 1: faster than
   priced): the prompt with experts as `moeinfer.planning.costs.MeasuredCosts` prices a plan's (the
   routing its router gave: tokens per expert), the stubbed prompt by the shape's fit
   (`ShapeCosts.reference_seconds()` x `after_decode`); the stubbed decode step by
   `ShapeCosts.decode_reference_s` (where that is not measured, the prompt speed for both). The
   planner scales a plan's prefill prediction by the first, its decode prediction by the second
   (`Prediction.machine_speed`, `machine_decode_speed`); rankings do not change. One speed for both
   had scaled decode by a prompt's 1.11-1.25x where the plans' decode did not follow (fifteenth
   session, runs f and g).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from moeinfer.config import ModelConfig
from moeinfer.planning.costs import MeasuredCosts, ModelSizes
from moeinfer.planning.profile import MachineProfile, experts_module
from moeinfer.planning.shape_costs import (
    AFTER_STEPS, ShapeCosts, mean_step, prefill_seconds, prompt_ids, random_model)

REPEATS, LEAST_S, MAX_REPEATS = 21, 1.5, 201  # step 2: rounds (at least; for at least LEAST_S seconds)
PROBE_VARIANTS = ("int4", "int8")  # step 1: the probe's experts, the first the shape's costs measured


@dataclass(frozen=True)
class MachineSpeed:
    """The machine's speed now over its profile's, on prompts and on decode steps (1: as profiled)."""

    prompt: float = 1.0
    decode: float = 1.0


def probe_variant(costs: ShapeCosts) -> str | None:
    """Step 1: the expert variant of the probe's model (None: experts stubbed)."""
    return next((v for v in PROBE_VARIANTS if v in costs.experts), None)


def shape_model(config: ModelConfig, dtype: str, device: str, variant: str | None = None) -> Any:
    """Step 1: the shape's 1-layer model, its routed experts at `variant` (None: stubbed); not kept: a
    real shape's embeddings and head alone can take a gigabyte or more."""
    dev = torch.device(device)
    model = random_model(config, 1, getattr(torch, dtype), dev)
    if variant is not None:
        block = model.moe_blocks()[0]
        block.experts = experts_module(variant, config.num_experts, config.hidden_size,
                                       config.moe_intermediate_size, dev).requires_grad_(False)
    return model


def routed_tokens(model: Any, tokens: int) -> list[int]:
    """Tokens per expert the probe's prompt of `tokens` tokens routes to (its router, its ids)."""
    seen: list[torch.Tensor] = []
    block = model.moe_blocks()[0]
    hook = block.experts.register_forward_pre_hook(lambda _m, args: seen.append(args[1].indices.reshape(-1)))
    try:
        with torch.inference_mode():
            model(prompt_ids(tokens).to(model.device), logits_to_keep=1)
    finally:
        hook.remove()
    counts = torch.bincount(seen[0].cpu(), minlength=model.config.num_experts).tolist()
    return [int(c) for c in counts if c > 0]


class Probe:
    """Steps 1 and 3 for a model of `sizes` (with `config`) under `profile`: the probe's models and the
    cost model's price of the prompt and decode step they time."""

    def __init__(self, profile: MachineProfile, sizes: ModelSizes, config: ModelConfig, device: str) -> None:
        self.shape: ShapeCosts = profile.shapes[sizes.shape_key]
        self.tokens = self.shape.tokens[0]
        self.variant = probe_variant(self.shape)
        self.stub = shape_model(config, sizes.dtype, device)
        self.model = self.stub if self.variant is None else shape_model(config, sizes.dtype, device, self.variant)
        self.priced = self._prices(profile, sizes)

    def _prices(self, profile: MachineProfile, sizes: ModelSizes) -> tuple[float, float]:
        """Step 3: (prompt, decode step) seconds the cost model gives the probe's forwards."""
        s, T = self.shape, self.tokens
        if self.variant is None:  # the stub: the shape's own figures
            prompt = s.reference_seconds() * s.after_decode
        else:
            costs = MeasuredCosts(replace(sizes, num_layers=1), profile, [self.variant], kernel="auto")
            prompt = (costs.dense_s(0, T) + sum(costs.expert_s(0, t) for t in routed_tokens(self.model, T))
                      + costs.head_s(1, T))
        return prompt, s.decode_reference_s if s.decode_reference_s > 0 else 0.0

    def seconds(self, **rounds: Any) -> tuple[float, float]:
        """Step 2: (prompt, decode step) seconds now; `rounds`: `probe_seconds`'s repeats and least_s."""
        other = None if self.model is self.stub else self.stub
        return probe_seconds(self.model, self.tokens, decode_model=other, **rounds)

    def speed(self, prompt_s: float, decode_s: float) -> MachineSpeed:
        """Step 3: the prices over the times (`seconds`); the prompt's for both where the shape's costs
        hold no decode step."""
        prompt = self.priced[0] / prompt_s
        return MachineSpeed(prompt=prompt, decode=self.priced[1] / decode_s if self.priced[1] > 0 else prompt)


def probe_seconds(model: Any, tokens: int, *, decode_model: Any = None, repeats: int = REPEATS,
                  least_s: float | None = None, steps: int = AFTER_STEPS,
                  clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Step 2: (the median prompt forward of `tokens` tokens of `model` right after `steps` of its decode
    steps, the median round's mean decode step of `decode_model` (None: of `model`, the steps before
    the prompt), as `ShapeCosts.decode_reference_s` is measured) over at least `repeats` rounds and at
    least `least_s` seconds of them (at most `MAX_REPEATS` rounds), a first round warming up (`least_s`
    None: `LEAST_S`)."""
    least_s = LEAST_S if least_s is None else least_s
    ids = prompt_ids(tokens)
    prompts: list[float] = []
    decodes: list[float] = []

    def one_round() -> tuple[float, float]:
        step = mean_step(model, steps)
        prompt = prefill_seconds(model, ids)
        return prompt, step if decode_model is None else mean_step(decode_model, steps)

    one_round()  # the warm-up round
    start = clock()
    while len(prompts) < MAX_REPEATS and (len(prompts) < repeats or clock() - start < least_s):
        prompt, step = one_round()
        prompts.append(prompt)
        decodes.append(step)
    return statistics.median(prompts), statistics.median(decodes)


def machine_speed(profile: MachineProfile, sizes: ModelSizes, config: ModelConfig, device: str) -> MachineSpeed:
    """Steps 1-3: the cost model's prices of the probe's forwards over their times now."""
    probe = Probe(profile, sizes, config, device)
    return probe.speed(*probe.seconds())
