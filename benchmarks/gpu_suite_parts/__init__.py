"""The parts of benchmarks/gpu_suite.py, one concept per file, run in this order (issue 15, item 1):

    a env      environment and the measured limits every figure is divided by
    b tests    `pytest -m gpu`, one record per test
    c layer    the MoE layer table (benchmarks/bench_moe.py's bench_layer)
    d decode   end-to-end batch-1 decode, CUDA graphs vs transformers generate
    e int4     int4 experts vs bf16 decode on the same model
    f offload  offloaded Mixtral-8x7B-shaped decode with replayed real routing, and the simulator

Each part is `run(ctx) -> result dict` plus `markdown(result) -> str`; nothing heavy is imported
before a part runs.
"""

from __future__ import annotations

from gpu_suite_parts.common import PARTS, Context, Part, part

# importing the parts registers them, in the order they run
from gpu_suite_parts import env, gpu_tests, layer, decode, offload  # noqa: E402, F401  isort: skip

__all__ = ["PARTS", "Context", "Part", "part"]
