"""CPU expert stage for packed group-wise int8/int4 experts (moeinfer.formats.quantized_experts), on
the native library (moeinfer.kernels.native), in the style of llama.cpp's CPU backend: the weights
stay in their stored layout and are never dequantized as a whole.

Shapes: N tokens, D hidden, K top-k, I expert inner size, E_b experts of width b.

- Decode (few slots per routed expert: N * K <= decode_slots(activations) * experts routed): per token
  and per bit width, one native call runs the token's experts of that width: w = (u - z) * s folded
  into per-group sums (csrc/ops.cpp), gate_up -> SiLU * up -> down -> weighted sum. Reads each
  routed expert's bytes once per token. Activations (`ACTIVATIONS`): "q8" (default where the group
  size is a multiple of 32) quantizes x, and each expert's SiLU * up vector, once to int8 blocks of 32
  as llama.cpp's Q8_0 and takes integer dot products with the codes (csrc/kern.h; eager reference:
  q8_reference.py); "f32" widens the codes to fp32 against fp32 activations (exact up to fp32
  rounding; the only choice for other group sizes).
- Prefill (more slots per expert), "q8" activations: one native call per bit width (`moe_prefill_q`,
  as llama.cpp's mul_mat_id on quantized weights): dispatch by expert, every token quantized once to
  int8 blocks, gate_up and down as tiled integer GEMMs on the codes in place (csrc/kern.h), SiLU * up
  quantized per slot, combine in fp32. No weight is dequantized and no Python runs per expert.
- Prefill, "f32" activations: each expert with slots is dequantized tile by tile into one reused fp32
  buffer per projection (native, parallel), then two fp32 GEMMs; combine in fp32. The buffers are
  shared by all layers (`_BUFFERS`, one per shape), so steady-state prefill allocates nothing
  weight-sized and holds one expert's fp32 weights in all.

`unsupported(experts)` says why a module cannot run here (bit widths other than 4 and 8); `engine`
forces a native variant (moeinfer.kernels.cpu_native.ENGINES minus 'torch'), `activations` the form
of activations of decode and prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from moeinfer.kernels import native
from moeinfer.kernels.cpu import combine
from moeinfer.model.mlp import silu_and_mul

NATIVE_BITS = (4, 8)
ACTIVATIONS = ("f32", "q8")
QBLOCK = 32  # columns per int8 activation block (csrc/kern.h)
_NATIVE_X = (torch.float32, torch.bfloat16)  # activation dtypes the native ops take as they are
# "f32": a dequantized fp32 tile costs ~9 bytes of traffic per code (read codes, write and read 4-byte
# floats) once per expert; decoding a slot reads 1 (int8) or 0.5 (int4) bytes per code: below this
# many slots per routed expert, decoding token by token moves fewer bytes.
DECODE_SLOTS_PER_EXPERT = 8
# "q8": the integer GEMM reads each routed expert once; with few slots per expert its tiles are narrow
# and it costs what the decode's row kernels cost: measured on an OLMoE-1B-7B layer (one thread, q4_0
# and int8, 2 to 16 tokens = 1 to 2.4 slots per routed expert) the two paths were within noise of each
# other; at 128 tokens the GEMM is ~3x the dequantized tiles (benchmarks/bench_cpu_kernels.py).
Q8_DECODE_SLOTS_PER_EXPERT = 2


def decode_slots(activations: str) -> float:
    """Slots per routed expert up to which the token-by-token decode runs (module constants above)."""
    return Q8_DECODE_SLOTS_PER_EXPERT if activations == "q8" else DECODE_SLOTS_PER_EXPERT


class PackedExperts(Protocol):
    """What this reads of QuantizedExperts (not imported: kernels sit below compress): the stacks
    q{b}_gate_up, s{b}_gate_up, z{b}_gate_up, q{b}_down, ... and expert e's stack row slot[e]."""

    bits: list[int]
    slot: list[int]
    group_size: int
    hidden_size: int
    intermediate_size: int
    # optional, default True: False where the stacks' bytes change in place without a tensor version
    # change (an offload cache's slot views): nothing is derived from their bytes (no fp16 copy of the
    # scales, no look at the zeros), and their zeros are read unless `midpoint_zeros` (optional,
    # default False) declares every expert that can be in them symmetric
    # stable: bool
    # midpoint_zeros: bool


