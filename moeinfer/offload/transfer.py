"""Asynchronous expert transfers from the slow tier into fast-tier slots.

`ThreadLoader` (CPU fast tier): one background thread performs the reads in issue order (a single
link, like a PCIe copy engine), so prefetches overlap the caller's compute; FIFO order also makes
two loads into the same slot land in the order the cache decided them.
`CudaLoader` (GPU fast tier), after Mixtral-offloading / MoE-Infinity: the disk tier is read by the
same thread into a pinned staging buffer; the copy to the GPU runs on a dedicated CUDA stream that
first waits for the last compute that used the slot (a slot id: a cache slot, or the offload
runtime's transient buffer, moeinfer.offload.experts.TRANSIENT), and records an event the compute
stream waits on before using the expert.
Every wait has a deadline: a transfer that fails raises `OffloadError` naming the expert, and one
that does not finish in `timeout_s` raises instead of hanging.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from moeinfer.offload.errors import OffloadError

Key = tuple[int, int]


class Handle:
    """A transfer in flight; `wait()` returns once the expert can be used, or raises OffloadError."""

    def __init__(self, key: Key, future: Future | None = None, event: Any = None, timeout_s: float = 60.0) -> None:
        self.key, self.future, self.event, self.timeout_s = key, future, event, timeout_s
        self.stall_s = 0.0

    def done(self) -> bool:
        if self.future is not None and not self.future.done():
            return False
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        t0 = time.perf_counter()
        deadline = t0 + self.timeout_s
        if self.future is not None:
            try:
                self.future.result(timeout=self.timeout_s)
            except FutureTimeout:
                raise OffloadError(f"loading expert {self.key[1]} of MoE layer {self.key[0]} did not finish "
                                   f"within {self.timeout_s:g} s") from None
            except OffloadError:
                raise
            except Exception as e:
                raise OffloadError(f"loading expert {self.key[1]} of MoE layer {self.key[0]} failed: {e}") from e
        if self.event is not None:
            while not self.event.query():
                if time.perf_counter() > deadline:
                    raise OffloadError(f"copying expert {self.key[1]} of MoE layer {self.key[0]} to the GPU "
                                       f"did not finish within {self.timeout_s:g} s")
                time.sleep(20e-6)
            torch.cuda.current_stream().wait_event(self.event)
        self.stall_s = time.perf_counter() - t0


ReadFn = Callable[[torch.Tensor, torch.Tensor], None]  # fills (gate_up, down) buffers


class ThreadLoader:
    """Reads on one background thread, in issue order."""

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeinfer-offload")

    def submit(self, key: Key, read: ReadFn, gate_up: torch.Tensor, down: torch.Tensor, slot: int | None) -> Handle:
        return Handle(key, self.pool.submit(read, gate_up, down), timeout_s=self.timeout_s)

    def used(self, slot: int | None) -> None:
        """The caller finished computing with `slot` (nothing to do on the CPU: compute is synchronous)."""

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class CudaLoader:
    """Reads to pinned staging on a thread, copies on a dedicated stream, synchronizes with events."""

    def __init__(self, *, timeout_s: float, device: torch.device, host_resident: bool) -> None:
        self.timeout_s = timeout_s
        self.device = device
        self.host_resident = host_resident  # the "cpu" tier: weights already pinned, no staging
        self.stream = torch.cuda.Stream(device=device)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeinfer-offload")
        self.slot_free: dict[int, torch.cuda.Event] = {}

    def submit(self, key: Key, read: ReadFn, gate_up: torch.Tensor, down: torch.Tensor, slot: int | None) -> Handle:
        free = self.slot_free.get(slot) if slot is not None else None

        def stage_and_copy() -> torch.cuda.Event:
            g = torch.empty(gate_up.shape, dtype=gate_up.dtype, pin_memory=True)
            d = torch.empty(down.shape, dtype=down.dtype, pin_memory=True)
            read(g, d)
            with torch.cuda.stream(self.stream):
                if free is not None:
                    self.stream.wait_event(free)
                gate_up.copy_(g, non_blocking=True)
                down.copy_(d, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            ev.synchronize()  # the staging buffers may be freed only after the copy
            return ev

        if self.host_resident:
            with torch.cuda.stream(self.stream):
                if free is not None:
                    self.stream.wait_event(free)
                read(gate_up, down)  # HostStore.read: non-blocking copies from pinned memory
                ev = torch.cuda.Event()
                ev.record(self.stream)
            return Handle(key, event=ev, timeout_s=self.timeout_s)
        return Handle(key, self.pool.submit(stage_and_copy), timeout_s=self.timeout_s)

    def used(self, slot: int | None) -> None:
        if slot is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.slot_free[slot] = ev

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
