"""Routing traces (floor 2 of docs/architecture.md): the recorded expert choices of a run
(`trace`: RoutingTrace, RoutingRecorder, record_routing), their statistics (`stats`) and converters
from other tools' formats (`convert`). Offload, expert parallelism, compression and the CLI read
them, so they live beside the engine, not in it."""
