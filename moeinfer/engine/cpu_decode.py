"""Batch-1 decode on the CPU as a prepared program: the CPU counterpart of static_decode's CUDA graph.

Shapes: D hidden, H query heads, Hkv kv heads, Dh head dim, K top-k, V vocab; one row, one new token.

A decode step of a real-size MoE model at batch 1 is ~50 native calls that read hundreds of MB of
weights; the eager forward wraps them in ~800 small torch ops and ~200 module calls whose cost is the
interpreter's and the dispatcher's, not the memory's: 7-10 ms a token against ~45 ms of native kernels
for an int8 OLMoE-1B-7B-shaped model on a 2-core AMD EPYC (docs/benchmarks.md). llama.cpp builds its
graph once and replays it; gpt-fast and vLLM capture CUDA graphs (static_decode.py). While `generate`
decodes one row on the CPU (`prepared_cpu_decode`), a `CpuDecoder` sits in the model's `decode_program`
seam: it walked the model once and keeps, per layer, the callables of its steps with everything they look
up per call resolved (weights, native variants, scale and zero forms), and MoEModel.forward hands it each
forward first, so hooks on the model (the benchmark's instrumentation) run as for any forward:

1. a step runs the program only in the eager forward's fast case: one new token of one row over the
   program's cache, whose slots all hold real tokens, the new token real, no sliding window shorter than
   the context; otherwise (and for good once a padding token was written) the forward runs as usual;
2. the cache reserves the slot; token observers see the token as in the eager forward;
3. per layer: norm -> q/k/v projections (q/k norms, clipping) -> rotation, cache write and attention in
   one native call (`attend_decode_step`) -> output projection -> residual; norm -> router -> experts
   (routing observers, shared expert) -> residual;
4. the final norm and the LM head.

Every prepared step is the native call the eager module makes, with its arguments, in the eager order
(the modules' `row_op` / `decode_op`), so the logits equal the eager forward's bit for bit
(tests/engine/test_cpu_decode.py). A part without a prepared form (MLA attention, offloaded or
expert-parallel experts, routing transforms, dense MLPs, a module with hooks) is called as the module:
still exact, only slower.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from moeinfer.kernels import native
from moeinfer.kernels.attention import CpuAttention
from moeinfer.model.kv_cache import CacheStep, KVCache, LayerKV
from moeinfer.model.moe import MoEBlock
from moeinfer.model.transformer import DecoderLayer, MoEModel

log = logging.getLogger(__name__)

Row = Callable[[torch.Tensor], torch.Tensor]
_DTYPES = (torch.bfloat16, torch.float32)


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks (its own or global ones) that its forward alone would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def _row(module: nn.Module, dtype: torch.dtype) -> Row:
    """The module's prepared one-row call (its `row_op`), else the module itself."""
    make = getattr(module, "row_op", None)
    op = make(dtype) if make is not None and not _hooked(module) else None
    return op if op is not None else module


class _Attention:
    """Step 3's attention for a CpuAttention over a GQA cache layer: the eager `project_with` prepared rows,
    then CpuAttention's one-step native call."""

    def __init__(self, attn: CpuAttention, dtype: torch.dtype) -> None:
        self.attn = attn
        self.projections = tuple(_row(m, dtype) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.norms = ((_row(attn.q_norm, dtype), _row(attn.k_norm, dtype)) if attn.qk_norm in ("full", "head")
                      else (None, None))
        self.o = _row(attn.o_proj, dtype)
        self.op, self.variant = native.load().attend_decode_step, native.resolve_variant(attn.engine)

    @staticmethod
    def blocker(attn: nn.Module, kv: Any, dtype: torch.dtype) -> str | None:
        """Why this attention is called as a module (None: it is prepared)."""
        if type(attn) is not CpuAttention or _hooked(attn):
            return "not the native CPU attention (use_kernel_(..., linears=True))"
        if attn.rotary.interleaved or 2 * attn.rotary.inv_freq.numel() != attn.head_dim:
            return "a rotation other than 'rotate half' over the whole head"
        if type(kv) is not LayerKV or kv.seq_dim != 2:
            return "a cache layer other than keys and values"
        if dtype not in _DTYPES or kv.a.dtype != dtype or kv.b.dtype != dtype or kv.a.shape[-1] != attn.head_dim \
                or kv.b.shape[-1] != attn.head_dim:
            return "cache or model dtypes or head sizes the native attention does not take"
        return None

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, kv: LayerKV, step: CacheStep,
                 memo: dict) -> torch.Tensor:
        attn = self.attn
        q, k, v = attn.project_with(h, self.projections, self.norms)  # [1, 1, H, Dh], [1, 1, Hkv, Dh] x 2
        cos, sin = attn.rotary.cos_sin(positions, h.dtype, memo)
        out = self.op(q, k, v, cos, sin, kv.a, kv.b, step.uniform_start, attn.scale, self.variant)
        return self.o(out)


