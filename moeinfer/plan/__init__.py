"""Automatic configuration: `plan(model, budget)` chooses expert precision, placement, caching, kernel
and batch size for a memory budget from measured costs and quality; `apply_plan_(model, plan)` puts a
plan into effect (docs/planner.md). Importing this package measures nothing."""

from __future__ import annotations

import sys
import types

from moeinfer.plan.apply import apply_plan_
from moeinfer.plan.planner import parse_budget, plan
from moeinfer.plan.spec import Plan, PlanError, PlanOffload, Prediction

__all__ = ["plan", "apply_plan_", "Plan", "PlanOffload", "Prediction", "PlanError", "parse_budget"]


class _CallablePackage(types.ModuleType):
    """`moeinfer.plan` is both this package and the function: importing a submodule binds the package
    to the attribute `moeinfer.plan`, so the package forwards a call to `plan`."""

    def __call__(self, *args: object, **kwargs: object) -> Plan:
        return plan(*args, **kwargs)  # type: ignore[arg-type]


sys.modules[__name__].__class__ = _CallablePackage
