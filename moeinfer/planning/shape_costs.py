"""Costs measured on the planned model's own shapes (`ShapeCosts`, one per shape and machine, cached
in the machine profile's file). This module measures the first of them: what a prefill of T tokens
pays outside the routed experts (attention, norms, rotary embeddings, router, shared experts,
embeddings, the LM head row and Python), per MoE layer and per forward; moeinfer/planning/
shape_profile.py adds the experts' figures on the same shapes.

Why on the model's own shapes: the machine profile prices a layer's dense part from the dense
matmul rate plus a per-token host cost measured on a 2-head, 64-wide random model
(moeinfer/planning/profile.py, step 3). A short prefill of a small model is mostly per-call and
per-row costs that grow with heads and widths, not with flops: on the Intel machine the shipped
model's 64-token forward spent 2.5 ms outside its experts where those figures priced 0.9 ms, so
every plan's prefill was predicted up to 2x too fast (docs/planner.md, "Tenth session").

Shapes: T tokens of one prompt, n MoE layers of the measured models.

1. build models of 1 and 3 MoE layers from the planned model's config (its attention, heads, widths,
   shared experts, vocabulary; random weights drawn in the checkpoint's dtype, so a real-shape
   config needs no fp32 copy), their routed experts replaced by a stage that returns zeros (the
   expert rates price those), on the dense path a planned model runs (moeinfer/planning/dense.py);
2. time one prefill forward of T tokens through a KV cache (last position's logits, as generation
   keeps) of both models at both prompt lengths, all four in turn in every one of `ROUNDS` rounds,
   each figure priced against the 1-layer model's shorter prompt in the same rounds (its median time
   x the median ratio: moeinfer/planning/in_turn.py). Each the least of 5 rounds of its own, the
   figures of step 3 — a difference of two of them — moved 2x between two profiles of one afternoon
   on the Intel machine (per layer 0.41 ms and 0.84; docs/planner.md, fourteenth session);
3. per layer at each T: half the 3-layer time less the 1-layer time; per forward: the 1-layer time
   less one layer; each fitted as  a + (T - 1) b  through the two lengths (`ShapeCosts`);
4. the state a prompt meets (`ShapeCosts.after_decode`): steps 2-3 time forwards back to back, each
   right after another prompt's, but a prompt's forward in use follows other work, a generation's
   decode steps. On the Intel machine the shipped model's 64-token prompt took 8.6 ms back to back
   and 12.1 ms right after a 32-token generation (best of 15; norms, attention, router and experts
   alike slower, so caches and clocks, not one op; 19.4 ms after 50 ms idle; unchanged with spinning
   OpenMP threads or with malloc never returning memory), and every plan's prompt measured 0.64-0.83x
   its prediction. So, on the 3-layer model, per round a generation's `AFTER_STEPS` decode steps
   (`decode_steps`), then the prompt twice: the median over `AFTER_ROUNDS` rounds of the first's time
   over the second's (at least 1) scales every prompt cost of the shape (its dense part, its forward,
   its experts: moeinfer/planning/costs.py). It moved 1.05-1.40 between measurements on the Intel
   machine (the round-to-round ratios spread 0.4-2.1); the plan-time probe measures that state anew
   (moeinfer/planning/speed_probe.py), so a prediction does not rest on this figure;
5. decode steps of the 1- and 3-layer models as a generation runs them (`decode_steps`: the time
   between tokens of a greedy generation, so the engine's prepared decode program and the loop's own
   work count), a generation of each in turn in every one of `DECODE_ROUNDS` rounds (a generation's
   mean step, `mean_step`), the 3-layer model's priced against the 1-layer's: per MoE layer half their
   difference (`ShapeCosts.decode_layer_s`), per step the 1-layer model's less one layer
   (`decode_step_s`), and the 1-layer model's step itself (`decode_reference_s`), which the plan-time
   probe times again to scale decode predictions (prompts: by step 2's reference;
   moeinfer/planning/speed_probe.py). Until the sixteenth session a decode
   step's dense part was priced from the profile's figures of a 2-head, 64-wide model, an
   extrapolation to any other shape (for the shipped shape on the Intel machine they happen to agree:
   171 us a layer and 295 a step, against 175 and 301 measured here). Timed as one-token forwards
   outside a generation, the same stubbed layer took 231-252 us: `generate` runs the engine's prepared
   decode program, and so do the plans the benchmark times (the shipped model's int4 step: 1.68 ms
   outside, 1.31 ms inside a generation).
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from moeinfer.config import ModelConfig
from moeinfer.engine.generate import generate
from moeinfer.model.kv_cache import KVCache
from moeinfer.model.meta import meta_parameters
from moeinfer.model.moe import Routing
from moeinfer.model.transformer import MoEModel
from moeinfer.planning.dense import use_planned_dense_
from moeinfer.planning.in_turn import priced_by_reference, rounds_in_turn, timed

PROMPT_LENGTHS = (32, 256)  # step 2's two prompt lengths (fewer where the model's context is shorter)
ROUNDS = 15  # step 2's rounds
AFTER_STEPS, AFTER_ROUNDS = 16, 31  # step 4: decode steps before the timed prompt, rounds
DECODE_ROUNDS = 15  # step 5: rounds of a generation of AFTER_STEPS decode steps per model
VERSION = 10  # of what is measured per shape (in `shape_key`: costs cached by an older version are measured anew)


@dataclass(frozen=True)
class ShapeCosts:
    """Seconds on one model shape: a T-token forward outside the routed experts (step 3's fit), and the
    experts' figures moeinfer/planning/shape_profile.py measures."""

    layer_s: float  # per MoE layer, per forward
    layer_token_s: float  # per MoE layer, per token beyond the first
    forward_s: float  # per forward: embeddings, final norm, LM head row, Python
    forward_token_s: float  # per forward, per token beyond the first
    tokens: tuple[int, int] = PROMPT_LENGTHS  # the prompt lengths measured
    measured: str = ""
    # expert variant -> (seconds per active expert, per token) of a prompt's experts of this shape,
    # call_s excluded (moeinfer.planning.shape_profile); a variant absent: the profile's fit prices it
    experts: dict[str, tuple[float, float]] = field(default_factory=dict)
    # the same for an offloaded layer's experts, one call each (per call, per token)
    offloaded: dict[str, tuple[float, float]] = field(default_factory=dict)
    # expert variant -> seconds of one layer's expert stage in a one-row decode step, measured in a
    # model of this shape (moeinfer.planning.shape_profile, step 4; only where the experts stay cached)
    decode_experts: dict[str, float] = field(default_factory=dict)
    # step 4: a prompt's forward right after decode steps over one right after another prompt (>= 1)
    after_decode: float = 1.0
    # step 5: the 1-layer model's one-token decode step (0: not measured), what the plan-time probe
    # compares a decode step with (moeinfer/planning/speed_probe.py)
    decode_reference_s: float = 0.0
    # step 5: a one-token decode step's dense part per MoE layer, and what the step pays once (0: not
    # measured; the profile's figures price decode)
    decode_layer_s: float = 0.0
    decode_step_s: float = 0.0
    # an offloaded layer's host costs measured on this shape (moeinfer/planning/shape_profile.py step 5):
    # the profile's `offload_host` key -> (per decode visit, per decode load beyond its bytes, per prompt
    # visit, per prompt load), seconds beyond a resident layer; a key absent: the profile's figures
    offload_host: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)

    def layer(self, tokens: int) -> float:
        """One MoE layer's dense part (attention, norms, router, shared expert) for `tokens` rows."""
        return (self.layer_s + max(0, tokens - 1) * self.layer_token_s) * self.after_decode

    def forward(self, tokens: int) -> float:
        """What a forward of `tokens` rows pays once (embeddings, head row, Python)."""
        return (self.forward_s + max(0, tokens - 1) * self.forward_token_s) * self.after_decode

    def reference_seconds(self) -> float:
        """The fit's time for step 2's reference, the 1-layer model's prompt of the shorter length (every
        figure is priced against it; the plan-time probe of moeinfer/planning/speed_probe.py times it)."""
        T = self.tokens[0]
        return self.layer_s + (T - 1) * self.layer_token_s + self.forward_s + (T - 1) * self.forward_token_s

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeCosts:
        lines = {k: {v: tuple(line) for v, line in d.get(k, {}).items()}
                 for k in ("experts", "offloaded", "offload_host")}
        return cls(**{**d, "tokens": tuple(d.get("tokens", PROMPT_LENGTHS)), **lines})

    def expert(self, variant: str, tokens: int, *, offloaded: bool = False) -> float | None:
        """Seconds of one expert of `variant` (in an offloaded layer: one call of its own) with `tokens`
        of a prompt's tokens (None: not measured)."""
        line = (self.offloaded if offloaded else self.experts).get(variant)
        return None if line is None else (line[0] + tokens * line[1]) * self.after_decode


