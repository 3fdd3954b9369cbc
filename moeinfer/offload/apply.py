"""`offload_(model, config)`: run a loaded model with its experts in a slow tier and a cache in fast memory.

Follows the expert-offloading systems of the survey's section 4.2 (Mixtral-offloading, MoE-Infinity,
Fiddler, HOBBIT, AdapMoE, EdgeMoE, ProMoE); the model never knows (like `apply_expert_parallel_`).
1. check the model: MoE layers with experts of one shape, on one device: plain stacked experts, or
   group-wise quantized experts of one width (moved as byte blobs, moeinfer.offload.packed);
2. write every expert to the slow tier (a disk store in `offload_dir`, or host memory); a model
   loaded with its experts left on disk (`model.expert_files`, moeinfer.loading.expert_files) uses
   the checkpoint itself as its disk tier (CheckpointStore: nothing written, `offload_dir` unused);
   a model whose quantized experts were written to an expert store while they were made
   (`model.expert_store_dir`, moeinfer.planning.quantize_load; their codes are meta tensors) opens
   that store (nothing written; `offload_dir` must name the same folder);
3. build the policy, the cache (capacities from bytes or counts) and the prefetcher: `build_cache`,
   which the simulator calls too, so both take the same decisions;
4. calibrate the CPU-assist cost model when asked;
5. replace each block's experts by `OffloadedExperts` and free the resident weights;
6. chain a token observer so the runtime sees steps and new requests; warm the cache (static).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.kernels.select import reapply_kernel_
from moeinfer.model.moe import Experts
from moeinfer.model.transformer import MoEModel
from moeinfer.offload.cache import ExpertCache, resolve_capacities
from moeinfer.offload.checkpoint_store import CheckpointStore
from moeinfer.offload.config import OffloadConfig, OffloadError
from moeinfer.offload.cpu_assist import CostModel, CpuExperts, calibrate
from moeinfer.offload.experts import OffloadRuntime, OffloadedExperts
from moeinfer.offload.lowbit import find_codec
from moeinfer.offload.packed import PackedFormat, midpoint_zeros
from moeinfer.offload.policies import PolicyContext, make_policy
from moeinfer.offload.prefetch import PrefetchContext, Prefetcher, make_prefetcher
from moeinfer.offload.store import DiskStore, HostStore
from moeinfer.offload.transfer import CudaLoader, ThreadLoader
from moeinfer.offload.visits import all_visits
from moeinfer.traces.trace import RoutingTrace


def as_trace(value: Any, what: str) -> Any:
    """A RoutingTrace, or a path to one (.npz), or None."""
    if value is None:
        return None

    if isinstance(value, RoutingTrace):
        return value
    if isinstance(value, (str, os.PathLike)):
        return RoutingTrace.load(value)
    raise ValueError(f"{what} must be a RoutingTrace or a path to one, got {type(value).__name__}")


def build_cache(config: OffloadConfig, *, num_layers: int, num_experts: int, top_k: int, expert_bytes: int,
                routers: list[Any] | None = None, assist: CostModel | None = None,
                low_bit_bytes: int | None = None) -> tuple[ExpertCache, Prefetcher]:
    """The policy, cache and prefetcher of `config` for a model (or trace) of this shape (step 3)."""
    calibration = as_trace(config.calibration, "OffloadConfig.calibration")
    future_trace = as_trace(config.future, "OffloadConfig.future")
    future = all_visits(future_trace) if future_trace is not None else None
    policy = make_policy(config.policy, PolicyContext(num_layers=num_layers, num_experts=num_experts,
                                                      calibration=calibration, future=future), **config.policy_args)
    caps = resolve_capacities(config.cache, scope=config.scope, num_layers=num_layers, num_experts=num_experts,
                              expert_bytes=expert_bytes, policy=policy)
    cache = ExpertCache(num_layers=num_layers, num_experts=num_experts, capacities=caps, policy=policy,
                        expert_bytes=expert_bytes, low_bit_bytes=low_bit_bytes,
                        low_bit_threshold=config.low_bit_threshold,
                        assist=assist.prefer_cpu if assist is not None else None)
    prefetcher = make_prefetcher(config.prefetch, PrefetchContext(num_layers=num_layers, num_experts=num_experts,
                                                                  top_k=top_k, calibration=calibration,
                                                                  routers=routers), **config.prefetch_args)
    return cache, prefetcher


def _check_model(model: MoEModel) -> tuple[list[Any], PackedFormat | None]:
    """Step 1: the MoE blocks, and the packed format when their experts are quantized (None: float)."""
    blocks = model.moe_blocks()
    if not blocks:
        raise OffloadError("the model has no MoE layers: nothing to offload")
    for b in blocks:
        if isinstance(b.experts, OffloadedExperts):
            raise OffloadError("the model is already offloaded")
        if type(b.experts) not in (Experts, QuantizedExperts):
            raise OffloadError(f"MoE layer {b.layer_idx}: experts are {type(b.experts).__name__}; offloading "
                               "needs plain stacked experts or quantized experts (apply it before other expert "
                               "transforms)")
    kinds = {type(b.experts) for b in blocks}
    if len(kinds) != 1:
        raise OffloadError("MoE layers mix float and quantized experts; offloading needs one kind in every "
                           "layer (quantize every layer to one precision, or none)")
    if kinds == {QuantizedExperts}:
        formats = {PackedFormat.of(b.experts) for b in blocks}
        if len(formats) != 1:
            raise OffloadError(f"quantized MoE layers differ in format {sorted(map(str, formats))}; offloading "
                               "needs one (the same precision in every layer)")
        return blocks, formats.pop()
    shapes = {(tuple(b.experts.gate_up_proj.shape), tuple(b.experts.down_proj.shape)) for b in blocks}
    if len(shapes) != 1:
        raise OffloadError(f"MoE layers have experts of different shapes {sorted(shapes)}; offloading needs one")
    return blocks, None


def _written_store(model: MoEModel, blocks: list[Any], config: OffloadConfig) -> Path | None:
    """Step 2's store written while quantizing (its folder), or None when the codes are in memory."""
    root = getattr(model, "expert_store_dir", None)
    if not any(t.is_meta for t in blocks[0].experts.parameters()):
        return None
    if root is None:
        raise OffloadError("the model's quantized experts hold no codes (meta tensors) and it records no expert "
                           "store to read them from")
    if config.tier != "disk" or config.offload_dir is None or Path(config.offload_dir).resolve() != root.resolve():
        raise OffloadError(f"the model's quantized experts were written to the expert store {root}: offload them "
                           f"to tier='disk' with offload_dir={str(root)!r}")
    return root


