"""Reading safetensors files straight into preallocated tensors.

The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}}, then raw little-endian bytes.
We read it with plain `readinto` rather than the library's memory map because a memory map keeps
every touched page resident while the map is open: loading would peak at about twice the weight
bytes. Reading into the final parameter keeps the peak near 1x and lets us check every offset
against the file size first, so a truncated or corrupt file is named before any tensor is read.
Writing uses the `safetensors` library.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeinfer.loading.config_json import parse_json
from moeinfer.loading.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
STAGING_BYTES = 4 * 1024 * 1024  # dtype conversion goes through a buffer this big


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype_label: str = ""  # the header's name for dtype (F32, BF16, ...)


class SafetensorsFile:
    """Header of one safetensors file, validated against the file's size."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint file {self.path} "
                                  + ("is not a regular file" if self.path.exists() else "does not exist"))
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is truncated: {size} bytes, no safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{self.path} is corrupt or truncated: header length {n} "
                                      f"does not fit in a {size}-byte file")
            try:
                header = parse_json(f.read(n), "its header")
            except CheckpointError as e:
                raise CheckpointError(f"{self.path} is corrupt: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is corrupt: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise CheckpointError(f"{self.path} is corrupt: __metadata__ must be an object")
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_start=8 + n, size=size)
        self._check_overlaps()

    def _check_overlaps(self) -> None:
        """Two tensors may not share bytes (the format lays them end to end); an overlap means a corrupt
        or crafted header whose tensors would silently alias each other's data."""
        spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in self.entries.values() if e.nbytes)
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise CheckpointError(f"{self.path} is corrupt: tensors {a!r} and {b!r} overlap (their "
                                      "data_offsets share bytes)")

    def _entry(self, name: str, info: dict, *, data_start: int, size: int) -> TensorEntry:
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(_count(s) for s in info["shape"])
            begin, end = (_count(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry {info!r:.200} "
                                  f"(dtype one of {', '.join(DTYPES)}, shape and data_offsets non-negative "
                                  "integers)") from e
        numel = 1
        for s in shape:
            numel *= s
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or begin < 0:
            raise CheckpointError(f"{self.path}: tensor {name!r} claims {end - begin} bytes for shape "
                                  f"{list(shape)} {info['dtype']} ({expected} bytes)")
        if data_start + end > size:
            raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends at byte "
                                  f"{data_start + end} but the file has {size} bytes")
        return TensorEntry(name, dtype, shape, data_start + begin, expected, info["dtype"])

    def read_into(self, name: str, out: torch.Tensor, f, staging: torch.Tensor | None = None) -> None:
        """Copy tensor `name` into `out` (same shape; converts dtype/device when they differ).

        A conversion reads through `staging` (a uint8 buffer reused across calls, STAGING_BYTES when
        not given) a chunk at a time, so converting never holds a second full-size copy of a tensor.
        """
        entry = self.entries[name]
        if tuple(out.shape) != entry.shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(entry.shape)}, "
                                  f"expected {list(out.shape)} from config.json")
        f.seek(entry.offset)
        if out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous():
            self._read_exact(name, out.reshape(-1).view(torch.uint8), f)
            return
        if not out.is_contiguous():
            buf = torch.empty(entry.shape, dtype=entry.dtype)
            self._read_exact(name, buf.reshape(-1).view(torch.uint8), f)
            out.copy_(buf)
            return
        staging = staging if staging is not None else torch.empty(STAGING_BYTES, dtype=torch.uint8)
        itemsize = torch.empty((), dtype=entry.dtype).element_size()
        per_chunk = max(1, staging.numel() // itemsize)
        flat = out.view(-1)
        for start in range(0, flat.numel(), per_chunk):
            n = min(per_chunk, flat.numel() - start)
            chunk = staging[: n * itemsize]
            self._read_exact(name, chunk, f)
            flat[start:start + n].copy_(chunk.view(entry.dtype))

    def _read_exact(self, name: str, dst: torch.Tensor, f) -> None:
        if dst.numel() and f.readinto(memoryview(dst.numpy())) != dst.numel():
            raise CheckpointError(f"{self.path} is truncated while reading tensor {name!r}")
