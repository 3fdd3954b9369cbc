"""Disk-tier reads on a CPU as the machine profile measures them (moeinfer/planning/profile.py, step 1).

1. `cached_read_gbps`: `os.preadv` from a file the page cache holds into one buffer, what a miss of
   a disk tier costs when the store's pages are cached;
2. `read_overlap`: how much of such a read hides behind compute running at the same time. The live
   cache reads a miss on its loader thread while the experts module computes the layer's hits
   (moeinfer/offload/experts.py), and the offload simulator overlaps the two unless told not to. On
   a CPU a page-cached read is a kernel memcpy: it needs a core and memory bandwidth, which expert
   decode (itself a stream of weights from memory) also uses. Measured on the 2-core development
   machine (busy), a 64 MiB read beside a 64 MiB expert call took 0.8-0.9x their sum at 1 thread
   and more than their sum at 2 (the OpenMP team waits for the core the read holds), and the
   profiled real-shape run's step was the sum of its experts' compute, dense part and reads: no
   overlap. A machine with cores and bandwidth to spare hides the read. Which of the two is longer
   matters: a long read hides a short call (the call runs on the core the read leaves), a short read
   beside a long call does not (the call's thread team waits for the read's core), so the profile
   times a read shorter than the call, as a miss's read is beside a decode step's compute
   (moeinfer/planning/profile.py `_read_overlap`).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moeinfer.timing import time_call


@contextmanager
def cached_file(nbytes: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(descriptor of a temporary file of `nbytes` random bytes the page cache holds, a buffer of its
    size); the file is removed on exit."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    with tempfile.TemporaryDirectory(prefix="moeinfer-profile-") as d:
        path = Path(d) / "cached.bin"
        path.write_bytes(memoryview(torch.randint(0, 255, (nbytes,), dtype=torch.uint8).numpy()))
        fd = os.open(path, os.O_RDONLY)
        try:
            yield fd, buf
        finally:
            os.close(fd)


def _reader(fd: int, buf: torch.Tensor) -> Callable[[], None]:
    view = memoryview(buf.numpy())
    return lambda: os.preadv(fd, [view], 0) and None


def cached_read_gbps(mib: int = 64) -> float:
    """Step 1: GB/s of one `os.preadv` of `mib` MiB from a page-cached file (the least of 5)."""
    n = mib * 2**20
    with cached_file(n) as (fd, buf):
        s = time_call(_reader(fd, buf), stat="min", reps=5)
    return n / s / 1e9


def read_overlap(compute: Callable[[], Any], *, nbytes: int, repeats: int = 7) -> float:
    """Step 2: the share of the shorter of `compute` and a page-cached read of `nbytes` that is hidden
    when the read runs on another thread during `compute`: (compute + read - both) / min(compute,
    read), each the least of `repeats`, the three timed in turn (after one warm-up each) so a change
    of load on the machine touches them alike; clipped to [0, 1] (0: as if one after the other)."""
    with cached_file(nbytes) as (fd, buf):
        read = _reader(fd, buf)

        def both() -> None:
            t = threading.Thread(target=read)
            t.start()
            compute()
            t.join()

        runs = (compute, read, both)
        best = [float("inf")] * len(runs)
        for fn in runs:
            fn()
        for _ in range(repeats):
            for i, fn in enumerate(runs):
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
    c, r, b = best
    return min(1.0, max(0.0, (c + r - b) / max(min(c, r), 1e-12)))
