"""`apply_expert_parallel_` and `load_expert_parallel`: expert parallelism applied after loading.

1. resolve the placement (a JSON file, or a strategy computed from a routing profile) and check it
   fits the process group and the model; every rank must hold the same one;
2. replace each MoE block's `experts` by an `ExpertParallelExperts` holding only this rank's experts
   (sliced from a full model, or taken as they are when loading read only the local experts);
3. in replicated-token mode, seed every rank's RNG alike so sampling picks the same tokens.
`load_expert_parallel` does 1 first, then loads only the local experts' tensors from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from moeinfer.arch import parse_config
from moeinfer.loading.checkpoint import load_checkpoint, read_config
from moeinfer.model.moe import Experts
from moeinfer.model.transformer import MoEModel
from moeinfer.parallel.config import ExpertParallelConfig
from moeinfer.parallel.dist import ExpertParallelError, default_backend, guarded, init_distributed
from moeinfer.parallel.expert_parallel import ExpertParallelExperts
from moeinfer.parallel.placement import Placement, PlacementError, STRATEGIES, make_placement
from moeinfer.parallel.profile import read_profile
from moeinfer.parallel.stats import RankStats


def resolve_placement(placement: Placement | str, *, num_ranks: int, num_experts: int, layers: list[int],
                      profile: str | None = None, slots_per_rank: int | None = None) -> Placement:
    """A Placement from itself, a JSON path, or a strategy name (+ routing profile for balanced ones)."""
    if isinstance(placement, Placement):
        result = placement
    elif placement in STRATEGIES:
        load = None
        if profile is not None:
            prof = read_profile(profile, num_experts=num_experts)
            if prof.num_experts != num_experts:
                raise PlacementError(f"routing profile {profile} has {prof.num_experts} experts, the model {num_experts}")
            if len(prof.layers) != len(layers):
                raise PlacementError(f"routing profile {profile} covers {len(prof.layers)} MoE layers, "
                                     f"the model has {len(layers)}")
            load = prof.load()
        result = make_placement(placement, num_ranks=num_ranks, num_experts=num_experts, layers=layers,
                                load=load, slots_per_rank=slots_per_rank,
                                info={"profile": str(profile)} if profile else None)
    elif placement.endswith(".json") or os.path.exists(placement):
        result = Placement.load(placement)
    else:
        raise PlacementError(f"placement {placement!r} is neither a strategy ({', '.join(sorted(STRATEGIES))}) "
                             "nor a placement JSON file")
    result.check(num_ranks=num_ranks, num_experts=num_experts, layers=layers)
    return result


def _agree(placement: Placement, group: dist.ProcessGroup, rank: int, timeout_s: float) -> None:
    """Every rank must hold the same placement (a mismatch would route tokens to missing experts)."""
    layers = placement.to_json()["layers"]  # not `info`, which may name rank-local files
    digest = hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]
    all_digests: list[str | None] = [None] * dist.get_world_size(group)
    guarded("placement agreement", lambda: dist.all_gather_object(all_digests, digest, group=group),
            rank=rank, timeout_s=timeout_s)
    if len(set(all_digests)) != 1:
        raise ExpertParallelError(f"rank {rank}: ranks hold different placements (digests {all_digests}); "
                                  "give every rank the same placement file or profile")


def apply_expert_parallel_(model: MoEModel, *, group: dist.ProcessGroup | None = None,
                           placement: Placement | str = "contiguous",
                           config: ExpertParallelConfig | None = None) -> MoEModel:
    """Spread `model`'s experts over `group` in place (see the module docstring); returns the model."""
    if not dist.is_initialized():
        raise ExpertParallelError("apply_expert_parallel_ needs torch.distributed initialised "
                                  "(moeinfer.parallel.init_distributed() under torchrun)")
    group = group or dist.group.WORLD
    config = config or ExpertParallelConfig(placement=placement if isinstance(placement, str) else "custom")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if config.size is not None and config.size != world:
        raise ExpertParallelError(f"--expert-parallel {config.size} but the process group has {world} ranks "
                                  f"(run torchrun --nproc-per-node {config.size})")
    mc = model.config
    # 1. placement
    plc = resolve_placement(placement, num_ranks=world, num_experts=mc.num_experts, layers=mc.moe_layers,
                            profile=config.profile, slots_per_rank=config.slots_per_rank)
    _agree(plc, group, rank, config.timeout_s)
    # 2. swap the experts stage of every MoE block
    stats = RankStats(rank=rank)
    for block in model.moe_blocks():
        experts = block.experts
        if isinstance(experts, ExpertParallelExperts):
            raise ExpertParallelError(f"MoE layer {block.layer_idx} is already expert-parallel")
        if getattr(block.gate, "mode", None) is not None:
            raise ExpertParallelError(f"MoE layer {block.layer_idx} routes with dynamic gating ({block.gate.mode}): "
                                      "tokens grouped by their k would make ranks run different numbers of "
                                      "all-to-alls; use a fixed top-k:K under expert parallelism")
        if not isinstance(experts, Experts):
            raise ExpertParallelError(f"MoE layer {block.layer_idx}: experts are a {type(experts).__name__}; "
                                      "apply expert parallelism before other transforms of the experts")
        local = plc.local_experts(block.layer_idx, rank)
        n = experts.gate_up_proj.shape[0]
        if n == mc.num_experts:
            rows = torch.tensor(local, dtype=torch.long, device=experts.gate_up_proj.device)
            gate_up, down = experts.gate_up_proj.detach()[rows], experts.down_proj.detach()[rows]
        elif n == len(local):
            gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        else:
            raise ExpertParallelError(f"MoE layer {block.layer_idx} holds {n} experts: neither all "
                                      f"{mc.num_experts} nor this rank's {len(local)}")
        block.experts = ExpertParallelExperts(layer=block.layer_idx, placement=plc, gate_up_proj=gate_up,
                                              down_proj=down, group=group, config=config, stats=stats)
    # 3. same sampling on every rank
    if config.tokens == "replicated":
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"  # nccl moves CUDA tensors only
        seed = torch.tensor([int(torch.randint(0, 2**62, ()).item()) if rank == 0 else 0], device=device)
        guarded("seed broadcast", lambda: dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group),
                rank=rank, timeout_s=config.timeout_s)
        torch.manual_seed(int(seed.item()))
    model.expert_placement = plc  # type: ignore[attr-defined]
    return model


