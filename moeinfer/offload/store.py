"""The slow tier: every expert's weights, read one expert at a time.

Shapes: E experts, D hidden, I expert inner size; one expert = gate_up [2I, D] + down [D, I].

`DiskStore` keeps one safetensors file per MoE layer in an offload folder, expert-major, so one
expert is two adjacent byte ranges read with `os.preadv` straight into the destination buffer
(thread-safe, no memory map kept open: pages touched by a map would stay resident). Writing:
1. check the folder can be created and written and has room for every expert (named errors);
2. per layer, stream the header and each expert's bytes into a temp file beside the target;
3. fsync and rename it over `experts-LLL.safetensors`, so a reader never sees half a file.
`StoreWriter` runs these steps one layer at a time for a caller that makes each layer just before it is
written (experts quantized while loading); a failed write deletes the layers it wrote.
`HostStore` keeps the stacked tensors in host memory (pinned when a GPU will read them): the "cpu"
tier of a GPU machine, and the place CPU-assisted experts are computed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeinfer.fsutil import publishable_
from moeinfer.loading.errors import CheckpointError
from moeinfer.loading.safetensors_io import DTYPES, SafetensorsFile
from moeinfer.offload.errors import OffloadError

if TYPE_CHECKING:
    from moeinfer.offload.lowbit import LowBitCodec

Key = tuple[int, int]
_NAMES = {v: k for k, v in DTYPES.items()}
STORE_FORMAT = "moeinfer-expert-store"


def expert_nbytes(gate_up: torch.Tensor, down: torch.Tensor) -> int:
    """Bytes of one expert of stacked tensors gate_up [E, 2I, D], down [E, D, I]."""
    return (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()


def _flat_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class HostStore:
    """Experts kept as stacked tensors in host memory (pinned for fast GPU copies when asked)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], *, pin: bool = False) -> None:
        self.layers = []
        for gate_up, down in layers:
            gate_up, down = gate_up.detach().to("cpu"), down.detach().to("cpu")
            if pin:
                gate_up, down = gate_up.pin_memory(), down.pin_memory()
            self.layers.append((gate_up, down))
        self.expert_bytes = expert_nbytes(*self.layers[0])
        self.where = "host memory" + (" (pinned)" if pin else "")

    def host(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert's weights where they live (CPU tensors, no copy)."""
        gate_up, down = self.layers[key[0]]
        return gate_up[key[1]], down[key[1]]

    def read(self, key: Key, gate_up_out: torch.Tensor, down_out: torch.Tensor) -> None:
        gate_up, down = self.host(key)
        gate_up_out.copy_(gate_up, non_blocking=gate_up.is_pinned())
        down_out.copy_(down, non_blocking=down.is_pinned())

    def close(self) -> None:
        pass


def layer_file(root: Path, layer: int, suffix: str = "") -> Path:
    return root / f"experts-{layer:03d}{suffix}.safetensors"


def _check_dir(root: Path, need: int) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OffloadError(f"offload dir {root} cannot be created ({e.strerror})") from e
    if not os.access(root, os.W_OK | os.X_OK):
        raise OffloadError(f"offload dir {root} is not writable: the expert store needs {need:,} bytes there")
    free = shutil.disk_usage(root).free
    if free < need:
        raise OffloadError(f"offload dir {root} has {free:,} bytes free; the expert store needs {need:,}")


def _expert_tensors(gate_up: torch.Tensor, down: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(name, t) for e in range(gate_up.shape[0])
            for name, t in ((f"{e}.gate_up_proj", gate_up[e]), (f"{e}.down_proj", down[e]))]


def _low_bit_tensors(gate_up: torch.Tensor, down: torch.Tensor, codec: LowBitCodec) -> list[tuple[str, torch.Tensor]]:
    out = []
    for e in range(gate_up.shape[0]):
        for part, w in (("gate_up_proj", gate_up[e]), ("down_proj", down[e])):
            q = codec.quantize(w)
            out += [(f"{e}.{part}.packed", q.packed), (f"{e}.{part}.scale", q.scale), (f"{e}.{part}.zero", q.zero)]
    return out


def _write_layer(path: Path, layer: int, tensors: list[tuple[str, torch.Tensor]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": STORE_FORMAT, "layer": str(layer)}}
    offset, parts = 0, []
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        parts.append(t)
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for t in parts:
                f.write(_flat_bytes(t))
            f.flush()
            os.fsync(f.fileno())
        publishable_(tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OffloadError(f"writing expert store file {path} failed ({e.strerror or e})") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DiskStore:
    """One safetensors file per MoE layer in `root`; `read` fills an expert's buffers from disk."""

    def __init__(self, root: str | os.PathLike[str], num_layers: int, *, evict_page_cache: bool = False,
                 codec: LowBitCodec | None = None) -> None:
        self.root = Path(root)
        self.evict_page_cache = evict_page_cache
        self.codec = codec
        self.files: list[SafetensorsFile] = []
        self.fds: list[int] = []
        names = [(layer, "") for layer in range(num_layers)]
        if codec is not None:
            names += [(layer, codec.suffix) for layer in range(num_layers)]
        for layer, suffix in names:
            path = layer_file(self.root, layer, suffix)
            if not path.is_file():
                self.close()
                raise OffloadError(f"expert store file {path} is missing (MoE layer {layer})")
            try:
                sf = SafetensorsFile(path)
            except CheckpointError as e:
                self.close()
                raise OffloadError(f"expert store file {path} is unreadable: {e}") from e
            self.files.append(sf)
            self.fds.append(os.open(path, os.O_RDONLY))
        first = self.files[0].entries
        self.expert_bytes = first["0.gate_up_proj"].nbytes + first["0.down_proj"].nbytes
        self.low_bit_bytes = None
        if codec is not None:
            low = self.files[num_layers].entries
            self.low_bit_bytes = sum(low[f"0.{p}.{t}"].nbytes for p in ("gate_up_proj", "down_proj")
                                     for t in ("packed", "scale", "zero"))
        self.num_layers = num_layers
        self.where = f"disk ({self.root})"

    @classmethod
    def create(cls, root: str | os.PathLike[str], layers: list[tuple[torch.Tensor, torch.Tensor]], *,
               evict_page_cache: bool = False, progress: bool = False, codec: LowBitCodec | None = None) -> DiskStore:
        """Write every layer's experts into `root` (steps 1-3 of the module docstring) and open them;
        with a `codec`, also a low-bit copy of each layer (`experts-LLL.q4g128.safetensors`)."""
        need = sum(g.numel() * g.element_size() + d.numel() * d.element_size() for g, d in layers)
        if codec is not None:
            need += need * codec.bits // 16 + need // 8  # packed codes plus scales and zeros (a bound)
        writer = StoreWriter(root, len(layers), need=need, codec=codec)
        it = enumerate(layers)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(layers), desc=f"expert store {writer.root.name}", unit="layer")
        with writer:
            for layer, (gate_up, down) in it:
                writer.write(layer, gate_up, down)
        return writer.open(evict_page_cache=evict_page_cache)

    def _read(self, layer: int, name: str, out: torch.Tensor, *, low: bool = False) -> None:
        index = layer + (self.num_layers if low else 0)
        sf = self.files[index]
        entry = sf.entries.get(name)
        if entry is None:
            raise OffloadError(f"expert store file {sf.path} has no tensor {name!r}")
        if tuple(out.shape) != entry.shape or out.dtype != entry.dtype or not out.is_contiguous():
            raise OffloadError(f"expert store file {sf.path}: tensor {name!r} is {list(entry.shape)} {entry.dtype}, "
                               f"the buffer {list(out.shape)} {out.dtype}")
        fd = self.fds[index]
        try:
            n = os.preadv(fd, [_flat_bytes(out)], entry.offset)
        except OSError as e:
            raise OffloadError(f"reading {name!r} from expert store file {sf.path} failed ({e.strerror})") from e
        if n != entry.nbytes:
            raise OffloadError(f"expert store file {sf.path} is truncated while reading {name!r}")
        if self.evict_page_cache:
            os.posix_fadvise(fd, entry.offset, entry.nbytes, os.POSIX_FADV_DONTNEED)

    def read(self, key: Key, gate_up_out: torch.Tensor, down_out: torch.Tensor) -> None:
        """Read expert `key` into CPU buffers gate_up_out [2I, D] and down_out [D, I] (contiguous)."""
        layer, e = key
        self._read(layer, f"{e}.gate_up_proj", gate_up_out)
        self._read(layer, f"{e}.down_proj", down_out)

    def read_low_bit(self, key: Key, gate_up_out: torch.Tensor, down_out: torch.Tensor) -> None:
        """Read expert `key`'s low-bit copy and dequantize it into gate_up_out / down_out (mixed precision)."""
        if self.codec is None:
            raise OffloadError(f"expert store {self.root} holds no low-bit copies")
        layer, e = key
        files = self.files[self.num_layers + layer].entries
        for part, out in (("gate_up_proj", gate_up_out), ("down_proj", down_out)):
            bufs = {}
            for t in ("packed", "scale", "zero"):
                entry = files[f"{e}.{part}.{t}"]
                bufs[t] = torch.empty(entry.shape, dtype=entry.dtype)
                self._read(layer, f"{e}.{part}.{t}", bufs[t], low=True)
            out.copy_(self.codec.dequantize(bufs["packed"], bufs["scale"], bufs["zero"], cols=out.shape[-1],
                                            dtype=out.dtype))

    def host(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert read into fresh CPU tensors (for CPU-assisted compute from the disk tier)."""
        e = self.files[key[0]].entries[f"{key[1]}.gate_up_proj"]
        d = self.files[key[0]].entries[f"{key[1]}.down_proj"]
        gate_up, down = torch.empty(e.shape, dtype=e.dtype), torch.empty(d.shape, dtype=d.dtype)
        self.read(key, gate_up, down)
        return gate_up, down

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class StoreWriter:
    """Writes a `DiskStore` layer by layer (steps 1-3 of the module docstring), so a caller can write each
    layer as soon as it exists and free it (`moeinfer.planning.quantize_load`: quantized while loading).
    Used as a context manager: leaving it by an exception deletes every layer file it wrote, so a failed
    write leaves no store behind (files that were in the folder before are not touched)."""

    def __init__(self, root: str | os.PathLike[str], num_layers: int, *, need: int,
                 codec: LowBitCodec | None = None) -> None:
        self.root, self.num_layers, self.codec = Path(root), num_layers, codec
        _check_dir(self.root, need)
        self.written: list[Path] = []

    def write(self, layer: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Write layer `layer`'s experts gate_up [E, 2I, D], down [E, D, I] (any dtype; byte blobs too)."""
        gate_up, down = gate_up.detach().cpu(), down.detach().cpu()
        path = layer_file(self.root, layer)
        _write_layer(path, layer, _expert_tensors(gate_up, down))
        self.written.append(path)
        if self.codec is not None:
            path = layer_file(self.root, layer, self.codec.suffix)
            _write_layer(path, layer, _low_bit_tensors(gate_up, down, self.codec))
            self.written.append(path)

    def open(self, *, evict_page_cache: bool = False) -> DiskStore:
        """The finished store, opened for reading (every layer must have been written)."""
        return DiskStore(self.root, self.num_layers, evict_page_cache=evict_page_cache, codec=self.codec)

    def abort(self) -> None:
        """Delete every layer file this writer wrote."""
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written = []

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is not None:
            self.abort()
