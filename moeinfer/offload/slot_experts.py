"""The expert stage of an offloaded layer over the expert cache's slots, on the native CPU kernels.

Shapes: N tokens, D hidden, K top-k, S slots.

An offloaded layer otherwise computes each cached expert in its own call, then dispatches and
combines in Python: on the shipped model ~400 us a decode layer against ~110 for the resident one, and
a 64-token prompt ~1.8x the resident layer's time (docs/planner.md, twelfth and thirteenth sessions).
Here the slots run the resident layer's own native schedule, split so that each expert can be
computed when it is there:
- "decode": a batch-1 step (float or quantized experts), or a few tokens of quantized experts, token
  by token (`quantized_cpu.schedule`);
- "prefill": a prompt of quantized experts with int8 activations (`moe_prefill_q`), or several rows of
  float experts where the `cpu` kernel runs them in its native rows kernel (`moe_rows`: bf16 on CPUs
  without a native bf16 matmul, `cpu.choose_schedule`).
1. `SlotExperts.of(gate_up=slots, down=slots, ...)`: the slots as one stack the native kernels read in
   place: float slots as they are ([S, 2I, D], [S, D, I]), quantized blobs as strided views of their
   parts (moeinfer.offload.packed.SlotStack); None where no native kernel runs them (then the layer
   keeps its per-expert path);
2. `step(x, indices)`: a `SlotStep` for one forward, or None where the resident schedule is not one of
   the above (float experts at N > 1 that the `cpu` kernel runs with torch GEMMs, prompts with fp32
   activations);
3. `SlotStep.rows(slots)`: every (n, k) whose expert sits in slot slots[n, k] (>= 0; -1: not yet) into
   the step's buffer [N * K, D], one native call (decode: one a token); `one(held, gate_up, down)`: the
   (n, k) with held[n, k] from an expert outside the slots (a load streamed through the transient
   buffer);
4. `SlotStep.combine(weights)`: the resident schedule's own sum over experts -> [N, D] in x's dtype.
Each (n, k)'s row has the same bits whichever call computes it (the native kernels give every row of
an expert one product, and quantize each activation row alone), and steps 3-4 are the resident op split
in two, so the output is the resident layer's (`cpu_moe` / `quantized_moe_cpu`) bit for bit, whatever
the cache holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moeinfer.kernels import native
from moeinfer.kernels import cpu
from moeinfer.kernels.cpu_native import (
    choose_engine,
    combine_rows,
    combine_token_rows,
    decode_rows_op,
    native_weights,
    rows_op,
)
from moeinfer.kernels.quantized_cpu import decode_activations, prefill_rows_op, schedule
from moeinfer.kernels.quantized_cpu import decode_rows_op as decode_rows_op_q
from moeinfer.offload.packed import PackedFormat, SlotStack

RowsOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class _Ops:
    """The row ops of one stack: decode (x [1, D], rows [K], out [K, D]) and, for quantized experts,
    prefill (x [N, D], rows [N, K], out [N * K, D])."""

    decode: RowsOp
    prefill: RowsOp | None


class SlotExperts:
    """The native expert stage over a runtime's slots (module docstring)."""

    def __init__(self, make: Callable[[torch.Tensor, torch.Tensor], _Ops], gate_up: torch.Tensor,
                 down: torch.Tensor, *, activations: str | None, dims: tuple[int, int] = (0, 0)) -> None:
        self._make = make
        self.slot_ops = make(gate_up, down)  # the ops of the slots' own stack
        self.activations = activations  # quantized experts: the resolved activations; float: None
        self.dims = dims  # float experts: (D, I), what the cpu kernel picks its schedule by
        self._other: dict[tuple[int, int], _Ops] = {}  # one-expert stacks of buffers outside the slots

    @classmethod
    def of(cls, *, gate_up: torch.Tensor, down: torch.Tensor, packed: PackedFormat | None, midpoints: bool,
           engine: str | None, activations: str | None) -> SlotExperts | None:
        """Step 1 for slots gate_up [S, ...], down [S, ...] on a CPU: float weights (`packed` None) or
        quantized blobs in `packed`'s format (`midpoints`: every expert symmetric); None where the native
        kernels cannot run them here."""
        if gate_up.device.type != "cpu" or native.unavailable_reason() is not None:
            return None
        if packed is None:
            variant = choose_engine(engine)
            if variant == "torch" or not native_weights(gate_up, down):
                return None

            def make_float(g: torch.Tensor, d: torch.Tensor) -> _Ops:
                return _Ops(decode_rows_op(g, d, engine=variant), rows_op(g, d, engine=variant))

            return cls(make_float, gate_up, down, activations=None, dims=(gate_up.shape[2], down.shape[2]))

        def stack(g: torch.Tensor, d: torch.Tensor) -> SlotStack:
            return SlotStack(packed, g, d, midpoints=midpoints)

        if decode_rows_op_q(stack(gate_up[:1], down[:1]), engine=engine, activations=activations) is None:
            return None

        def make_packed(g: torch.Tensor, d: torch.Tensor) -> _Ops:
            s = stack(g, d)
            dec = decode_rows_op_q(s, engine=engine, activations=activations)
            assert dec is not None
            return _Ops(dec, prefill_rows_op(s, engine=engine))

        return cls(make_packed, gate_up, down, activations=decode_activations(activations, packed.group_size))

    def step(self, x: torch.Tensor, indices: torch.Tensor) -> SlotStep | None:
        """Step 2: x [N, D] routed by indices [N, K] (module docstring)."""
        N = x.shape[0]
        if N == 1:
            return SlotStep(self, x.contiguous(), indices, "decode")
        if N == 0:
            return None
        if self.activations is None:  # float experts: several rows where the cpu kernel runs `moe_rows`
            rows = cpu.choose_schedule(x.dtype, *self.dims) == "rows"
            return SlotStep(self, x.contiguous(), indices, "prefill") if rows else None
        plan = schedule(indices, self.activations)
        return SlotStep(self, x.contiguous(), indices, plan) if plan in ("decode", "prefill") else None

    def ops_outside(self, gate_up: torch.Tensor, down: torch.Tensor) -> _Ops:
        """The ops of one expert in buffers outside the slots (kept ones: made once)."""
        key = (gate_up.data_ptr(), down.data_ptr())
        if key not in self._other:
            self._other[key] = self._make(gate_up[None], down[None])
        return self._other[key]


