"""Compression recipes: an ordered list of steps (e.g. merge, then quantize), from Python or YAML.

    name: merge6-int4                      # optional
    calibration: {source: heldout, max_tokens: 4096}   # optional; see CalibrationConfig
    steps:
      - method: merge
        num_experts: 6
      - {method: quantize, bits: 4, group_size: 64}

Every step is checked against the method registry before anything runs: an unknown method or
parameter names the step and lists what exists.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeinfer.compress.calibration import CalibrationConfig
from moeinfer.compress.registry import CompressionError, get_method


@dataclass(frozen=True)
class Step:
    """One method with its parameters (a dict here; the method's dataclass once validated)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    name: str = "recipe"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if not self.steps:
            raise CompressionError(f"recipe {self.name!r} has no steps")
        for i, step in enumerate(self.steps):
            get_method(step.method).make_params(step.params, where=f"recipe {self.name!r} step {i + 1}: ")

    @classmethod
    def of(cls, *steps: Step | dict[str, Any] | str, name: str = "recipe",
           calibration: CalibrationConfig | None = None) -> Recipe:
        """Recipe.of("prune_frequency", {"method": "quantize", "bits": 4}, Step(...))."""
        return cls(tuple(_step(s, i) for i, s in enumerate(steps)), name, calibration or CalibrationConfig())

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "recipe") -> Recipe:
        if isinstance(data, list):
            data = {"steps": data}
        if not isinstance(data, dict):
            raise CompressionError(f"{where}: a recipe is a mapping with 'steps' (or a list of steps)")
        bad = sorted(set(data) - {"name", "steps", "calibration"})
        if bad:
            raise CompressionError(f"{where}: unknown key(s) {', '.join(bad)}; keys: name, steps, calibration")
        steps = data.get("steps")
        if not isinstance(steps, list):
            raise CompressionError(f"{where}: 'steps' must be a list of steps")
        calib = data.get("calibration") or {}
        if isinstance(calib, str):
            calib = {"source": calib}
        try:
            calibration = CalibrationConfig(**calib)
        except TypeError as e:
            raise CompressionError(f"{where}: calibration: {e}") from None
        return cls(tuple(_step(s, i, where) for i, s in enumerate(steps)), str(data.get("name", "recipe")),
                   calibration)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "calibration": dataclasses.asdict(self.calibration),
                "steps": [s.to_dict() for s in self.steps]}


def _step(s: Step | dict[str, Any] | str, i: int, where: str = "recipe") -> Step:
    if isinstance(s, Step):
        return s
    if isinstance(s, str):
        return Step(s)
    if not isinstance(s, dict) or not isinstance(s.get("method"), str):
        raise CompressionError(f"{where}: step {i + 1} must be a mapping with a 'method' name, got {s!r}")
    params = dict(s.get("params") or {})
    params.update({k: v for k, v in s.items() if k not in ("method", "params")})
    return Step(s["method"], params)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """A recipe from a YAML (or JSON) file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CompressionError(f"recipe file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CompressionError(f"{p}: not valid YAML: {e}") from None
    return Recipe.from_dict(data, where=str(p))
