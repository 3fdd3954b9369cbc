"""The configuration of expert parallelism (one typed dataclass, validated on creation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moeinfer.config import ConfigError

TokenMode = Literal["replicated", "sharded"]
TOKEN_MODES = ("replicated", "sharded")


@dataclass(frozen=True)
class ExpertParallelConfig:
    """How experts are spread over the ranks of a process group and how tokens reach them.

    size:           number of ranks expected (the N of `--expert-parallel N`); None = the group's size.
    placement:      a strategy name (contiguous, round_robin, balanced, replicated) or the path of a
                    placement JSON written by `moeinfer placement`.
    profile:        routing trace or profile that balanced/replicated placements are computed from.
    slots_per_rank: memory budget of the replicated strategy, in experts per rank per layer.
    tokens:         "replicated": every rank runs the same batch (attention and the rest of the model
                    replicated, the generation engine unchanged); each rank dispatches a 1/W share of
                    the tokens and the outputs are all-gathered. "sharded": each rank's tokens are its
                    own (data-parallel attention); no all-gather.
    dedup:          send a token once per destination rank even when several of its experts live
                    there (the receiver returns their weighted sum); False sends one copy per expert.
    overlap:        two-batch overlap: split the tokens in two micro-batches so that the all-to-all of
                    one runs while the experts of the other compute.
    timeout_s:      bound on every collective; a dead or stuck peer gives an error, not a hang.
    backend:        torch.distributed backend; None = nccl with CUDA, gloo otherwise.
    """

    size: int | None = None
    placement: str = "contiguous"
    profile: str | None = None
    slots_per_rank: int | None = None
    tokens: TokenMode = "replicated"
    dedup: bool = True
    overlap: bool = False
    timeout_s: float = 300.0
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ConfigError(f"expert parallel size must be >= 1, got {self.size}")
        if self.tokens not in TOKEN_MODES:
            raise ConfigError(f"tokens={self.tokens!r} is not a token mode; valid: {', '.join(TOKEN_MODES)}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.slots_per_rank is not None and self.slots_per_rank < 1:
            raise ConfigError(f"slots_per_rank must be >= 1, got {self.slots_per_rank}")
        if self.backend is not None and self.backend not in ("gloo", "nccl", "mpi"):
            raise ConfigError(f"backend {self.backend!r} is not supported; valid: gloo, nccl, mpi")
        if not self.placement:
            raise ConfigError("placement must name a strategy or a placement JSON file")
