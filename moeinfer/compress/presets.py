"""Named recipes, reached by name wherever a recipe is accepted (`compress_(model, "int4")`,
`moeinfer compress --recipe int4`, the benchmark's compression axis)."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, list[dict[str, Any]]] = {
    "int8": [{"method": "quantize", "bits": 8, "group_size": 128, "algorithm": "rtn"}],
    "int4": [{"method": "quantize", "bits": 4, "group_size": 128, "algorithm": "hqq"}],
    "q8_0": [{"method": "quantize", "bits": 8, "group_size": 32, "algorithm": "sym"}],
    "q4_0": [{"method": "quantize", "bits": 4, "group_size": 32, "algorithm": "sym"}],
    "int3": [{"method": "quantize", "bits": 3, "group_size": 64, "algorithm": "hqq"}],
    "int2": [{"method": "quantize", "bits": 2, "group_size": 64, "algorithm": "hqq"}],
    "mixed-2.5": [{"method": "quantize_mixed", "avg_bits": 2.5, "candidates": [2, 3, 4], "group_size": 64}],
    "prune-25": [{"method": "prune_reap", "ratio": 0.25}],
    "merge-25": [{"method": "merge", "ratio": 0.25}],
    "lowrank-50": [{"method": "lowrank", "keep": 0.5}],
    "sparse-50": [{"method": "prune_unstructured", "sparsity": 0.5}],
    "dense": [{"method": "dense"}],
    "prune-25+int4": [{"method": "prune_reap", "ratio": 0.25},
                      {"method": "quantize", "bits": 4, "group_size": 128, "algorithm": "hqq"}],
}
