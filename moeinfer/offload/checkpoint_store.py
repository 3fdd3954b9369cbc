"""`CheckpointStore`: the disk tier read straight from a checkpoint's own safetensors files.

Shapes: D hidden, I expert inner size; one expert = gate_up [2I, D] + down [D, I].

A model loaded with its experts left on disk (`load_checkpoint(..., experts_on_disk=True)`, which
records every expert's byte ranges in `ExpertFiles`) is offloaded without writing an expert store:
the checkpoint is the slow tier, so a checkpoint bigger than memory runs with only its dense weights
and the fast-tier cache in memory (as DiskStore, after FlexGen's and llama.cpp's mmap'd weights, but
read per expert). `read(key, gate_up, down)`:
1. look up the expert's parts (gate rows, up rows, down; or a fused gate_up row);
2. `os.preadv` each part straight into its rows of the destination buffers (no map kept open: pages
   touched by a map would stay resident) when the file's dtype is the model's, else into a staging
   buffer converted on copy;
3. count the read (`reads`, `bytes_read`): tests check experts are read only when the cache loads them.
Same interface as DiskStore (read, host, expert_bytes, where, close), so cache, loaders and CPU
assist are unchanged.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from moeinfer.loading.expert_files import ExpertFiles, ExpertPart
from moeinfer.offload.errors import OffloadError

Key = tuple[int, int]


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class CheckpointStore:
    """Experts read one at a time from the checkpoint files `files` describes (module docstring)."""

    def __init__(self, files: ExpertFiles, *, evict_page_cache: bool = False) -> None:
        files.check_complete()
        self.files = files
        self.evict_page_cache = evict_page_cache
        self.expert_bytes = files.expert_bytes
        self.where = f"checkpoint ({files.root})"
        self.fds: dict[Any, int] = {}
        self.reads = 0
        self.bytes_read = 0
        self._lock = threading.Lock()
        try:
            for parts in files.parts.values():
                for p in parts:
                    if p.path not in self.fds:
                        self.fds[p.path] = os.open(p.path, os.O_RDONLY)
        except OSError as e:
            self.close()
            raise OffloadError(f"opening checkpoint file {e.filename} for the expert tier failed ({e.strerror})") from e

    def _read_part(self, p: ExpertPart, out: torch.Tensor, key: Key) -> None:
        # 2. straight into the buffer when the dtypes agree, else through a staging buffer
        n = out.numel() * p.dtype.itemsize
        if n != p.nbytes:
            raise OffloadError(f"{p.path}: MoE layer {key[0]} expert {key[1]} part {p.part} holds {p.nbytes} bytes, "
                               f"the buffer {list(out.shape)} {p.dtype} needs {n}")
        direct = out.dtype == p.dtype and out.is_contiguous()
        dst = out if direct else torch.empty(out.shape, dtype=p.dtype)
        fd = self.fds[p.path]
        try:
            got = os.preadv(fd, [_bytes_of(dst)], p.offset)
        except OSError as e:
            raise OffloadError(f"reading MoE layer {key[0]} expert {key[1]} from {p.path} failed ({e.strerror})") from e
        if got != p.nbytes:
            raise OffloadError(f"checkpoint file {p.path} is truncated while reading MoE layer {key[0]} "
                               f"expert {key[1]}")
        if not direct:  # converted, then written as bytes (the loader's thread is outside inference mode)
            _bytes_of(out)[:] = _bytes_of(dst.to(out.dtype))
        if self.evict_page_cache:
            os.posix_fadvise(fd, p.offset, p.nbytes, os.POSIX_FADV_DONTNEED)

    def read(self, key: Key, gate_up_out: torch.Tensor, down_out: torch.Tensor) -> None:
        """Read expert `key` into CPU buffers gate_up_out [2I, D] and down_out [D, I] (contiguous)."""
        # 1. the expert's parts
        parts = self.files.parts.get(key)
        if parts is None:
            raise OffloadError(f"checkpoint {self.files.root} has no MoE layer {key[0]} expert {key[1]}")
        half = gate_up_out.shape[0] // 2
        views = {"gate": gate_up_out[:half], "up": gate_up_out[half:], "gate_up": gate_up_out, "down": down_out}
        for p in parts:
            self._read_part(p, views[p.part], key)
        # 3. count
        with self._lock:
            self.reads += 1
            self.bytes_read += sum(p.nbytes for p in parts)

    def host(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert read into fresh CPU tensors (CPU-assisted compute from the disk tier)."""
        gate_up = torch.empty(self.files.gate_up_shape, dtype=self.files.dtype)
        down = torch.empty(self.files.down_shape, dtype=self.files.dtype)
        self.read(key, gate_up, down)
        return gate_up, down

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
