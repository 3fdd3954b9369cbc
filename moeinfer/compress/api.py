"""`compress_(model, recipe)`: apply model-level compression steps in place and record them.

Steps:
1. resolve the recipe (a Recipe, a list of steps, a dict or a YAML path) and validate every step
   against the method registry before touching the model;
2. collect calibration data once, if any step needs it (see moeinfer.compress.calibration);
3. run the steps in order; each returns a summary (what it removed, merged, quantized, ...);
4. record the steps and the resulting layout in the model's config (`moeinfer_compression`), so
   `moeinfer.save` writes a self-describing checkpoint and `moeinfer.load` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from moeinfer.compress.calibration import CalibrationConfig, CalibrationData, collect
from moeinfer.compress.presets import PRESETS
from moeinfer.compress.recipe import Recipe, Step, load_recipe
from moeinfer.compress.registry import CompressionError, get_method
from moeinfer.formats.layout import RECORD_KEY, RECORD_VERSION, describe, is_plain, sync_config_
from moeinfer.kernels.select import reapply_kernel_
from moeinfer.model.transformer import MoEModel

RecipeLike = Recipe | list[Step | dict[str, Any] | str] | dict[str, Any] | str | os.PathLike[str]


@dataclass
class CompressionReport:
    """What `compress_` did: per-step summaries and the weight bytes before and after."""

    recipe: Recipe
    steps: list[dict[str, Any]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    hf_loadable: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "steps": self.steps, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "hf_loadable": self.hf_loadable}


def weight_bytes(model: MoEModel) -> int:
    """Bytes of every parameter and persistent buffer (packed low-bit weights count as stored)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + [b for _, b in model.named_buffers() if b is not None]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def cast_floating_(model: MoEModel, dtype: torch.dtype) -> MoEModel:
    """`model.to(dtype)` that leaves `keep_float_dtype` modules' tensors (quantization scales) as they are."""
    done: dict[int, torch.nn.Parameter] = {}  # tied weights stay tied
    for module in model.modules():
        if getattr(module, "keep_float_dtype", False):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
                module._parameters[name] = done[id(p)]
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != dtype and name not in ("inv_freq",
                                                                                              "e_score_correction_bias"):
                module._buffers[name] = b.to(dtype)
    return model


def as_recipe(config: RecipeLike) -> Recipe:
    if isinstance(config, Recipe):
        return config
    if isinstance(config, (str, os.PathLike)):
        text = os.fspath(config)
        if text.endswith((".yaml", ".yml", ".json")) or os.path.isfile(text):
            return load_recipe(text)

        if text in PRESETS:
            return Recipe.of(*PRESETS[text], name=text)
        return Recipe.of(text)  # a single method name
    if isinstance(config, list):
        return Recipe.of(*config)
    if isinstance(config, dict):
        return Recipe.from_dict(config)
    raise CompressionError(f"a recipe must be a Recipe, a list of steps, a dict or a YAML path, got "
                           f"{type(config).__name__}")


@torch.no_grad()
def compress_(model: MoEModel, config: RecipeLike, *,
              calibration: CalibrationData | CalibrationConfig | str | None = None,
              progress: bool = True) -> CompressionReport:
    """Compress `model` in place with the recipe's steps; see the module docstring."""
    # 1. validate everything first
    recipe = as_recipe(config)
    methods = [get_method(s.method) for s in recipe.steps]
    params = [m.make_params(s.params, where=f"step {i + 1}: ") for i, (m, s) in enumerate(zip(methods, recipe.steps))]
    if not model.moe_blocks():
        raise CompressionError("the model has no MoE layers to compress")
    # 2. calibration, once
    needs = {m.needs for m in methods} - {"none"}
    calib: CalibrationData | None = None
    if isinstance(calibration, CalibrationData):
        calib = calibration
    elif needs:
        cfg = (calibration if isinstance(calibration, CalibrationConfig)
               else CalibrationConfig(source=calibration) if isinstance(calibration, str) else recipe.calibration)
        calib = collect(model, cfg, progress=progress)
    for m in methods:
        if m.needs != "none":
            assert calib is not None
            calib.check(m.name, m.needs)
    # 3. run the steps
    report = CompressionReport(recipe=recipe, bytes_before=weight_bytes(model))
    for m, p in zip(methods, params):
        summary = m.fn(model, p, calib, progress=progress) or {}
        report.steps.append(step_record(m.name, p, summary))
    # 4. record
    return record_compression_(model, report, calib)


def step_record(method: str, params: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """One step as `moeinfer_compression` records it (method, params dataclass as a dict, summary)."""
    return {"method": method, "params": dataclasses.asdict(params), "summary": summary}


def record_compression_(model: MoEModel, report: CompressionReport,
                        calib: CalibrationData | None = None) -> CompressionReport:
    """Step 4 of `compress_`, after `report.steps` ran on `model` (also by a caller that ran a method's
    function itself, such as `moeinfer.load_planned` quantizing while loading): the steps and the
    resulting layout into the model's config, the bytes after, and the kernel chosen before."""
    previous = list(model.config.hf_config.get(RECORD_KEY, {}).get("steps", []))
    sync_config_(model)
    layout = describe(model)
    model.config.hf_config[RECORD_KEY] = {"version": RECORD_VERSION, "steps": previous + report.steps,
                                          "calibration": None if calib is None else
                                          {"source": calib.source, "tokens": calib.tokens},
                                          "layout": layout}
    report.bytes_after = weight_bytes(model)
    report.hf_loadable = is_plain(layout)
    reapply_kernel_(model)  # the kernel chosen before, on the experts modules compression swapped in
    return report
