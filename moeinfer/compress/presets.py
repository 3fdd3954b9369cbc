"""Named recipes, reached by name wherever a recipe is accepted (`compress_(model, "int4")`,
`moeinfer compress --recipe int4`, the benchmark's compression axis).

"int4" uses algorithm "auto": HQQ on models whose routed experts hold at most 250M weights (the
shipped model), round-to-nearest above, where HQQ would take many minutes (see
moeinfer.compress.methods.quantize). The "-all" presets quantize attention, dense/shared MLPs and
lm_head too, as llama.cpp's model types do (its Q8_0/Q4_0 files keep only norms, routers and, for
Q4_0 without --pure, the output matrix at Q6_K, in higher precision); embeddings stay in floating
point here (a lookup reads one row per token).
"""

from __future__ import annotations

from typing import Any

_ALL = {"scope": "all", "lm_head": True}

PRESETS: dict[str, list[dict[str, Any]]] = {
    "int8": [{"method": "quantize", "bits": 8, "group_size": 128, "algorithm": "rtn"}],
    "int4": [{"method": "quantize", "bits": 4, "group_size": 128, "algorithm": "auto"}],
    "q8_0": [{"method": "quantize", "bits": 8, "group_size": 32, "algorithm": "sym"}],
    "q4_0": [{"method": "quantize", "bits": 4, "group_size": 32, "algorithm": "sym"}],
    "int8-all": [{"method": "quantize", "bits": 8, "group_size": 128, "algorithm": "rtn", **_ALL}],
    "int4-all": [{"method": "quantize", "bits": 4, "group_size": 128, "algorithm": "auto", **_ALL}],
    "q8_0-all": [{"method": "quantize", "bits": 8, "group_size": 32, "algorithm": "sym", **_ALL}],
    "q4_0-all": [{"method": "quantize", "bits": 4, "group_size": 32, "algorithm": "sym", **_ALL}],
    "int3": [{"method": "quantize", "bits": 3, "group_size": 64, "algorithm": "hqq"}],
    "int2": [{"method": "quantize", "bits": 2, "group_size": 64, "algorithm": "hqq"}],
    "mixed-2.5": [{"method": "quantize_mixed", "avg_bits": 2.5, "candidates": [2, 3, 4], "group_size": 64}],
    "prune-25": [{"method": "prune_reap", "ratio": 0.25}],
    "merge-25": [{"method": "merge", "ratio": 0.25}],
    "lowrank-50": [{"method": "lowrank", "keep": 0.5}],
    "sparse-50": [{"method": "prune_unstructured", "sparsity": 0.5}],
    "dense": [{"method": "dense"}],
    "prune-25+int4": [{"method": "prune_reap", "ratio": 0.25},
                      {"method": "quantize", "bits": 4, "group_size": 128, "algorithm": "auto"}],
}