class SlotStep:
    """Steps 3-4 for one forward: x [N, D], indices [N, K], the resident `schedule` it follows."""

    def __init__(self, owner: SlotExperts, x: torch.Tensor, indices: torch.Tensor, schedule: str) -> None:
        self.owner, self.x, self.indices, self.schedule = owner, x, indices, schedule
        N, K = indices.shape
        self.out = torch.empty(N * K, x.shape[1])  # (n, k)'s expert output in row n * K + k, fp32

    def rows(self, slots: np.ndarray) -> None:
        """Step 3: the (n, k) whose expert is in slot slots[n, k] >= 0."""
        self._run(self.owner.slot_ops, slots)

    def one(self, held: np.ndarray, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Step 3 for the (n, k) with held[n, k] True, from one expert's buffers outside the slots."""
        self._run(self.owner.ops_outside(gate_up, down), np.where(held, 0, -1))

    def _run(self, ops: _Ops, rows: np.ndarray) -> None:
        r = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        N, K = r.shape
        if self.schedule == "prefill":
            assert ops.prefill is not None
            ops.prefill(self.x, r, self.out)
        elif N == 1:  # (a one-token step: nothing around the call; the ops read [1, K] rows as [K])
            ops.decode(self.x, r, self.out)
        else:
            for n in np.flatnonzero((rows >= 0).any(axis=1)).tolist():
                ops.decode(self.x[n:n + 1], r[n], self.out[n * K:(n + 1) * K])

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        """Step 4: [N, D] in x's dtype, summed and rounded as the resident schedule sums its experts."""
        x, idx, K = self.x, self.indices, self.indices.shape[1]
        if self.schedule == "prefill":  # moe_prefill_q's / moe_rows' sum, fp32, rounded as their callers do
            return combine_token_rows(x, idx, weights, self.out).to(x.dtype)
        if self.owner.activations is not None:  # quantized decode: token by token in fp32, rounded after
            if x.shape[0] == 1:
                return combine_rows(x.float(), idx, weights, self.out).to(x.dtype)
            y = [combine_rows(x[n:n + 1].float(), idx[n:n + 1], weights[n:n + 1], self.out[n * K:(n + 1) * K])
                 for n in range(x.shape[0])]
            return torch.cat(y).to(x.dtype)
        xn = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()  # float: one row, as moe_decode
        y = combine_rows(xn, idx, weights, self.out)
        return y if y.dtype == x.dtype else y.to(x.dtype)
