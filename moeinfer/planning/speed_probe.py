"""How fast the machine runs a model's shape now, against the profile the planner prices with.

The machine profile and the costs on a model's shapes (moeinfer/planning/shape_costs.py) are measured
once and cached; a VM's speed moves under them. On the Intel development VM the same plan's decode
rate doubled within 20 minutes (404 -> 874 tok/s) while its memory read rate moved 17 -> 22 GB/s, and
every prediction of a profile measured in a slow phase came out 1.2-1.7x too slow in a fast one
(docs/planner.md, fourteenth session). So, at plan time, a probe on the shape the costs were fitted on:
1. the 1-layer model of step 1 of shape_costs (the planned model's attention, widths and vocabulary,
   routed experts stubbed), built for the probe and freed after it;
2. its prompt forward of the shorter measured length, the median of `REPEATS`, back to back (the
   level the fit was priced at: moeinfer/planning/in_turn.py; of 9, the probe moved 1.00-1.13 within
   one benchmark run where the plans' speeds did not), and its one-token decode step
   (`shape_costs.decode_seconds`, as step 5 of shape_costs measured it);
3. speeds = the profile's figure / the time now (> 1: faster than profiled): for prompts the fit for
   step 2's forward (`ShapeCosts.reference_seconds`: the reference every prompt figure of the shape
   was priced against), for decode the shape's decode step (`ShapeCosts.decode_reference_s`; where
   not measured, the prompt speed). The planner scales a plan's prefill prediction by the first, its
   decode prediction by the second (`Prediction.machine_speed`, `machine_decode_speed`); rankings do
   not change. One speed for both had scaled decode by a prompt's 1.11-1.25x where the plans' decode
   did not follow (fifteenth session, runs f and g).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.config import ModelConfig
from moeinfer.planning.shape_costs import ShapeCosts, decode_seconds, prefill_in_turn, random_model

REPEATS = 21


@dataclass(frozen=True)
class MachineSpeed:
    """The machine's speed now over its profile's, on prompts and on decode steps (1: as profiled)."""

    prompt: float = 1.0
    decode: float = 1.0


def shape_model(config: ModelConfig, dtype: str, device: str) -> Any:
    """Step 1: the shape's 1-layer model, experts stubbed (not kept: a real shape's embeddings and head
    alone can take a gigabyte or more)."""
    return random_model(config, 1, getattr(torch, dtype), torch.device(device))


def probe_seconds(model: Any, tokens: int) -> float:
    """Step 2: the median of REPEATS prompt forwards of `tokens` tokens of `model`."""
    return prefill_in_turn([model], REPEATS, tokens)[0]


def machine_speed(costs: ShapeCosts, config: ModelConfig, dtype: str, device: str) -> MachineSpeed:
    """Step 3: the profile's figures over the probe's times now."""
    model = shape_model(config, dtype, device)
    prompt = costs.reference_seconds() / probe_seconds(model, costs.tokens[0])
    if costs.decode_reference_s <= 0:
        return MachineSpeed(prompt=prompt, decode=prompt)
    return MachineSpeed(prompt=prompt, decode=costs.decode_reference_s / decode_seconds(model))
