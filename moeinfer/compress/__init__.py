"""Model-level compression of MoE experts (section 3 of Liu et al., 2024, "A Survey on Inference
Optimization Techniques for Mixture of Experts Models"): pruning, merging, quantization, low-rank
decomposition, dynamic gating and sparse-to-dense, as registered methods composed by recipes.

    report = moeinfer.compress_(model, [{"method": "prune_reap", "keep": 6}, {"method": "quantize", "bits": 4}])
    moeinfer.save(model, "out/")        # self-describing: config.json records the steps and layout

Methods: `available_methods()`; each method's docstring names the paper it follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeinfer._lazy import lazy_exports

__all__ = ["CalibrationConfig", "CalibrationData", "CompressionError", "CompressionReport", "Recipe", "Step",
           "available_methods", "collect", "compress_", "get_method", "load_recipe", "register_method"]

_LAZY = {
    "compress_": "moeinfer.compress.api", "CompressionReport": "moeinfer.compress.api",
    "CalibrationConfig": "moeinfer.compress.calibration", "CalibrationData": "moeinfer.compress.calibration",
    "collect": "moeinfer.compress.calibration",
    "Recipe": "moeinfer.compress.recipe", "Step": "moeinfer.compress.recipe", "load_recipe": "moeinfer.compress.recipe",
    "CompressionError": "moeinfer.compress.registry", "available_methods": "moeinfer.compress.registry",
    "get_method": "moeinfer.compress.registry", "register_method": "moeinfer.compress.registry",
}

if TYPE_CHECKING:
    from moeinfer.compress.api import CompressionReport, compress_
    from moeinfer.compress.calibration import CalibrationConfig, CalibrationData, collect
    from moeinfer.compress.recipe import Recipe, Step, load_recipe
    from moeinfer.compress.registry import (CompressionError, available_methods, get_method,
                                            register_method)


__getattr__ = lazy_exports(__name__, _LAZY)
