"""Quantized experts in the offload tiers: one expert's packed codes, scales and zeros as byte blobs.

Shapes: E experts, D hidden, I expert inner size, P packed bytes per row, G groups per row.

`offload_` moves experts between tiers as two buffers per expert (gate_up, down); the stores, the
loaders and the cache only count and copy bytes. For the group-wise quantized experts of
`moeinfer.formats.quantized_experts` each buffer is a uint8 blob holding one matrix's three parts
back to back, each padded to 8 bytes so that every part is an aligned view of the blob:
    codes  uint8 [rows, P(cols)] | scale [rows, G(cols)] | zero [rows, G(cols)]
with gate_up (rows 2I, cols D) and down (rows D, cols I), scales and zeros in the module's dtype.
1. `PackedFormat.of(experts)` reads the layout of a QuantizedExperts layer (one bit width per layer);
2. `stacked` writes each expert's blobs [E, n] (what the slow tier stores);
3. the fast tier computes a cached expert from views of its slot (`dequantize` of each matrix, then
   SwiGLU): the same function and the same bytes as QuantizedExperts' eager reference, so an
   offloaded layer gives exactly the resident layer's output (its `eager_forward`);
4. or, with kernel "cpu" on a CPU fast tier (widths 4 and 8, native library built), through the native
   quantized kernels (moeinfer/kernels/quantized_cpu.py) reading the slot's codes in place, one expert
   per call (`native_expert_fn`; prompts with fp32 activations): equal to the resident native path up
   to fp32 summation order. Each slot's views (a one-expert `SlotStack`) are made once (`SlotViews`):
   making six views per call had cost about as much as the native call itself on a small model;
5. elsewhere the slots are read as one stack (`SlotStack`: each part seen across the slots is a
   strided [S, rows, cols] view, every expert's rows contiguous), so one native call runs all the
   cached experts a step routes to (moeinfer/offload/slot_experts.py).
The zeros are skipped by the native kernels only where every offloaded expert is symmetric
(`midpoint_zeros`, found when the experts are offloaded): a slot's bytes change under its views, so
nothing is judged from the bytes a slot happens to hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeinfer.formats.quant.groupwise import dequantize, num_groups
from moeinfer.formats.quant.packing import packed_cols
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.kernels.quantized_cpu import quantized_moe_cpu, unsupported
from moeinfer.offload.errors import OffloadError

MATRICES = ("gate_up", "down")
_ALIGN = 8


def _pad(n: int) -> int:
    return n + (-n % _ALIGN)


@dataclass(frozen=True)
class PackedFormat:
    """How one quantized expert of a layer is laid out as two byte blobs (module docstring)."""

    bits: int
    group_size: int
    hidden: int
    inter: int
    scale_dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, experts: QuantizedExperts) -> PackedFormat:
        """Step 1: the format of a QuantizedExperts layer whose experts share one bit width."""
        widths = sorted(set(experts.bits))
        if len(widths) != 1:
            raise OffloadError(f"quantized experts of mixed widths {widths} in one layer cannot be offloaded "
                               "(one width per layer; quantize uniformly or per layer)")
        b = widths[0]
        return cls(bits=b, group_size=experts.group_size, hidden=experts.hidden_size,
                   inter=experts.intermediate_size, scale_dtype=getattr(experts, f"s{b}_gate_up").dtype)

    def _dims(self, m: str) -> tuple[int, int]:
        return (2 * self.inter, self.hidden) if m == "gate_up" else (self.hidden, self.inter)

    def _parts(self, m: str) -> list[tuple[tuple[int, int], torch.dtype]]:
        rows, cols = self._dims(m)
        G = num_groups(cols, self.group_size)
        return [((rows, packed_cols(cols, self.bits)), torch.uint8), ((rows, G), self.scale_dtype),
                ((rows, G), self.scale_dtype)]

    def nbytes(self, m: str) -> int:
        """Bytes of one expert's blob of matrix `m` (parts padded to 8 bytes)."""
        return sum(_pad(r * c * torch.empty((), dtype=dt).element_size()) for (r, c), dt in self._parts(m))

    @property
    def expert_bytes(self) -> int:
        return self.nbytes("gate_up") + self.nbytes("down")

    def views(self, blob: torch.Tensor, m: str) -> list[torch.Tensor]:
        """(codes, scale, zero) of matrix `m`, as views of a contiguous uint8 blob [nbytes(m)]."""
        return [t[0] for t in self.stack_views(blob[None], m)]

    def stack_views(self, blobs: torch.Tensor, m: str) -> list[torch.Tensor]:
        """(codes [S, rows, P], scale [S, rows, G], zero [S, rows, G]) of matrix `m` across blobs [S, nbytes(m)]
        (the rows of a uint8 tensor, e.g. an offload cache's slots): strided views, each blob's part in
        place, every expert's rows contiguous (what the native kernels read as a stack)."""
        out, off = [], 0
        for (r, c), dt in self._parts(m):
            n = r * c * torch.empty((), dtype=dt).element_size()
            out.append(blobs[:, off:off + n].view(dt).unflatten(1, (r, c)))
            off += _pad(n)
        return out

    def stacked(self, experts: QuantizedExperts) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 2: every expert's blobs, (gate_up [E, n_gu], down [E, n_d]) uint8 on the CPU."""
        if PackedFormat.of(experts) != self:
            raise OffloadError(f"quantized experts {experts.extra_repr()} differ from the offloaded format {self}")
        out = []
        b = self.bits
        for m in MATRICES:
            blobs = torch.zeros(experts.num_experts, self.nbytes(m), dtype=torch.uint8)
            for e in range(experts.num_experts):
                row = experts.slot[e]
                for dst, name in zip(self.views(blobs[e], m), ("q", "s", "z")):
                    dst.copy_(getattr(experts, f"{name}{b}_{m}")[row])
            out.append(blobs)
        return out[0], out[1]

    def dequantize(self, blob: torch.Tensor, m: str, dtype: torch.dtype) -> torch.Tensor:
        """Step 3: matrix `m` of one expert from its blob, exactly as QuantizedExperts dequantizes it."""
        q, s, z = self.views(blob, m)
        return dequantize(q, s, z, bits=self.bits, group_size=self.group_size, cols=self._dims(m)[1], dtype=dtype)