class _NoExperts(nn.Module):
    """A routed-expert stage that computes nothing: the block's other work is what is timed."""

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return torch.zeros_like(x)


def _short(config: ModelConfig, layers: int) -> ModelConfig:
    """`config` cut to `layers` MoE layers (each like its first MoE layer), with routed experts of inner
    size 1: step 1 replaces them, so they are never allocated at their real size."""
    first = config.moe_layers[0] if config.moe_layers else 0
    window = None if config.sliding_window is None else (config.sliding_window[first],) * layers
    return replace(config, num_layers=layers, layer_ffn=("moe",) * layers, sliding_window=window,
                   moe_intermediate_size=1)


def shape_key(config: ModelConfig, dtype: str) -> str:
    """What the costs depend on besides the machine: the config of one layer (not the layer count:
    the costs are per layer and per forward) and the weights' dtype."""
    return hashlib.sha256(f"{_short(config, 1)!r}|{dtype}|{VERSION}".encode()).hexdigest()[:16]


def random_model(config: ModelConfig, layers: int, dtype: torch.dtype, device: torch.device) -> Any:
    """Step 1: a `layers`-layer model of `config`'s shapes, random weights in `dtype`, routed experts
    stubbed, frozen as a loaded checkpoint is, on the planned dense path."""
    g = torch.Generator().manual_seed(layers)
    with meta_parameters():
        model = MoEModel(_short(config, layers))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            w = torch.empty(p.shape, dtype=dtype).normal_(0, 0.02, generator=g)
            setattr(module, name, nn.Parameter(w.to(device), requires_grad=False))
    model = model.to(device=device, dtype=dtype).eval()
    for block in model.moe_blocks():
        block.experts = _NoExperts()
    use_planned_dense_(model, device)
    return model


