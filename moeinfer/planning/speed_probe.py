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
   one benchmark run where the plans' speeds did not);
3. speed = the profile's fit for that forward (`ShapeCosts.reference_seconds`: the reference every
   figure of the shape was priced against) / the time now (> 1: faster than profiled). The planner
   scales every prediction of a plan by it (`Prediction.machine_speed`); rankings do not change.
"""

from __future__ import annotations

from typing import Any

import torch

from moeinfer.config import ModelConfig
from moeinfer.planning.shape_costs import ShapeCosts, prefill_in_turn, random_model

REPEATS = 21


def shape_model(config: ModelConfig, dtype: str, device: str) -> Any:
    """Step 1: the shape's 1-layer model, experts stubbed (not kept: a real shape's embeddings and head
    alone can take a gigabyte or more)."""
    return random_model(config, 1, getattr(torch, dtype), torch.device(device))


def probe_seconds(model: Any, tokens: int) -> float:
    """Step 2: the median of REPEATS prompt forwards of `tokens` tokens of `model`."""
    return prefill_in_turn([model], REPEATS, tokens)[0]


def machine_speed(costs: ShapeCosts, config: ModelConfig, dtype: str, device: str) -> float:
    """Step 3: the profile's fit over the probe's time now."""
    return costs.reference_seconds() / probe_seconds(shape_model(config, dtype, device), costs.tokens[0])
