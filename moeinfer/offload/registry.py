"""What the policy and prefetcher registries share: building an entry by name, and checking the
calibration trace an entry needs against the model's shape."""

from __future__ import annotations

from typing import Any


def build(what: str, table: dict[str, Any], name: str, ctx: Any, kwargs: dict[str, Any]) -> Any:
    """table[name](**kwargs), bound to ctx; an unknown name or bad arguments name `what` it is."""
    if name not in table:
        raise ValueError(f"{what} {name!r} is not known; choose one of {', '.join(sorted(table))}")
    try:
        entry = table[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"{what} {name!r}: bad arguments {kwargs} ({e})") from None
    entry.bind(ctx)
    return entry


def calibration_trace(what: str, name: str, ctx: Any) -> Any:
    """ctx.calibration, which `what` `name` needs, checked against ctx's layers x experts."""
    trace = ctx.calibration
    if trace is None:
        raise ValueError(f"{what} {name!r} needs a calibration routing trace (OffloadConfig.calibration)")
    if trace.num_layers != ctx.num_layers or trace.num_experts != ctx.num_experts:
        raise ValueError(f"{what} {name!r}: calibration trace has {trace.num_layers} layers x "
                         f"{trace.num_experts} experts, the model {ctx.num_layers} x {ctx.num_experts}")
    return trace