def unsupported(experts: PackedExperts) -> str | None:
    """Why the native quantized path cannot run these experts (None = it can)."""
    other = sorted(set(experts.bits) - set(NATIVE_BITS))
    if other:
        return f"{other} -bit codes (native CPU path: {', '.join(map(str, NATIVE_BITS))})"
    return native.unavailable_reason()


def schedule(indices: torch.Tensor, activations: str) -> str:
    """How `quantized_moe_cpu` runs the N >= 1 tokens routed by indices [N, K]: "decode" (token by token:
    few slots per routed expert, module docstring), "prefill" (int8 activations: `moe_prefill_q`) or
    "tiles" (fp32 activations: dequantized tiles and fp32 GEMMs)."""
    N, K = indices.shape
    # one token is always decoded (its K slots go to K distinct experts), without counting them
    if N == 1 or N * K <= decode_slots(activations) * int(torch.unique(indices).numel()):
        return "decode"
    return "prefill" if activations == "q8" else "tiles"


def decode_activations(activations: str | None, group_size: int) -> str:
    """`activations` checked against the group size, or the default: "q8" where groups are whole
    int8 blocks (a multiple of QBLOCK columns), else "f32"."""
    if activations is None:
        return "q8" if group_size % QBLOCK == 0 else "f32"
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}; valid: {', '.join(ACTIVATIONS)}")
    if activations == "q8" and group_size % QBLOCK:
        raise ValueError(f"activations 'q8' need a group size that is a multiple of {QBLOCK}, got {group_size}")
    return activations


def read_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor | None:
    """`zeros`, or None where every zero-point is the midpoint 2^(bits-1) (the symmetric Q8_0/Q4_0
    storage): the native kernels then use the constant and do not read the zeros (4 of a Q4_0 block's
    24 bytes). Checked once per tensor, bit width and version (the answer kept on the tensor); an
    inference-mode tensor has no version, so it is checked at every call."""
    try:
        key = (zeros._version, bits)
    except RuntimeError:  # an inference tensor: no version counter
        return None if bool((zeros == float(1 << (bits - 1))).all()) else zeros
    seen = getattr(zeros, "_moeinfer_midpoint", None)
    if seen is None or seen[0] != key:
        seen = (key, bool((zeros == float(1 << (bits - 1))).all()))
        zeros._moeinfer_midpoint = seen
    return None if seen[1] else zeros


def read_scales(scales: torch.Tensor) -> torch.Tensor:
    """`scales` as the int8-activation kernels read them: an fp16 copy where every scale is exactly an
    fp16 value (the symmetric Q8_0/Q4_0 storage rounds its scales so, as GGUF stores them), else
    `scales` itself. The kernels widen fp16 exactly, so results are the same bits, while a Q4_0 row
    reads 18 bytes a block instead of 20 (Q8_0: 34 instead of 36), and batch-1 decode is bound by the
    bytes it reads. The copy costs 2 bytes a group of memory beside the fp32 scales; it is made and
    kept on the tensor once per version (an inference-mode tensor has no version: it is read as is)."""
    if scales.dtype != torch.float32:
        return scales
    try:
        key = scales._version
    except RuntimeError:  # an inference tensor: no version counter
        return scales
    seen = getattr(scales, "_moeinfer_half", None)
    if seen is None or seen[0] != key:
        half = scales.to(torch.float16)
        seen = (key, half if torch.equal(half.float(), scales) else None)
        scales._moeinfer_half = seen
    return scales if seen[1] is None else seen[1]


