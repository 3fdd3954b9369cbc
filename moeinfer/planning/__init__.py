"""Automatic configuration: `plan(model, budget)` (exported as `moeinfer.plan`) chooses expert precision,
placement, caching, kernel and batch size for a memory budget from measured costs and quality;
`apply_plan_(model, plan)` puts a plan into effect, `load_planned(path, plan)` loads a checkpoint
straight into one (experts left on disk when the plan offloads them: models bigger than memory;
docs/planner.md). Importing this package measures
nothing."""

from __future__ import annotations

from moeinfer.planning.apply import apply_plan_
from moeinfer.planning.load import load_planned
from moeinfer.planning.planner import parse_budget, plan
from moeinfer.planning.spec import Plan, PlanError, PlanOffload, Prediction

__all__ = ["plan", "apply_plan_", "load_planned", "Plan", "PlanOffload", "Prediction", "PlanError", "parse_budget"]