def expert_parallel_stats(model: MoEModel) -> RankStats:
    """This rank's counters (shared by all expert-parallel layers of `model`)."""
    for block in model.moe_blocks():
        if isinstance(block.experts, ExpertParallelExperts):
            return block.experts.stats
    raise ExpertParallelError("the model is not expert-parallel")


def load_expert_parallel(path: str | os.PathLike[str], *, config: ExpertParallelConfig,
                         device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
                         progress: bool = True) -> MoEModel:
    """Load a checkpoint with this rank's experts only, then apply expert parallelism."""
    backend = config.backend
    if backend is None:  # nccl moves CUDA tensors only: a model on the CPU needs gloo even on a GPU machine
        backend = default_backend() if str(device).startswith("cuda") else "gloo"
    group = init_distributed(backend=backend, timeout_s=config.timeout_s)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if config.size is not None and config.size != world:
        raise ExpertParallelError(f"--expert-parallel {config.size} but torchrun started {world} processes "
                                  f"(use torchrun --nproc-per-node {config.size})")
    if str(device).startswith("cuda") and ":" not in str(device):
        device = f"cuda:{torch.cuda.current_device()}"
    mc = parse_config(read_config(Path(path)))
    plc = resolve_placement(config.placement, num_ranks=world, num_experts=mc.num_experts, layers=mc.moe_layers,
                            profile=config.profile, slots_per_rank=config.slots_per_rank)
    local = {layer: plc.local_experts(layer, rank) for layer in mc.moe_layers}
    model = load_checkpoint(path, device=device, dtype=dtype, progress=progress and rank == 0, expert_slots=local)
    return apply_expert_parallel_(model, group=group, placement=plc, config=config)