def _stack(experts: PackedExperts, b: int, *, midpoints: bool = True) -> list[torch.Tensor | None]:
    """Codes, scales, zeros of gate_up then down (`midpoints`: symmetric zeros as None, read_zeros, and
    fp16-exact scales in fp16, read_scales: the int8-activation kernels' forms)."""
    out = [getattr(experts, f"{p}{b}_{m}") for m in ("gate_up", "down") for p in "qsz"]
    if midpoints and getattr(experts, "stable", True):
        out[2], out[5] = read_zeros(out[2], b), read_zeros(out[5], b)
        out[1], out[4] = read_scales(out[1]), read_scales(out[4])
    elif midpoints and getattr(experts, "midpoint_zeros", False):  # bytes that change in place: as declared
        out[2] = out[5] = None
    return out


def _rows_by_width(experts: PackedExperts) -> dict[int, torch.Tensor]:
    """Bit width -> [E] int64 row of each expert in that width's stack (-1 = other width); cached."""
    cache = experts.__dict__.get("_native_rows")
    if cache is None:
        cache = {}
        for b in sorted(set(experts.bits)):
            cache[b] = torch.tensor([experts.slot[e] if w == b else -1 for e, w in enumerate(experts.bits)],
                                    dtype=torch.long)
        experts.__dict__["_native_rows"] = cache
    return cache


def quantized_moe_cpu(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: PackedExperts, *,
                      engine: str | None = None, activations: str | None = None) -> torch.Tensor:
    """x [N, D], indices/weights [N, K] -> sum_k weights[n, k] * expert_{indices[n, k]}(x[n]) [N, D].
    `activations`: "f32" | "q8" | None = the default of `decode_activations`."""
    variant = native.resolve_variant(engine)
    acts = decode_activations(activations, experts.group_size)
    ops = native.load()
    N = x.shape[0]
    if N == 0:
        return x.new_zeros(x.shape)
    D, I, gs = experts.hidden_size, experts.intermediate_size, experts.group_size
    rows = _rows_by_width(experts)
    plan = schedule(indices, acts)
    if plan == "decode":
        if N == 1 and len(rows) == 1:  # batch-1 decode of one width: one call, nothing else
            return _decode_row(experts, variant, acts)(x, indices, weights)
        xf = x.float()
        wf = weights.float()
        out = torch.zeros(N, D)
        for b, row in rows.items():
            stack = _stack(experts, b)
            for n in range(N):
                out[n] += ops.moe_decode_q(xf[n].contiguous(), row[indices[n]], wf[n], *stack, b, gs, D, I, variant,
                                           acts)
        return out.to(x.dtype)
    if plan == "prefill":
        # one native call per bit width: dispatch, both GEMMs on the codes, combine (csrc/ops.cpp)
        xn = x if x.dtype in _NATIVE_X else x.float()
        out = None
        for b, row in rows.items():
            y = ops.moe_prefill_q(xn, row[indices], weights, *_stack(experts, b), b, gs, D, I, variant)
            out = y if out is None else out.add_(y)
        return out.to(x.dtype)
    return _prefill(x, indices, weights, experts, rows, ops)