def prompt_ids(tokens: int) -> torch.Tensor:
    """ids [1, T] of the prompt every step times."""
    return torch.arange(1, tokens + 1)[None] % 200 + 1


def prefill_in_turn(models: list[Any], repeats: int, tokens: int) -> list[float]:
    """Per model, one prefill forward of `tokens` tokens through a KV cache (the forward a generation's
    prompt runs, last position's logits only), the models taking turns for `repeats` rounds, priced
    against the first model's (its median time x the median ratio: moeinfer/planning/in_turn.py)."""
    ids = prompt_ids(tokens)
    return priced_by_reference(rounds_in_turn([lambda m=m: prefill_seconds(m, ids) for m in models], repeats))


def prefill_seconds(model: Any, ids: torch.Tensor) -> float:
    """One prefill forward of ids [1, T] through a fresh KV cache, last position's logits only."""
    cache = KVCache(model.config, batch_size=1, max_length=ids.shape[1], device=model.device, dtype=model.dtype)
    with torch.inference_mode():
        return timed(lambda: model(ids.to(model.device), cache=cache, logits_to_keep=1), model.device)()


def token_stamps(model: Any, tokens: int,
                 count: Callable[[Any], float] | None = None) -> tuple[list[float], list[float]]:
    """A greedy generation of `tokens` tokens from a 3-token prompt, as a generation runs them (the
    engine's prepared decode program where it has one, and the loop's own work): the clock at every
    token, and `count(model)` (optional: e.g. the expert loads so far) at every token."""
    stamps: list[float] = []
    counts: list[float] = []

    def on_token(*_: Any) -> None:
        stamps.append(time.perf_counter())
        if count is not None:
            counts.append(count(model))

    generate(model, [[1, 2, 3]], max_new_tokens=tokens, ignore_eos=True, on_token=on_token)
    return stamps, counts


def decode_steps(model: Any, steps: int = AFTER_STEPS) -> list[float]:
    """Seconds of each of `steps` decode steps of a greedy generation: the time between consecutive
    tokens (`token_stamps`; the prompt's forward and the first step not counted). Timed one-token
    forwards of the model outside `generate` missed its prepared decode program: on the Intel machine
    the shipped model's int4 step took 1.68 ms that way and 1.31 ms in a generation."""
    stamps, _ = token_stamps(model, steps + 2)
    return step_changes(stamps)