def offload_(model: MoEModel, config: OffloadConfig, *, progress: bool = False,
             cost_model: CostModel | None = None) -> MoEModel:
    """Offload `model`'s experts in place (steps in the module docstring); returns the model.

    `model.offload` is the `OffloadRuntime` (stats: `model.offload.cache.stats`, `model.offload.stats`).
    `cost_model` overrides the start-up calibration of CPU assist (tests, the simulator's twin runs).
    """
    # 1. the model
    blocks, packed = _check_model(model)
    device = model.device
    midpoints = False
    files = getattr(model, "expert_files", None)
    streamed = packed is None and blocks[0].experts.gate_up_proj.is_meta
    if streamed:
        if files is None:
            raise OffloadError("the model's experts hold no weights (meta tensors) and it records no checkpoint "
                               "files to read them from")
        if config.tier != "disk" or config.low_bit_threshold is not None:
            raise OffloadError("experts left on disk by the loader are offloaded to tier='disk' (the checkpoint "
                               "is the slow tier), without low_bit_threshold; load the model whole for other tiers")
        if device.type != "cpu":
            raise OffloadError("experts left on disk by the loader run on a CPU fast tier only (for now)")
        E, dtype, layers = files.num_experts, files.dtype, []
        gate_up_shape, down_shape = files.gate_up_shape, files.down_shape
    elif packed is None:
        first = blocks[0].experts
        E, two_i, D = first.gate_up_proj.shape
        # the fast tier is where the rest of the model runs: experts already in (pinned) host memory, as
        # a model larger than the GPU is built, are used in place as the "cpu" tier
        dtype = first.gate_up_proj.dtype
        layers = [(b.experts.gate_up_proj.data, b.experts.down_proj.data) for b in blocks]
        gate_up_shape, down_shape = (two_i, D), (D, two_i // 2)
        del first
    else:
        E, dtype = blocks[0].experts.num_experts, torch.uint8
        if config.cpu_assist or config.low_bit_threshold is not None:
            raise OffloadError("quantized experts are offloaded as their codes: CPU assist and mixed-precision "
                               "loading (low_bit_threshold) need float experts")
        written = _written_store(model, blocks, config)
        layers = [] if written is not None else [packed.stacked(b.experts) for b in blocks]
        # symmetric codes (the kernels then skip the zeros): seen here, or recorded when the store was written
        midpoints = (all(midpoint_zeros(b.experts) for b in blocks) if written is None
                     else bool(getattr(model, "expert_store_midpoints", False)))
        gate_up_shape, down_shape = (packed.nbytes("gate_up"),), (packed.nbytes("down"),)
    codec = None
    if config.low_bit_threshold is not None:
        if config.tier != "disk":
            raise OffloadError("mixed-precision loading (low_bit_threshold) keeps its low-bit copies in the "
                               "disk store: use tier='disk'")
        codec = find_codec(config.low_bit_bits, config.low_bit_group_size)
    # 2. the slow tier
    if streamed:
        store: Any = CheckpointStore(files, evict_page_cache=config.evict_page_cache)
    elif packed is not None and written is not None:
        store = DiskStore(written, len(blocks), evict_page_cache=config.evict_page_cache)
        if store.expert_bytes != packed.expert_bytes:
            store.close()
            raise OffloadError(f"expert store {written} holds experts of {store.expert_bytes} bytes; the model's "
                               f"quantized experts take {packed.expert_bytes}")
    elif config.tier == "disk":
        assert config.offload_dir is not None
        store = DiskStore.create(Path(config.offload_dir), layers, evict_page_cache=config.evict_page_cache,
                                      progress=progress, codec=codec)
    else:
        store = HostStore(layers, pin=device.type == "cuda")
    loader: Any = (CudaLoader(timeout_s=config.timeout_s, device=device, host_resident=config.tier == "cpu")
                   if device.type == "cuda" else ThreadLoader(timeout_s=config.timeout_s))
    try:
        # 4. CPU assist, calibrated over the loader itself (the link loads will use)
        assist = None
        if config.cpu_assist and cost_model is None:
            def transfer(key: tuple[int, int], g: torch.Tensor, d: torch.Tensor) -> None:
                loader.submit(key, lambda a, b: store.read(key, a, b), g, d, None).wait()

            assist = calibrate(read=transfer, keys=[(0, e) for e in range(E)], gate_up_shape=gate_up_shape,
                               down_shape=down_shape, dtype=dtype, weights_on_host=config.tier == "cpu",
                               device=device)
        elif config.cpu_assist:
            assist = cost_model
        # 3. cache and prefetcher
        routers = [b.gate for b in blocks]
        cache, prefetcher = build_cache(config, num_layers=len(blocks), num_experts=E, top_k=model.config.top_k,
                                        expert_bytes=store.expert_bytes, routers=routers, assist=assist,
                                        low_bit_bytes=getattr(store, "low_bit_bytes", None))
    except BaseException:
        loader.close()
        store.close()
        raise
    runtime = OffloadRuntime(cache=cache, prefetcher=prefetcher, store=store, loader=loader,
                             gate_up_shape=gate_up_shape, down_shape=down_shape, dtype=dtype, device=device,
                             cpu_experts=CpuExperts(threads=torch.get_num_threads()) if config.cpu_assist else None,
                             config=config, packed=packed, midpoints=midpoints)
    runtime.stats.extra["cost_model"] = assist
    if config.remove_offload_dir and isinstance(store, DiskStore):  # never a checkpoint used as the tier
        runtime.scratch = store.root
    # 5. swap the experts in
    for pos, b in enumerate(blocks):
        b.experts = OffloadedExperts(layer=pos, num_experts=E, runtime=runtime)
    del layers
    if hasattr(model, "expert_store_dir"):
        del model.expert_store_dir
    if hasattr(model, "expert_store_midpoints"):
        del model.expert_store_midpoints
    # 6. steps, requests, warm-up
    def on_tokens(valid: torch.Tensor, positions: torch.Tensor, new_sequences: bool) -> None:
        runtime.begin_step(new_sequences, int(valid.sum()))

    runtime.token_handle = model.add_token_observer(on_tokens)
    model.offload = runtime  # type: ignore[attr-defined]
    reapply_kernel_(model)  # the kernel chosen before: offloaded experts say whether they run it
    runtime.warm()
    return model
