"""Static-shape decode, replayable as a CUDA graph (the approach of gpt-fast's "reduce-overhead"
decode and vLLM's CUDA-graph capture: fixed buffers, the whole step recorded once, replayed per token).

Shapes: B batch rows, S cache slots (max length), V vocab.

One decode step (one new token per row) with every shape fixed by (B, S):
1. the inputs (token ids [B, 1], active rows [B, 1]) are copied into static buffers;
2. the new token's slot lives on the device (`slot` [1]): the KV write is an `index_copy_` at that
   slot and attention reads all S slots, masked by `valid` — no host-side length enters the step;
3. the slot is advanced on the device at the end of the step;
4. on CUDA the step is captured once into a CUDA graph (after one eager warm-up step on a side
   stream) and replayed for every later token. Nothing in the step reads device values back to
   the host; `generate` still reads each sampled token to stream it and check stop conditions.

The graph needs graph-safe MoE kernels (moeinfer.kernels: `triton`): the reference stages read
expert counts back to the host. `static_decode_blocker(model)` says why a model cannot be captured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from moeinfer.model.kv_cache import CacheStep, KVCache
from moeinfer.model.moe import MoEBlock
from moeinfer.model.transformer import MoEModel

log = logging.getLogger(__name__)

DecodeStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""decode(next_ids [B], active [B, 1] bool) -> logits [B, V] of the next position."""


class _StaticLayerKV:
    """One layer's cache storage written at a device-side slot; reads return all S slots."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, seq_dim: int, slot: torch.Tensor) -> None:
        self.a, self.b, self.seq_dim, self.slot = a, b, seq_dim, slot

    def write(self, step: CacheStep, a_new: torch.Tensor, b_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.a.index_copy_(self.seq_dim, self.slot, a_new)
        self.b.index_copy_(self.seq_dim, self.slot, b_new)
        return self.a, self.b


class _StaticCacheView:
    """Stands in for a KVCache during a static step: same storage, slot on the device."""

    def __init__(self, cache: KVCache, slot: torch.Tensor) -> None:
        self.valid = cache.valid
        self.max_length = cache.max_length
        self.slot = slot
        self.layers = [_StaticLayerKV(kv.a, kv.b, kv.seq_dim, slot) for kv in cache.layers]

    def begin(self, new_valid: torch.Tensor) -> CacheStep:
        # 2. Mark the new slot (padding rows stay invalid) and attend over every slot.
        self.valid.index_copy_(1, self.slot, new_valid)
        return CacheStep(q_slots=self.slot.expand(new_valid.shape[0], 1), uniform_start=None, end=self.max_length)


class StaticDecoder:
    """Decode steps of fixed shape over an already prefilled `cache` whose rows share one length."""

    def __init__(self, model: MoEModel, cache: KVCache, *, cuda_graph: bool = False) -> None:
        if bool((cache.lengths != cache.lengths[0]).any()):
            raise ValueError("StaticDecoder needs every cache row at the same length (a left-padded batch)")
        if cuda_graph and cache.valid.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, got {cache.valid.device}")
        device, B = cache.valid.device, cache.batch_size
        self.model, self.cache, self.cuda_graph = model, cache, cuda_graph
        self.length = int(cache.lengths[0])  # host copy, for the overflow check only
        self.slot = torch.tensor([self.length], dtype=torch.long, device=device)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.active = torch.zeros(B, 1, dtype=torch.bool, device=device)
        self.view = _StaticCacheView(cache, self.slot)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [B, V] output buffer of the graph
        self.steps = 0

    def _forward(self) -> torch.Tensor:
        logits = self.model(self.ids, attention_mask=self.active, cache=self.view)[:, -1]  # [B, V]
        self.slot += 1  # 3.
        return logits

    def _capture(self) -> bool:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records only: the step runs at the first replay
                self.logits = self._forward()
        except RuntimeError as e:
            log.warning("CUDA graph capture of the decode step failed, decoding without it: %s", e)
            return False
        self.graph = graph
        return True

    def __call__(self, next_ids: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if self.length >= self.cache.max_length:
            raise ValueError(f"KV cache overflow: {self.length + 1} tokens > max_length={self.cache.max_length}")
        # 1.
        self.ids.copy_(next_ids.reshape(self.ids.shape), non_blocking=True)
        self.active.copy_(active.reshape(self.active.shape), non_blocking=True)
        if not self.cuda_graph:
            logits = self._forward()
        elif self.graph is None and self.steps == 0:
            # 4. Warm-up on a side stream (allocations, Triton compilation), as CUDA graphs require.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._forward()
            torch.cuda.current_stream().wait_stream(stream)
        elif self.graph is None and not self._capture():
            self.cuda_graph = False  # capture failed: keep the static step, run it eagerly
            logits = self._forward()
        else:
            assert self.graph is not None and self.logits is not None
            self.graph.replay()
            logits = self.logits.clone()  # the buffer is overwritten by the next replay
        self.steps += 1
        self.length += 1
        self.cache.lengths += 1
        return logits


def static_decode_blocker(model: MoEModel) -> str | None:
    """Why the model's decode step cannot be captured in a CUDA graph, or None when it can.

    Asks the MoE blocks' seams (moeinfer/model/moe.py): observers, routing transforms and the experts
    stage each say whether they run without reading tensors back to the host."""
    if type(model) is not MoEModel or model.token_observers:
        return "the model is wrapped or observed (routing traces)"
    for layer in model.layers:
        block = layer.mlp
        if not isinstance(block, MoEBlock):
            continue
        if type(block) is not MoEBlock:
            return f"layer {block.layer_idx}'s MoE block is replaced"
        if block.routing_observers:
            return f"layer {block.layer_idx} has a routing observer"
        unsafe = [t.name for t in block.gate.transforms if not t.graph_safe]
        if unsafe:
            return (f"layer {block.layer_idx} has routing transforms that sync with the host ({', '.join(unsafe)}: "
                    "masked experts, dynamic gating, merged experts or replay)")
        stage = block.experts
        if not getattr(stage, "graph_safe", False):
            return (f"layer {block.layer_idx}'s experts stage {type(stage).__name__} (kernel "
                    f"{getattr(stage, 'kernel', '?')!r}) reads expert counts back to the host; float experts "
                    "are capturable under use_kernel_(model, 'triton'), quantized ones when the fused kernel "
                    "covers them (one width in 2, 4, 8 bits)")
    return None


def decode_step(model: MoEModel, cache: KVCache) -> DecodeStep:
    """The decode function `generate` uses: a CUDA-graph StaticDecoder on CUDA when the model
    allows it, else the model's ordinary forward (on the CPU, `generate` also prepares the one-row
    program its forward runs: moeinfer.engine.cpu_decode)."""

    def eager(next_ids: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return model(next_ids[:, None], attention_mask=active, cache=cache)[:, -1]

    if cache.valid.device.type != "cuda":
        return eager
    why = static_decode_blocker(model)
    if why is None and bool((cache.lengths != cache.lengths[0]).any()):
        why = "rows of the cache have different lengths"
    if why is not None:
        log.info("decode without a CUDA graph: %s", why)
        return eager
    return StaticDecoder(model, cache, cuda_graph=True)
