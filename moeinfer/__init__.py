"""moeinfer: fast, small and reliable inference for Mixture-of-Experts language models.

Public API (stable): `load`, `save`, `export`, `generate`, `Generation`, `MoEModel`, `ModelConfig`; transforms
applied after loading, in place: `compress_`, `use_kernel_`, `set_routing_`, `offload_`;
automatic configuration: `plan`, `apply_plan_`, `load_planned`, `Plan`.
Importing the package loads torch but initialises no GPU and imports no optional dependency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeinfer._lazy import lazy_exports

__version__ = "0.1.0"
__all__ = ["load", "save", "export", "generate", "Generation", "MoEModel", "ModelConfig", "supported_model_types",
           "evaluate", "offload_", "OffloadConfig", "use_kernel_", "compress_", "Recipe", "set_routing_",
           "plan", "apply_plan_", "load_planned", "Plan", "__version__"]

_LAZY = {
    "load": "moeinfer.api",
    "save": "moeinfer.api",
    "export": "moeinfer.api",
    "generate": "moeinfer.engine.generate",
    "Generation": "moeinfer.engine.generate",
    "MoEModel": "moeinfer.model.transformer",
    "ModelConfig": "moeinfer.config",
    "supported_model_types": "moeinfer.arch",
    "evaluate": "moeinfer.eval",
    "offload_": "moeinfer.offload.apply",
    "OffloadConfig": "moeinfer.offload.config",
    "use_kernel_": "moeinfer.kernels",
    "compress_": "moeinfer.compress.api",
    "Recipe": "moeinfer.compress.recipe",
    "set_routing_": "moeinfer.model.gating",
    "plan": "moeinfer.planning.planner",
    "apply_plan_": "moeinfer.planning.apply",
    "load_planned": "moeinfer.planning.load",
    "Plan": "moeinfer.planning.spec",
}

if TYPE_CHECKING:
    from moeinfer.api import export, load, save
    from moeinfer.arch import supported_model_types
    from moeinfer.config import ModelConfig
    from moeinfer.engine.generate import Generation, generate
    from moeinfer.eval import evaluate
    from moeinfer.model.transformer import MoEModel
    from moeinfer.offload.apply import offload_
    from moeinfer.offload.config import OffloadConfig
    from moeinfer.kernels import use_kernel_
    from moeinfer.compress.api import compress_
    from moeinfer.compress.recipe import Recipe
    from moeinfer.model.gating import set_routing_
    from moeinfer.planning.apply import apply_plan_
    from moeinfer.planning.load import load_planned
    from moeinfer.planning.planner import plan
    from moeinfer.planning.spec import Plan


__getattr__ = lazy_exports(__name__, _LAZY)
