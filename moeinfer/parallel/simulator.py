"""Expert-parallel simulator: all-to-all bytes, load imbalance and time for clusters we do not have.

Shapes: T tokens of one step (W ranks x tokens_per_rank), K top-k, E experts, W ranks, D hidden.

Given a routing trace, a placement, a model shape and a cluster profile, replay one MoE layer step by
step with the runtime's own rules (`ExpertParallelExperts`):
1. form steps: each of W ranks brings `tokens_per_rank` consecutive trace tokens (data-parallel
   attention, the "sharded" token mode); the trace is cycled when it is shorter than a step;
2. each (token, k) goes to replica (global token index mod R) of its expert; a unit is a (token,
   destination rank) pair with deduplication, a (token, k) pair without; units whose destination
   is the source rank move no bytes;
3. bytes: dispatch sends D activations + K (slot, weight) int32/fp32 pairs per unit, combine returns
   D activations; each byte is intra-node when both ranks share a node, inter-node otherwise;
4. time of one all-to-all = latency + max over ranks of max(intra bytes / intra bandwidth,
   inter bytes / inter bandwidth) over the larger of its send and receive sides (NVLink and the
   NIC run concurrently, links are full duplex, no congestion in the fabric);
5. expert time = (max load over ranks) x 6 D I flops / (effective TFLOP/s): the slowest rank sets
   the pace (imbalance = max / mean load); step time = 2 all-to-alls + expert time, or with
   two-batch overlap max(2 a2a, experts) + 1/2 min(2 a2a, experts) (half of the shorter one stays
   exposed at the pipeline's ends).
Not modelled: the attention and the rest of the layer, the all-gather of replicated-token mode,
kernel launch overheads, contention between layers, and routing that reacts to placement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moeinfer.model.shape import ModelShape
from moeinfer.parallel.placement import Placement

# -- cluster profiles and model shapes (registries) --------------------------------------------------


@dataclass(frozen=True)
class ClusterProfile:
    """One GPU's view of the fabric. Bandwidths in GB/s per GPU per direction, as achieved by
    all-to-all kernels (not the link's peak)."""

    name: str
    ranks_per_node: int
    intra_gbps: float
    inter_gbps: float
    latency_us: float
    expert_tflops: float  # effective dense bf16 TFLOP/s of grouped expert GEMMs

    def __post_init__(self) -> None:
        if self.ranks_per_node < 1 or self.intra_gbps <= 0 or self.inter_gbps <= 0 or self.expert_tflops <= 0:
            raise ValueError(f"cluster profile {self.name!r}: ranks_per_node, bandwidths and TFLOP/s must be > 0")


CLUSTERS: dict[str, ClusterProfile] = {}


def register_cluster(profile: ClusterProfile) -> ClusterProfile:
    CLUSTERS[profile.name] = profile
    return profile


def get_cluster(name: str) -> ClusterProfile:
    if name not in CLUSTERS:
        raise ValueError(f"cluster profile {name!r} is not known; valid: {', '.join(sorted(CLUSTERS))}")
    return CLUSTERS[name]


# DeepEP reports ~150 GB/s NVLink and ~45-50 GB/s RDMA per H800 GPU with 400 Gb/s ConnectX-7.
register_cluster(ClusterProfile("h100-nvlink-ib400", ranks_per_node=8, intra_gbps=150.0, inter_gbps=45.0,
                                latency_us=20.0, expert_tflops=400.0))
register_cluster(ClusterProfile("a100-nvlink-ib200", ranks_per_node=8, intra_gbps=100.0, inter_gbps=20.0,
                                latency_us=25.0, expert_tflops=200.0))
register_cluster(ClusterProfile("l40s-pcie-eth100", ranks_per_node=4, intra_gbps=20.0, inter_gbps=10.0,
                                latency_us=50.0, expert_tflops=180.0))


# -- simulation ---------------------------------------------------------------------------------------


@dataclass
class SimResult:
    ranks: int
    steps: int
    tokens_per_rank: int
    imbalance: float  # mean over steps and layers of max/mean rank load
    imbalance_total: float  # per layer, max/mean of the load summed over all steps; mean over layers
    units_per_token: float  # units dispatched per token and layer (self excluded)
    bytes_per_token: float  # all-to-all bytes (dispatch + combine) per token and layer, self excluded
    inter_fraction: float  # share of those bytes crossing nodes
    a2a_us: float  # one all-to-all, mean over steps and layers
    expert_us: float
    step_us: float  # 2 a2a + experts, no overlap
    step_overlap_us: float  # with two-batch overlap

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _layer_step(idx: torch.Tensor, gid: torch.Tensor, src: torch.Tensor, plc: Placement, layer: int,
                tables: dict[int, tuple[torch.Tensor, torch.Tensor]], W: int, dedup: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of one layer: idx [T, K] (-1 = unused), gid [T] global ids, src [T] source ranks ->
    (load [W], unit sources [U], unit destinations [U]) with self-sends kept (filtered by caller)."""
    table, count = tables[layer]
    T, K = idx.shape
    valid = idx >= 0
    e = idx.clamp(min=0)
    dest = table[e, gid[:, None] % count[e]]  # [T, K]
    load = torch.bincount(dest[valid], minlength=W)
    token = torch.arange(T)[:, None].expand(T, K)
    if dedup:
        key = torch.unique((token * W + dest)[valid])
        u_token, u_dest = key // W, key % W
    else:
        u_token, u_dest = token[valid], dest[valid]
    return load, src[u_token], u_dest


def _tables(plc: Placement) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for layer, reps in plc.layers.items():
        table = torch.full((plc.num_experts, max(len(r) for r in reps)), -1, dtype=torch.long)
        for e, ranks in enumerate(reps):
            table[e, :len(ranks)] = torch.tensor(ranks)
        out[layer] = (table, torch.tensor([len(r) for r in reps]))
    return out


def simulate(indices: torch.Tensor, layers: list[int], placement: Placement, *, shape: ModelShape,
             cluster: ClusterProfile, tokens_per_rank: int, dedup: bool = True, max_steps: int = 64) -> SimResult:
    """Replay trace `indices [N, L, K]` (column l = model layer layers[l]); see the module docstring."""
    W = placement.num_ranks
    N, L, K = indices.shape
    if shape.num_experts != placement.num_experts or shape.top_k != K:
        raise ValueError(f"model shape {shape.name!r} has {shape.num_experts} experts, top-{shape.top_k}; the "
                         f"placement has {placement.num_experts} experts and the trace top-{K}")
    T = W * tokens_per_rank
    steps = max(1, min(max_steps, -(-N // T)))
    tables = _tables(placement)
    node = torch.arange(W) // cluster.ranks_per_node
    unit_bytes = shape.hidden * shape.dtype_bytes + K * 8  # dispatch: activations + (slot, weight) pairs
    back_bytes = shape.hidden * shape.dtype_bytes
    flops_per_slot = 6 * shape.hidden * shape.inter
    src = torch.arange(T) // tokens_per_rank  # 1.
    imb, a2a, expert, step_t, step_o = [], [], [], [], []
    total_load = torch.zeros(L, W)
    units = bytes_all = inter = 0.0
    for s in range(steps):
        rows = (torch.arange(T) + s * T) % N
        gid = torch.arange(T) % tokens_per_rank + src  # as the runtime: local index + rank
        for li, layer in enumerate(layers):
            load, u_src, u_dst = _layer_step(indices[rows, li], gid, src, placement, layer, tables, W, dedup)  # 2.
            total_load[li] += load.float()
            remote = u_src != u_dst
            u_src, u_dst = u_src[remote], u_dst[remote]
            cross = node[u_src] != node[u_dst]
            # 3. bytes per rank, intra and inter, send and receive (dispatch; combine mirrors it)
            per = []
            for mask in (~cross, cross):
                sent = torch.bincount(u_src[mask], minlength=W).double()
                recv = torch.bincount(u_dst[mask], minlength=W).double()
                per.append(torch.maximum(sent, recv))
            units += float(remote.sum())
            bytes_all += float(remote.sum()) * (unit_bytes + back_bytes)
            inter += float(cross.sum()) * (unit_bytes + back_bytes)
            # 4. time of the dispatch all-to-all (the combine moves back_bytes per unit instead)
            t_disp = cluster.latency_us + float(torch.maximum(per[0] * unit_bytes / (cluster.intra_gbps * 1e3),
                                                              per[1] * unit_bytes / (cluster.inter_gbps * 1e3)).max())
            t_comb = cluster.latency_us + float(torch.maximum(per[0] * back_bytes / (cluster.intra_gbps * 1e3),
                                                              per[1] * back_bytes / (cluster.inter_gbps * 1e3)).max())
            # 5. experts: the slowest rank
            t_exp = float(load.max()) * flops_per_slot / (cluster.expert_tflops * 1e6)
            mean = float(load.float().mean())
            imb.append(float(load.max()) / mean if mean else 1.0)
            comm = t_disp + t_comb
            a2a.append(comm / 2)
            expert.append(t_exp)
            step_t.append(comm + t_exp)
            step_o.append(max(comm, t_exp) + 0.5 * min(comm, t_exp))
    per_layer = total_load.max(1).values / total_load.mean(1).clamp(min=1e-9)  # [L]
    tokens = steps * T * L

    def mean(v: list[float]) -> float:
        return sum(v) / len(v)

    return SimResult(ranks=W, steps=steps, tokens_per_rank=tokens_per_rank, imbalance=mean(imb),
                     imbalance_total=float(per_layer.mean()),
                     units_per_token=units / tokens, bytes_per_token=bytes_all / tokens,
                     inter_fraction=inter / bytes_all if bytes_all else 0.0, a2a_us=mean(a2a),
                     expert_us=mean(expert), step_us=mean(step_t), step_overlap_us=mean(step_o))


def synthetic_trace(*, num_tokens: int, num_layers: int, num_experts: int, top_k: int, skew: float,
                    seed: int = 0) -> torch.Tensor:
    """[N, L, K] choices from a per-layer log-normal expert popularity (sigma = `skew`), K distinct
    experts per token drawn without replacement. skew=0 is uniform routing."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(num_tokens, num_layers, top_k, dtype=torch.long)
    for layer in range(num_layers):
        pop = torch.exp(skew * torch.randn(num_experts, generator=g))
        out[:, layer] = torch.multinomial(pop.expand(num_tokens, -1), top_k, replacement=False, generator=g)
    return out


def skew_of(load: torch.Tensor) -> float:
    """The log-normal sigma whose coefficient of variation matches per-layer expert loads [L, E]."""
    cv = (load.std(dim=1, unbiased=False) / load.mean(dim=1)).mean()
    return float(torch.sqrt(torch.log1p(cv**2)))


