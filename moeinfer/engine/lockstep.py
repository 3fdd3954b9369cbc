"""Running the batching engine's model and cache operations on every rank of an expert-parallel group.

Under expert parallelism every rank must run the same forwards on the same tokens (the all-to-alls
inside each MoE layer pair them up), but only rank 0 receives requests. So the engine sends each
operation through an `EngineOps`: `LocalOps` runs it here; `LeaderOps` (rank 0) first broadcasts
it to the other ranks, which replay the stream in `follow()` on their own, identical KV cache.
Sampling happens on rank 0 only: the logits are the same everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from moeinfer.engine.cpu_decode import RowPrograms
from moeinfer.model.kv_cache import KVCache
from moeinfer.model.transformer import MoEModel


class LocalOps:
    """The engine's model and cache operations, run in this process. A forward of one new token of one
    row on the CPU runs the prepared decode program (moeinfer/engine/cpu_decode.py: the eager forward's
    logits bit for bit)."""

    def __init__(self, model: MoEModel, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self.programs = RowPrograms(model, cache)

    def forward(self, ids: list[list[int]], start: int, stop: int) -> torch.Tensor:
        """Logits of the last position of each row, [rows, V], for new tokens ids in cache rows [start, stop)."""
        x = torch.tensor(ids, device=self.model.device)
        with self.programs.running(start, stop, x.shape[1]):
            return self.model(x, cache=self.programs.view(start, stop), logits_to_keep=1)[:, -1]

    def move_row(self, src: int, dst: int) -> None:
        self.cache.move_row(src, dst)

    def clear_row(self, row: int) -> None:
        self.cache.clear_row(row)

    def close(self) -> None:
        pass


class LeaderOps(LocalOps):
    """Rank 0: broadcast each operation to the followers, then run it."""

    def __init__(self, model: MoEModel, cache: KVCache, group: Any = None) -> None:
        super().__init__(model, cache)
        self.group = group
        self.closed = False

    def _send(self, *op: Any) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([op], src=0, group=self.group)

    def forward(self, ids: list[list[int]], start: int, stop: int) -> torch.Tensor:
        self._send("forward", ids, start, stop)
        return super().forward(ids, start, stop)

    def move_row(self, src: int, dst: int) -> None:
        self._send("move_row", src, dst)
        super().move_row(src, dst)

    def clear_row(self, row: int) -> None:
        self._send("clear_row", row)
        super().clear_row(row)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._send("stop")


def follow(model: MoEModel, cache: KVCache, group: Any = None) -> None:
    """Ranks other than 0: replay the leader's operations until it says stop."""
    import torch.distributed as dist

    local = LocalOps(model, cache)
    with torch.inference_mode():
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=group)
            name, *args = box[0]
            if name == "stop":
                return
            getattr(local, name)(*args)
