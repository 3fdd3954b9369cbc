"""The targets of issue 15 (item 3), read off a run's results: each with its measured value and
whether it holds; None where the part that measures it did not finish."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Results = dict[str, Any]


def _layer_rows(res: Results) -> list[dict[str, Any]]:
    return res.get("layer", {}).get("rows", [])


def _best(rows: list[dict[str, Any]], prefix: str) -> dict[tuple[str, int], float]:
    out: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["backend"].startswith(prefix):
            key = (r["shape"], r["tokens"])
            out[key] = min(out.get(key, float("inf")), r["seconds"])
    return out


def mixtral_batch1_bandwidth(res: Results) -> float | None:
    vals = [r["pct_bandwidth"] for r in _layer_rows(res)
            if r["shape"].startswith("Mixtral") and r["tokens"] == 1 and r["backend"].startswith("moeinfer triton")]
    return max(vals) if vals else None


def speedup_vs_transformers(res: Results, *, max_tokens: int | None) -> float | None:
    """The smallest (best transformers time / best moeinfer triton time) over shapes and token counts."""
    rows = _layer_rows(res)
    ours, theirs = _best(rows, "moeinfer triton"), _best(rows, "transformers")
    ratios = [theirs[k] / ours[k] for k in ours if k in theirs and (max_tokens is None or k[1] <= max_tokens)]
    return min(ratios) if ratios else None


def prefill_matmul(res: Results) -> float | None:
    vals = [r["pct_matmul"] for r in _layer_rows(res) if r["tokens"] == 4096 and r["backend"] == "moeinfer triton"]
    return min(vals) if vals else None


def _decode(res: Results, prefix: str) -> dict[str, Any] | None:
    return next((r for r in res.get("decode", {}).get("rows", []) if r["system"].startswith(prefix)), None)


def decode_roofline(res: Results) -> float | None:
    r = _decode(res, "moeinfer")
    return r["pct_roofline"] if r else None


def decode_vs_transformers(res: Results) -> float | None:
    a, b = _decode(res, "moeinfer"), _decode(res, "transformers")
    return a["decode_tok_s"] / b["decode_tok_s"] if a and b else None


def int4_over_bf16(res: Results) -> float | None:
    return res.get("int4", {}).get("int4_over_bf16")


def _live(res: Results, label: str) -> dict[str, Any] | None:
    return next((r for r in res.get("offload", {}).get("live", []) if r["label"] == label), None)


def offload_tok_s(res: Results) -> float | None:
    r = _live(res, "best")
    return r["tok_s"] if r else None


def offload_speedup(res: Results) -> float | None:
    return res.get("offload", {}).get("best_over_on_demand")


def simulator_error(res: Results) -> float | None:
    """The worst live run's error; a run predicted with the host time calibrated on another run
    (part f's out-of-sample check) counts with that calibrated prediction."""
    errs = [abs(r.get("prediction_error_calibrated", r["prediction_error"]))
            for r in res.get("offload", {}).get("live", []) if r["label"] != "on-demand"
            or "host_us_per_layer" not in res.get("offload", {})]
    return 100 * max(errs) if errs else None


# (target, unit, threshold, measure): holds when the measured value >= threshold (<= for the error)
TARGETS: list[tuple[str, str, float, Callable[[Results], float | None]]] = [
    ("Mixtral layer, batch 1: % of measured copy bandwidth", "%", 85.0, mixtral_batch1_bandwidth),
    ("layer: x transformers' best at 1-64 tokens (worst shape)", "x", 1.5,
     lambda r: speedup_vs_transformers(r, max_tokens=64)),
    ("layer: x transformers' best at every size (worst)", "x", 1.0,
     lambda r: speedup_vs_transformers(r, max_tokens=None)),
    ("layer, 4096-token prefill: % of dense matmul (worst shape)", "%", 60.0, prefill_matmul),
    ("decode: % of roofline", "%", 60.0, decode_roofline),
    ("decode: x transformers generate", "x", 3.0, decode_vs_transformers),
    ("int4 decode / bf16 decode", "x", 1.0, int4_over_bf16),
    ("offloaded Mixtral-8x7B at 24 GB: tok/s", "tok/s", 5.0, offload_tok_s),
    ("offloaded: x on-demand", "x", 3.0, offload_speedup),
    ("simulator error (worst live run)", "%", 25.0, simulator_error),
]


def evaluate(res: Results) -> list[dict[str, Any]]:
    out = []
    for name, unit, threshold, measure in TARGETS:
        try:
            value = measure(res)
        except (KeyError, TypeError, ZeroDivisionError):
            value = None
        lower_is_better = name.startswith("simulator error")
        holds = None if value is None else (value <= threshold if lower_is_better else value >= threshold)
        out.append(dict(target=name, unit=unit, threshold=threshold, value=value, holds=holds))
    return out


def markdown(rows: list[dict[str, Any]], *, dry_run: bool) -> str:
    head = ("| target | threshold | value (dry run: not a measurement) | holds |" if dry_run
            else "| target | threshold | measured | holds |")
    lines = [head, "|---|---:|---:|---|"]
    for r in rows:
        op = "<=" if r["target"].startswith("simulator error") else ">="
        value = "not measured" if r["value"] is None else f"{r['value']:.2f} {r['unit']}"
        holds = "-" if r["holds"] is None or dry_run else ("yes" if r["holds"] else "**no**")
        lines.append(f"| {r['target']} | {op} {r['threshold']:g} {r['unit']} | {value} | {holds} |")
    return "\n".join(lines)
