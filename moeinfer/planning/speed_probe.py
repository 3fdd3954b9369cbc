"""How fast the machine runs a model's shape now, against the profile the planner prices with.

The machine profile and the costs on a model's shapes (moeinfer/planning/shape_costs.py) are measured
once and cached; a VM's speed moves under them. On the Intel development VM the same plan's decode
rate doubled within 20 minutes (404 -> 874 tok/s) while its memory read rate moved 17 -> 22 GB/s, and
every prediction of a profile measured in a slow phase came out 1.2-1.7x too slow in a fast one
(docs/planner.md, fourteenth session). So, at plan time, a probe on the shape the costs were fitted on:
1. the 1-layer model of step 1 of shape_costs (the planned model's attention, widths and vocabulary,
   routed experts stubbed), built for the probe and freed after it;
2. rounds (one to warm up, then at least `REPEATS` and at least `LEAST_S` seconds of them: on the
   shipped model's shape one prompt's probe of 21 rounds moved 0.52-0.66 between 12 probes in a
   row), each as a generation meets its next prompt: a generation's `AFTER_STEPS` decode steps
   (`shape_costs.mean_step`), then a prompt forward of the shorter measured length.
   The prompt's median is the state a prompt meets in use (after decode steps), the rounds' median mean
   step a decode step (as step 5 of shape_costs measured it). Until the sixteenth session the prompts ran
   back to back and the profile's `after_decode` (measured once, with the profile) priced the state:
   it read 1.05 in a profile where, that afternoon, the shipped model's prompt ran 1.34x slower right
   after a generation than back to back (the probe's model: 1.28x), and every plan's prefill measured
   0.6-0.7x its prediction (docs/planner.md, sixteenth session);
3. speeds = the profile's figure / the time now (> 1: faster than profiled): for prompts the fit's
   prediction of step 2's forward (`ShapeCosts.reference_seconds()` x `after_decode`: the figure every
   prompt cost of the shape is priced from), so a plan's prompt costs come out as the fit's x the probe's
   time now over the fit's reference — the state measured now, not the profile's `after_decode`; for
   decode the shape's decode step (`ShapeCosts.decode_reference_s`; where not measured, the prompt
   speed). The planner scales a plan's prefill prediction by the first, its decode prediction by the
   second (`Prediction.machine_speed`, `machine_decode_speed`); rankings do not change. One speed for
   both had scaled decode by a prompt's 1.11-1.25x where the plans' decode did not follow (fifteenth
   session, runs f and g).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.config import ModelConfig
from moeinfer.planning.shape_costs import (
    AFTER_STEPS, ShapeCosts, mean_step, prefill_seconds, prompt_ids, random_model)

REPEATS, LEAST_S, MAX_REPEATS = 21, 1.5, 201  # step 2: rounds (at least; for at least LEAST_S seconds)


@dataclass(frozen=True)
class MachineSpeed:
    """The machine's speed now over its profile's, on prompts and on decode steps (1: as profiled)."""

    prompt: float = 1.0
    decode: float = 1.0


def shape_model(config: ModelConfig, dtype: str, device: str) -> Any:
    """Step 1: the shape's 1-layer model, experts stubbed (not kept: a real shape's embeddings and head
    alone can take a gigabyte or more)."""
    return random_model(config, 1, getattr(torch, dtype), torch.device(device))


def probe_seconds(model: Any, tokens: int, *, repeats: int = REPEATS, least_s: float | None = None,
                  steps: int = AFTER_STEPS, clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Step 2: (the median prompt forward of `tokens` tokens right after `steps` decode steps, the median
    round's mean decode step, as `ShapeCosts.decode_reference_s` is measured) over at least `repeats`
    rounds and at least `least_s` seconds of them (at most `MAX_REPEATS` rounds), a first round warming
    up (`least_s` None: `LEAST_S`)."""
    least_s = LEAST_S if least_s is None else least_s
    ids = prompt_ids(tokens)
    prompts: list[float] = []
    decodes: list[float] = []
    mean_step(model, steps)  # the warm-up round
    prefill_seconds(model, ids)
    start = clock()
    while len(prompts) < MAX_REPEATS and (len(prompts) < repeats or clock() - start < least_s):
        decodes.append(mean_step(model, steps))
        prompts.append(prefill_seconds(model, ids))
    return statistics.median(prompts), statistics.median(decodes)


def machine_speed(costs: ShapeCosts, config: ModelConfig, dtype: str, device: str) -> MachineSpeed:
    """Step 3: the profile's figures over the probe's times now."""
    prompt_s, decode_s = probe_seconds(shape_model(config, dtype, device), costs.tokens[0])
    prompt = costs.reference_seconds() * costs.after_decode / prompt_s
    if costs.decode_reference_s <= 0:
        return MachineSpeed(prompt=prompt, decode=prompt)
    return MachineSpeed(prompt=prompt, decode=costs.decode_reference_s / decode_s)