def step_changes(readings: list[float]) -> list[float]:
    """Per decode step, the change of a reading taken at every token (`token_stamps`: the clock, a counter)
    from the token before; the prompt's forward and the first step not counted."""
    return [b - a for a, b in zip(readings[1:], readings[2:])]


def mean_step(model: Any, steps: int = AFTER_STEPS) -> float:
    """A generation's mean decode step (`decode_steps`): its decode tokens/s inverted, what a user meets
    and the planner benchmark reports per round. The median step, used until the seventeenth session,
    leaves out a generation's slow steps (on the Intel machine the shipped model's int4 step: median
    1.44 ms, mean 1.51)."""
    return statistics.mean(decode_steps(model, steps))


def decode_in_turn(models: list[Any], rounds: int = DECODE_ROUNDS) -> list[float]:
    """Step 5: per model, its mean decode step of a generation (`mean_step`), the models taking turns for
    `rounds` rounds, priced against the first model's (moeinfer/planning/in_turn.py)."""
    calls = [lambda m=m: mean_step(m) for m in models]
    return priced_by_reference(rounds_in_turn(calls, rounds))


def after_decode(model: Any, tokens: int, *, steps: int = AFTER_STEPS, rounds: int = AFTER_ROUNDS) -> float:
    """Step 4: per round, a generation of `steps` decode steps (`decode_steps`), then a prefill forward
    of `tokens` tokens twice; the median over the rounds of the first's time over the second's,
    at least 1."""
    ids = prompt_ids(tokens)
    ratios = []
    for r in range(rounds + 1):  # round 0 warms up
        decode_steps(model, steps)
        after = prefill_seconds(model, ids)
        hot = prefill_seconds(model, ids)
        if r:
            ratios.append(after / hot)
    return max(1.0, statistics.median(ratios))


def fit_line(at: tuple[int, int], seconds: tuple[float, float]) -> tuple[float, float]:
    """(a, b) of  a + (T - 1) b  through two (T, seconds) points, both >= 0 (a later length measured
    faster, noise: no per-token cost; a negative intercept: all of it per token)."""
    (t1, t2), (s1, s2) = at, seconds
    b = max(0.0, (s2 - s1) / (t2 - t1))
    a = s1 - (t1 - 1) * b
    if a < 0:
        return 0.0, max(s1, 0.0) / max(1, t1 - 1)
    return a, b


def measure_shape_costs(config: ModelConfig, dtype: str, device: torch.device | str = "cpu", *,
                        rounds: int = ROUNDS, lengths: tuple[int, int] = PROMPT_LENGTHS) -> ShapeCosts:
    """Steps 1-5 of the module docstring for a model of `config` with weights in `dtype` ("bfloat16", ...)."""
    dev = torch.device(device)
    t0 = time.time()
    longest = min(lengths[1], config.max_position_embeddings)
    at = (min(lengths[0], longest // 2), longest)
    models = [random_model(config, n, getattr(torch, dtype), dev) for n in (1, 3)]
    # step 2: (1 layer, T1), (3 layers, T1), (1 layer, T2), (3 layers, T2); the first is the reference
    calls = [lambda m=m, ids=prompt_ids(T): prefill_seconds(m, ids) for T in at for m in models]
    priced = priced_by_reference(rounds_in_turn(calls, rounds))
    one, three = priced[0::2], priced[1::2]
    layer = tuple(max(0.0, (c - a) / 2) for a, c in zip(one, three))
    forward = tuple(max(0.0, a - ly) for a, ly in zip(one, layer))
    (ls, lt), (fs, ft) = fit_line(at, layer), fit_line(at, forward)
    one_step, three_steps = decode_in_turn(models)  # step 5
    decode_layer = max(0.0, (three_steps - one_step) / 2)
    return ShapeCosts(layer_s=ls, layer_token_s=lt, forward_s=fs, forward_token_s=ft, tokens=at,
                      after_decode=after_decode(models[1], at[0]), decode_reference_s=one_step,
                      decode_layer_s=decode_layer, decode_step_s=max(0.0, one_step - decode_layer),
                      measured=f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {time.time() - t0:.1f} s")