def _decode_row(experts: PackedExperts, variant: str, acts: str) -> Callable[..., torch.Tensor]:
    """Batch-1 decode of a one-width layer as a callable (x [1, D], indices [1, K], weights [1, K]) ->
    [1, D] in x's dtype, with the layer's stacks, scale and zero forms resolved now."""
    ((b, row),) = _rows_by_width(experts).items()
    stack = _stack(experts, b)
    D, I, gs = experts.hidden_size, experts.intermediate_size, experts.group_size
    op = native.load().moe_decode_q
    identity = experts.__dict__.get("_native_identity")  # expert e in stack row e: the routed ids are the rows
    if identity is None:
        identity = experts.__dict__["_native_identity"] = bool(torch.equal(row, torch.arange(len(row))))

    def decode(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # (the op reads K expert rows and K weights whatever their shape: [1, K] as routed)
        y = op(x.reshape(-1).float(), indices if identity else row[indices], weights.float(), *stack, b, gs, D, I,
               variant, acts)
        return y.to(x.dtype)[None]

    return decode


def moe_row_op(experts: PackedExperts, *, engine: str | None = None,
               activations: str | None = None) -> Callable[..., torch.Tensor] | None:
    """`quantized_moe_cpu`'s batch-1 decode of these experts with everything it looks up per call
    resolved once (a prepared step of moeinfer.engine.cpu_decode): (x [1, D], indices [1, K], weights
    [1, K]) -> [1, D] in x's dtype, the same call with the same arguments, so the same bits. None where
    that path does not run alone: several bit widths, no native library, or stacks whose bytes change
    without a version change (`stable` False: their scale and zero forms are read per call)."""
    if (unsupported(experts) is not None or len(_rows_by_width(experts)) != 1
            or not getattr(experts, "stable", True)):
        return None
    return _decode_row(experts, native.resolve_variant(engine), decode_activations(activations, experts.group_size))


def decode_rows_op(experts: PackedExperts, *, engine: str | None = None,
                   activations: str | None = None) -> Callable[..., None] | None:
    """Batch-1 decode of these one-width experts without the sum over experts (`moe_decode_q_rows`):
    (x [1, D], rows [K] int64 rows of the stacks (< 0: skipped), out [K, D] fp32) -> None, the expert of
    rows[k] into out[k]: the row `quantized_moe_cpu`'s decode sums for it, whichever other experts the
    call holds (`combine_rows` of moeinfer.kernels.cpu_native sums them alike). Stacks' forms resolved
    once; None where the native decode cannot run these experts (several widths, no library)."""
    if unsupported(experts) is not None or len(_rows_by_width(experts)) != 1:
        return None
    (b,) = _rows_by_width(experts)
    stack = _stack(experts, b)
    D, I, gs = experts.hidden_size, experts.intermediate_size, experts.group_size
    variant, acts = native.resolve_variant(engine), decode_activations(activations, gs)
    op = native.load().moe_decode_q_rows

    def run(x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        op(x.reshape(-1).float(), rows, *stack, b, gs, D, I, variant, acts, out)

    return run


def prefill_rows_op(experts: PackedExperts, *, engine: str | None = None) -> Callable[..., None] | None:
    """The int8-activation prefill of these one-width experts without its sum over experts
    (`moe_prefill_q_rows`): (x [N, D], rows [N, K] int64 rows of the stacks (< 0: skipped), out [N * K, D]
    fp32) -> None, token n's k-th expert into out[n * K + k]: the row `quantized_moe_cpu`'s "prefill"
    schedule sums for it, whichever other experts the call holds (`combine_token_rows` of
    moeinfer.kernels.cpu_native sums them alike). None where the native prefill cannot run these experts."""
    if unsupported(experts) is not None or len(_rows_by_width(experts)) != 1:
        return None
    (b,) = _rows_by_width(experts)
    stack = _stack(experts, b)
    D, I, gs = experts.hidden_size, experts.intermediate_size, experts.group_size
    variant = native.resolve_variant(engine)
    op = native.load().moe_prefill_q_rows

    def run(x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        op(x if x.dtype in _NATIVE_X else x.float(), rows, *stack, b, gs, D, I, variant, out)

    return run


_BUFFERS: dict[tuple[str, int, int], torch.Tensor] = {}


def _buffer(name: str, shape: tuple[int, int]) -> torch.Tensor:
    """The reused fp32 tile for `name` at `shape` (one per shape for the whole process)."""
    key = (name, *shape)
    if key not in _BUFFERS:
        _BUFFERS[key] = torch.empty(shape)
    return _BUFFERS[key]


def _prefill(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: PackedExperts,
             rows: dict[int, torch.Tensor], ops) -> torch.Tensor:
    N, K = indices.shape
    D, I, gs = experts.hidden_size, experts.intermediate_size, experts.group_size
    # 1. dispatch: slots sorted by expert
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [S]
    counts = torch.bincount(flat, minlength=len(experts.bits)).tolist()
    xs = x.float()[order // K]  # [S, D]
    ys = torch.empty_like(xs)  # [S, D]
    w_gu = _buffer("gate_up", (2 * I, D))
    w_dn = _buffer("down", (D, I))
    start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        b, r = experts.bits[e], experts.slot[e]
        q_gu, s_gu, z_gu, q_dn, s_dn, z_dn = _stack(experts, b, midpoints=False)
        # 2. this expert's weights into the reused tiles, then two fp32 GEMMs
        ops.dequant_into(q_gu[r], s_gu[r], z_gu[r], b, gs, w_gu)
        ops.dequant_into(q_dn[r], s_dn[r], z_dn[r], b, gs, w_dn)
        seg = slice(start, start + n)
        ys[seg] = F.linear(silu_and_mul(F.linear(xs[seg], w_gu)), w_dn)
        start += n
    # 3. combine in fp32: each slot's output times its weight, summed per token (the cpu kernel's)
    y_slots = torch.empty_like(ys)
    y_slots[order] = ys
    return combine(y_slots.view(N, K, D), weights, x.dtype)


# With fp32 activations a quantized linear runs on the row kernels up to this many rows (each row reads
# the whole weight); above it the caller's dequantize + GEMM wins. Int8 activations run the GEMM at any N.
LINEAR_MAX_ROWS = 8


def quantized_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
                         bits: int, group_size: int, activations: str | None = None, engine: str | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., C] times a packed group-wise matrix (qweight [O, P], fp32 scales and zeros [O, G]), plus
    `bias` [O] -> [..., O] in x's dtype, in one native call (`gemm_q`: codes read in place; "q8"
    activations: the rows quantized once, then the tiled integer GEMM; "f32": the fp32 row kernels; one
    row (decode): `linear_q_row`, gemm_q's row kernels taking the row and returning y in its dtype, so
    that nothing but y is allocated). None where it cannot run (other widths, no native library, fp32
    activations on more than LINEAR_MAX_ROWS rows): the caller dequantizes."""
    if not _native_linear(bits, scales, zeros):
        return None
    act = decode_activations(activations, group_size)
    C = x.shape[-1]
    N = x.numel() // C if C else 0
    if act == "f32" and N > LINEAR_MAX_ROWS:
        return None
    xn = x if x.dtype in _NATIVE_X else x.float()
    fp32_bias = bias is None or bias.dtype == torch.float32
    if N == 1 and fp32_bias:
        y = _linear_row(qweight, scales, zeros, bits, group_size, act, native.resolve_variant(engine), bias)(
            xn.contiguous())
        return y if y.dtype == x.dtype else y.to(x.dtype)
    ops, variant, z = native.load(), native.resolve_variant(engine), read_zeros(zeros, bits)
    scales = read_scales(scales)  # fp16 where exact (the symmetric formats'), read_scales
    y = ops.gemm_q(xn.reshape(N, C), qweight, scales, z, bits, group_size, variant, act, bias if fp32_bias else None)
    if not fp32_bias:
        y = y + bias.to(y.dtype)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _native_linear(bits: int, scales: torch.Tensor, zeros: torch.Tensor) -> bool:
    return (bits in NATIVE_BITS and native.unavailable_reason() is None and scales.dtype == torch.float32
            and zeros.dtype == torch.float32)


def _linear_row(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                act: str, variant: str, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`linear_q_row` on this matrix as a callable of one contiguous row (bf16 or fp32) -> [..., O] in its
    dtype, with the scale form (read_scales: fp16 where exact) and zeros (read_zeros) resolved now."""
    op, z, s = native.load().linear_q_row, read_zeros(zeros, bits), read_scales(scales)
    return lambda x: op(x, qweight, s, z, bits, group_size, variant, act, bias)


def linear_row_op(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int, group_size: int,
                  dtype: torch.dtype, activations: str | None = None, engine: str | None = None,
                  bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`quantized_linear_cpu`'s one-row path with everything it looks up per call resolved once (a
    prepared step of moeinfer.engine.cpu_decode): one contiguous row of `dtype` -> y in that dtype, the
    same call with the same arguments. None where that path does not run (then quantized_linear_cpu
    decides per call)."""
    if (not _native_linear(bits, scales, zeros) or dtype not in _NATIVE_X
            or not (bias is None or bias.dtype == torch.float32)):
        return None
    return _linear_row(qweight, scales, zeros, bits, group_size, decode_activations(activations, group_size),
                       native.resolve_variant(engine), bias)