class _MoE:
    """Step 3's MoE block: MoEBlock.stages for one row with the experts' prepared decode as its expert stage
    (experts without `decode_op`, or with hooks, called as the module)."""

    def __init__(self, block: MoEBlock, hidden: int) -> None:
        self.block, self.D = block, hidden
        make = getattr(block.experts, "decode_op", None)
        op = make() if make is not None and not _hooked(block.experts) else None
        self.experts: Callable[..., torch.Tensor] = (
            block.experts if op is None else (lambda x, routing: op(x, routing.indices, routing.weights)))
        self.prepared = op is not None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.block.stages(h.view(1, self.D), self.experts).view(1, 1, self.D)


class _Layer:
    """One DecoderLayer: x + attn(norm(x)), then x + ffn(norm(x)) (DecoderLayer.forward)."""

    def __init__(self, layer: DecoderLayer, kv: LayerKV, dtype: torch.dtype, hidden: int) -> None:
        self.norm1, self.norm2 = _row(layer.input_layernorm, dtype), _row(layer.post_attention_layernorm, dtype)
        if _Attention.blocker(layer.self_attn, kv, dtype) is None:
            self.attn: Callable[..., torch.Tensor] = _Attention(layer.self_attn, dtype)
        else:
            attn = layer.self_attn
            self.attn = lambda h, positions, kv, step, memo: attn(h, positions=positions, mask=None, kv=kv,
                                                                  step=step, rope_memo=memo)
        mlp = layer.mlp
        self.ffn: Callable[[torch.Tensor], torch.Tensor] = (
            _MoE(mlp, hidden) if type(mlp) is MoEBlock and not _hooked(mlp) else mlp)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv: LayerKV, step: CacheStep,
                 memo: dict) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), positions, kv, step, memo)
        return x + self.ffn(self.norm2(x))


def cpu_decode_blocker(model: nn.Module, cache: KVCache) -> str | None:
    """Why `CpuDecoder` cannot run decode steps of `model` over `cache` (None: it can)."""
    if type(model) is not MoEModel:
        return "the model is not a plain MoEModel"
    if cache.valid.device.type != "cpu" or model.device.type != "cpu":
        return "the model or the cache is not on the CPU"
    if cache.batch_size != 1:
        return f"batch of {cache.batch_size} rows (the program decodes one)"
    if not bool(cache.valid[0, :int(cache.lengths[0])].all()):
        return "the cache holds padding"
    for layer in model.layers:
        if type(layer) is not DecoderLayer or _hooked(layer):
            return "a layer other than DecoderLayer (or with hooks)"
    return None


