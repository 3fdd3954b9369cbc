"""One-token decode of an offloaded layer over the expert cache's slots, on the native CPU kernels.

Shapes: D hidden, K top-k, S slots.

An offloaded layer otherwise computes each cached expert in its own call, then dispatches and
combines in Python: on the shipped model ~400 us a decode layer against ~110 for the resident one
(docs/planner.md, twelfth session). Here, for a batch-1 step:
1. `SlotDecode.of(gate_up=slots, down=slots, ...)`: the slots as one stack the native decode reads in place: float slots
   as they are ([S, 2I, D], [S, D, I]), quantized blobs as strided views of their parts
   (moeinfer.offload.packed.SlotStack); None where no native decode runs them (then the layer keeps its
   per-expert path);
2. `rows(x, slots, out)`: every routed expert already in a slot (slots[k]; -1: not yet) into out[k], one
   call; `one(x, k, gate_up, down, out)`: an expert held outside the slots (a load without a slot,
   streamed through the transient buffer) into out[k];
3. `combine(x, indices, weights, out)`: the native decode's own sum over experts -> [1, D].
Each expert's row has the same bits whichever call computes it (the native row kernels give every row
one product), and steps 2-3 are the native decode split in two, so the output is the resident
layer's (`cpu_moe` / `quantized_moe_cpu` at one token) bit for bit, whatever the cache holds.
"""

from __future__ import annotations

from collections.abc import Callable
import torch

from moeinfer.kernels import native
from moeinfer.kernels.cpu_native import choose_engine, combine_rows, decode_rows_op, native_weights
from moeinfer.kernels.quantized_cpu import decode_rows_op as decode_rows_op_q
from moeinfer.offload.packed import PackedFormat, SlotStack

RowsOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class SlotDecode:
    """The native one-token decode over a runtime's slots (module docstring)."""

    def __init__(self, make: Callable[[torch.Tensor, torch.Tensor], RowsOp | None], gate_up: torch.Tensor,
                 down: torch.Tensor, quantized: bool) -> None:
        self._make = make
        self._slots = make(gate_up, down)
        self._quantized = quantized
        self._other: dict[tuple[int, int], RowsOp] = {}  # one-expert stacks of buffers outside the slots

    @classmethod
    def of(cls, *, gate_up: torch.Tensor, down: torch.Tensor, packed: PackedFormat | None, midpoints: bool,
           engine: str | None, activations: str | None) -> SlotDecode | None:
        """Step 1 for slots gate_up [S, ...], down [S, ...] on a CPU: float weights (`packed` None) or
        quantized blobs in `packed`'s format (`midpoints`: every expert symmetric); None where the native
        decode cannot run them here."""
        if gate_up.device.type != "cpu" or native.unavailable_reason() is not None:
            return None
        if packed is None:
            variant = choose_engine(engine)
            if variant == "torch" or not native_weights(gate_up, down):
                return None

            def make_float(g: torch.Tensor, d: torch.Tensor) -> RowsOp | None:
                return decode_rows_op(g, d, engine=variant)

            return cls(make_float, gate_up, down, quantized=False)

        def make_packed(g: torch.Tensor, d: torch.Tensor) -> RowsOp | None:
            return decode_rows_op_q(SlotStack(packed, g, d, midpoints=midpoints), engine=engine,
                                    activations=activations)

        if make_packed(gate_up[:1], down[:1]) is None:
            return None
        return cls(make_packed, gate_up, down, quantized=True)

    def rows(self, x: torch.Tensor, slots: list[int], out: torch.Tensor) -> None:
        """Step 2: the experts in slots[k] (>= 0) into out[k]."""
        assert self._slots is not None
        self._slots(x, torch.tensor(slots, dtype=torch.long), out)

    def one(self, x: torch.Tensor, k: int, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor) -> None:
        """Step 2 for an expert in buffers outside the slots (kept ones: their stack is made once)."""
        key = (gate_up.data_ptr(), down.data_ptr())
        op = self._other.get(key)
        if op is None:
            op = self._make(gate_up[None], down[None])
            assert op is not None
            self._other[key] = op
        rows = [-1] * out.shape[0]
        rows[k] = 0
        op(x, torch.tensor(rows, dtype=torch.long), out)

    def combine(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Step 3: x [1, D] -> [1, D] in x's dtype, as the resident decode rounds it."""
        if self._quantized:  # quantized_moe_cpu sums in fp32 and rounds after
            return combine_rows(x.float(), indices, weights, out).to(x.dtype)
        xn = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
        y = combine_rows(xn, indices, weights, out)
        return y if y.dtype == x.dtype else y.to(x.dtype)
