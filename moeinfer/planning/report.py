"""The plan as a plain-text table: the chosen configuration and its runners-up, with predictions."""

from __future__ import annotations

from moeinfer.planning.spec import Plan, Prediction


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _loss(p: Plan) -> str:
    q = p.predicted.quality_loss if p.predicted else None
    return "n/m" if q is None else f"{100 * q:+.2f}%"


def _memory(pr: Prediction) -> str:
    """Steady memory, and the load peak beside it where loading needs more."""
    peak = f" (load peak {_gb(pr.load_peak_bytes)})" if pr.load_peak_bytes > pr.memory_bytes else ""
    return _gb(pr.memory_bytes) + peak


def format_plan(plan: Plan) -> str:
    """Rows: the plan, then each runner-up; columns: decode and prefill tokens/s, memory, quality."""
    head = (f"plan for {plan.model} on {plan.device}, budget {_gb(plan.budget_bytes)}, objective {plan.objective}"
            " (predicted; quality = bits-per-byte increase, n/m = not measured)")
    rows = [("", "configuration", "decode tok/s", "prefill tok/s", "memory", "quality")]
    for i, p in enumerate((plan, *plan.runners_up)):
        pr = p.predicted
        rows.append(("chosen" if i == 0 else f"#{i + 1}", p.describe(),
                     f"{pr.decode_tok_s:.1f}" if pr else "-", f"{pr.prefill_tok_s:.1f}" if pr else "-",
                     _memory(pr) if pr else "-", _loss(p)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [head]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