class CpuDecoder:
    """The prepared one-row decode of `model` over `cache` (module docstring), for MoEModel's
    `decode_program` seam: `decoder(input_ids, attention_mask, cache)` -> logits [1, 1, V], the eager
    forward's bit for bit, or None where it does not take that forward. It holds the cache weakly."""

    def __init__(self, model: MoEModel, cache: KVCache) -> None:
        why = cpu_decode_blocker(model, cache)
        if why is not None:
            raise ValueError(f"CpuDecoder: {why}")
        self.model, self.cache = model, weakref.ref(cache)
        dtype, D = model.dtype, model.config.hidden_size
        self.layers = [_Layer(layer, cache.layers[i], dtype, D) for i, layer in enumerate(model.layers)]
        self.windows = [w for w in (layer.window for layer in model.layers) if w is not None]
        self.norm, self.head = _row(model.norm, dtype), _row(model.lm_head, dtype)
        self.padded = False  # a padding token was written: every later forward runs as usual
        self.steps = 0  # forwards the program ran

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 cache: KVCache) -> torch.Tensor | None:
        # 1. the eager forward's fast case only
        if cache is not self.cache() or input_ids.shape != (1, 1):
            return None
        active = (torch.ones(1, 1, dtype=torch.bool, device=input_ids.device) if attention_mask is None
                  else attention_mask.to(dtype=torch.bool))
        self.padded = self.padded or not bool(active.all())
        if self.padded or (self.windows and int(cache.lengths[0]) + 1 > min(self.windows)):
            return None
        # 2. the slot; observers
        step = cache.begin(active)
        positions = step.q_slots  # [1, 1]: every slot a real token, so a token's position is its slot
        for fn in self.model.token_observers:
            fn(active, positions, step.uniform_start == 0)
        # 3. the layers
        memo: dict = {}  # cos/sin of the first layer serve the others (as MoEModel.forward's rope_memo)
        x = self.model.embed_tokens(input_ids)  # [1, 1, D]
        for layer, kv in zip(self.layers, cache.layers):
            x = layer(x, positions, kv, step, memo)
        # 4. final norm, LM head
        self.steps += 1
        return self.head(self.norm(x))  # [1, 1, V]


class RowPrograms:
    """The batching engine's cache views and, for its one-row decode forwards, CpuDecoders.

    The engine decodes a row alone when it is the only one running, or always in deterministic mode
    (moeinfer/engine/batching.py); each forward names rows [start, stop) of one cache. The view of each
    row range is made once (a CpuDecoder keeps its cache view's identity) and a row's decoder is built
    the first time that row decodes alone (None, once, where `cpu_decode_blocker` names a model-wide
    reason). The engine never pads a row: a row is cleared, prefilled from its first slot, then decoded,
    or moved whole into another (`KVCache.move_row`), so its slots always hold real tokens. Decoders are
    built once, so the model must not change (modules swapped, hooks added) while the engine runs."""

    def __init__(self, model: nn.Module, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self.views: dict[tuple[int, int], KVCache] = {}
        self.decoders: dict[int, CpuDecoder | None] = {}

    def view(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) of the cache, the same view object every time."""
        view = self.views.get((start, stop))
        if view is None:
            view = self.views[(start, stop)] = self.cache.rows(start, stop)
        return view

    def decoder(self, start: int, stop: int, tokens: int) -> CpuDecoder | None:
        """The decoder for a forward of `tokens` new tokens over rows [start, stop) (None: run it eagerly)."""
        if stop - start != 1 or tokens != 1:
            return None
        if start not in self.decoders:
            view = self.view(start, stop)
            why = cpu_decode_blocker(self.model, view)
            if why is not None:
                log.debug("engine decode without the prepared CPU program: %s", why)
            self.decoders[start] = CpuDecoder(self.model, view) if why is None else None  # type: ignore[arg-type]
        return self.decoders[start]

    @contextmanager
    def running(self, start: int, stop: int, tokens: int) -> Iterator[CpuDecoder | None]:
        """While inside, the model's forward over `view(start, stop)` runs the row's decoder where it has one."""
        decoder = self.decoder(start, stop, tokens)
        if decoder is None:
            yield None
            return
        previous = self.model.__dict__.get("decode_program")
        self.model.decode_program = decoder
        try:
            yield decoder
        finally:
            self.model.decode_program = previous


@contextmanager
def prepared_cpu_decode(model: nn.Module, cache: KVCache) -> Iterator[CpuDecoder | None]:
    """While inside, the one-row decode forwards of `model` over `cache` run a CpuDecoder (yielded;
    None, logged, where `cpu_decode_blocker` names a reason); the model's seam is restored on exit."""
    why = cpu_decode_blocker(model, cache)
    if why is not None:
        log.debug("decode without the prepared CPU program: %s", why)
        yield None
        return
    previous = model.__dict__.get("decode_program")
    model.decode_program = decoder = CpuDecoder(model, cache)
    try:
        yield decoder
    finally:
        model.decode_program = previous