def midpoint_zeros(experts: QuantizedExperts) -> bool:
    """Whether every zero-point of these experts is the midpoint 2^(bits-1) (the symmetric Q8_0/Q4_0
    storage): the native kernels then need not read them."""
    return all(bool((getattr(experts, f"z{b}_{m}") == float(1 << (b - 1))).all())
               for b in set(experts.bits) for m in MATRICES)


class SlotStack:
    """Blobs gate_up [S, n_gu], down [S, n_d] (an offload cache's slots, or one expert's blobs as [1, n]) as
    one `PackedExperts` stack of S experts, expert s in blob s, its parts strided views in place
    (`PackedFormat.stack_views`): one native call runs the experts of several slots
    (moeinfer/offload/slot_experts.py), or one slot's expert (`SlotViews`)."""

    # The views see slots whose bytes a load replaces in place, some loads straight from a file
    # (os.preadv) without a tensor version change: nothing is derived from their bytes
    # (quantized_cpu._stack), and their zeros are skipped only where the runtime found every expert
    # it offloaded symmetric (`midpoint_zeros`).
    stable = False

    def __init__(self, fmt: PackedFormat, gate_up: torch.Tensor, down: torch.Tensor, *, midpoints: bool = False) -> None:
        S = gate_up.shape[0]
        self.bits, self.slot = [fmt.bits] * S, list(range(S))
        self.num_experts = S
        self.group_size, self.hidden_size, self.intermediate_size = fmt.group_size, fmt.hidden, fmt.inter
        self.midpoint_zeros = midpoints
        for m, blobs in (("gate_up", gate_up), ("down", down)):
            for name, t in zip("qsz", fmt.stack_views(blobs, m)):
                setattr(self, f"{name}{fmt.bits}_{m}", t)


class SlotViews:
    """The fast tier's slots (gate_up [S, n_gu], down [S, n_d] uint8 blobs) as one-expert `SlotStack`s,
    made once: a load into a slot changes the bytes its views see, not the views. Any other pair of
    blobs (a transient load) gets fresh views."""

    def __init__(self, fmt: PackedFormat, gate_up: torch.Tensor, down: torch.Tensor, *, midpoints: bool = False) -> None:
        self.fmt, self.midpoints = fmt, midpoints
        self.by_ptr: dict[int, tuple[int, SlotStack]] = {}
        for s in range(gate_up.shape[0]):
            view = SlotStack(fmt, gate_up[s:s + 1], down[s:s + 1], midpoints=midpoints)
            self.by_ptr[gate_up[s].data_ptr()] = (down[s].data_ptr(), view)

    def get(self, gate_up: torch.Tensor, down: torch.Tensor) -> SlotStack:
        hit = self.by_ptr.get(gate_up.data_ptr())
        if hit is not None and hit[0] == down.data_ptr():
            return hit[1]
        return SlotStack(self.fmt, gate_up[None], down[None], midpoints=self.midpoints)


def native_expert_fn(fmt: PackedFormat, *, engine: str | None = None, activations: str | None = None,
                     slots: SlotViews | None = None, midpoints: bool = False) -> Any:
    """Step 4: (x [n, D], gate_up blob, down blob) -> SwiGLU [n, D] on the native kernels, or None when
    they cannot run this format here (the caller keeps the eager reference); `slots`: the views of the
    runtime's slots, reused (else every call makes its own); `midpoints`: every expert that can be in the
    blobs is symmetric (`midpoint_zeros`)."""
    probe = SlotStack(fmt, *(torch.zeros(1, fmt.nbytes(m), dtype=torch.uint8) for m in MATRICES))
    if unsupported(probe) is not None:
        return None

    def run(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        view = (slots.get(gate_up, down) if slots is not None
                else SlotStack(fmt, gate_up[None], down[None], midpoints=midpoints))
        n = xs.shape[0]
        return quantized_moe_cpu(xs, torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1), view, engine=engine,
                                 activations=activations)

    return run
