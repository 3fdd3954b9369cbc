"""torch.distributed set-up for expert parallelism: backend choice, bounded timeouts, clear errors.

1. the backend is nccl when CUDA is available (one GPU per local rank), gloo otherwise;
2. the process group is created from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)
   with a timeout, so a dead or stuck peer ends in an error on every rank rather than a hang;
3. every collective goes through `guarded`, which names the operation, layer and rank in the error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class ExpertParallelError(RuntimeError):
    """A collective of expert parallelism failed: a peer died, timed out or disagreed."""


def default_backend() -> str:
    """nccl with CUDA (unverified in this project's CI: no GPU), gloo on CPU."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_distributed(*, backend: str | None = None, timeout_s: float = 300.0) -> dist.ProcessGroup:
    """The default process group, created from torchrun's environment if it does not exist yet."""
    if dist.is_initialized():
        return dist.group.WORLD
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ExpertParallelError(f"expert parallelism needs a process group: run under `torchrun "
                                  f"--nproc-per-node N` (environment lacks {', '.join(missing)})")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD


def rank_of(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def world_of(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def is_primary() -> bool:
    """True on global rank 0 (or without torch.distributed): the one rank that prints and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def guarded(what: str, fn: Callable[[], T], *, rank: int, timeout_s: float | None = None) -> T:
    """Run a collective; turn the backend's failure into an ExpertParallelError naming `what`."""
    try:
        return fn()
    except ExpertParallelError:
        raise
    except (RuntimeError, ValueError) as e:  # DistBackendError / gloo errors are RuntimeErrors
        bound = f" or did not answer within the {timeout_s:g} s timeout" if timeout_s else ""
        raise ExpertParallelError(f"rank {rank}: {what} failed: a peer rank died{bound} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


class Pending:
    """An async collective; `wait` goes through `guarded` too."""

    def __init__(self, work: Any, what: str, rank: int, timeout_s: float | None) -> None:
        self.work, self.what, self.rank, self.timeout_s = work, what, rank, timeout_s

    def wait(self) -> None:
        if self.work is not None:
            guarded(self.what, self.work.wait, rank=self.rank, timeout_s=self.timeout_s)


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], *,
               group: dist.ProcessGroup, what: str, rank: int, timeout_s: float | None,
               async_op: bool = False) -> Pending:
    """all_to_all_single along dim 0 with uneven splits (gloo and nccl both implement it)."""
    work = guarded(what, lambda: dist.all_to_all_single(out, inp, out_splits, in_splits, group=group,
                                                        async_op=async_op),
                   rank=rank, timeout_s=timeout_s)
    return Pending(work if async_op else None, what, rank, timeout_s)


@contextlib.contextmanager
def quiet_unless_primary() -> Iterator[None]:
    """Send stdout of ranks other than 0 to /dev/null (stderr stays: errors show on every rank)."""
    import sys

    if is_primary():
        yield
        return
    saved = sys.stdout
    with open(os.devnull, "w") as null:
        sys.stdout = null
        try:
            yield
        finally:
            sys.stdout = saved
