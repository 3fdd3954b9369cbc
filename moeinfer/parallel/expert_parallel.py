"""Expert parallelism: the MoE block's dispatch / expert compute / combine stages across ranks.

Shapes: N tokens, D hidden, K top-k, E experts (global), W ranks, n tokens this rank dispatches,
U units sent (one unit = one token for one destination rank), M units received, P (unit, local
expert) pairs computed here.

Follows the all-to-all expert parallelism of GShard / DeepSpeed-MoE / DeepEP, with token
deduplication (a token goes once to each rank holding any of its experts) and DeepSeek's two-batch
overlap. `ExpertParallelExperts` replaces `MoEBlock.experts` (same forward signature); the router
and shared expert stay replicated, and the model does not know. Per forward:

1. shard: in "replicated" mode rank r dispatches tokens [r*N/W, (r+1)*N/W); in "sharded" mode all its own;
2. plan: pick a replica for each (token, k) (token index mod replicas), group (token, rank) units
   by destination, with the K local expert slots (-1: not there) and weights as metadata;
3. exchange per-destination unit counts (all_to_all of [W] ints);
4. dispatch: all_to_all the units' activations [U, D] and metadata [U, 2K];
5. compute the local experts on the received units, weighted sum per unit -> [M, D];
6. combine: all_to_all the sums back [U, D], add them into the token rows;
7. replicated mode: all_gather the shards so every rank holds out [N, D].
With overlap, steps 2-6 run on two micro-batches: the dispatch of the second and the return of the
first travel while the other's experts compute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moeinfer.model.moe import Routing, expert_compute
from moeinfer.parallel.config import ExpertParallelConfig
from moeinfer.parallel.dist import ExpertParallelError, Pending, all_to_all, guarded
from moeinfer.parallel.placement import Placement
from moeinfer.parallel.stats import LayerStats, RankStats


@dataclass
class _Plan:
    """One micro-batch in flight."""

    n: int  # tokens of the micro-batch
    unit_token: torch.Tensor  # [U] token row of each unit (within the micro-batch)
    send_counts: list[int]  # [W] units per destination
    x_send: torch.Tensor  # [U, D]
    meta_send: torch.Tensor  # [U, 2K] int32: K local slots, then K fp32 weights as bits
    recv_counts: list[int] = field(default_factory=list)
    x_recv: torch.Tensor | None = None  # [M, D]
    meta_recv: torch.Tensor | None = None  # [M, 2K]
    y_recv: torch.Tensor | None = None  # [M, D]
    y_back: torch.Tensor | None = None  # [U, D]
    pending: list[Pending] = field(default_factory=list)


class ExpertParallelExperts(nn.Module):
    """This rank's experts of one MoE layer plus the exchange; forward(x [N, D], routing) -> [N, D]."""

    collective = True  # every rank must run each forward (moeinfer.model.gating refuses per-token k)
    kernels = ("reference",)  # ExpertStage (moeinfer/model/moe.py): its own all-to-all expert stage
    kernel = "reference"
    graph_safe = False  # exchanges counts with the other ranks

    def __init__(self, *, layer: int, placement: Placement, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                 group: dist.ProcessGroup, config: ExpertParallelConfig, stats: RankStats) -> None:
        super().__init__()
        self.layer = layer
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.config = config
        self.stats = stats
        self.local_experts = placement.local_experts(layer, self.rank)
        if gate_up_proj.shape[0] != len(self.local_experts):
            raise ExpertParallelError(f"layer {layer}: {gate_up_proj.shape[0]} expert weights for "
                                      f"{len(self.local_experts)} local experts")
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)  # [n_local, 2I, D]
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)  # [n_local, D, I]
        E, W = placement.num_experts, self.world
        replicas = placement.layers[layer]
        table = torch.full((E, max(len(r) for r in replicas)), -1, dtype=torch.long)
        for e, ranks in enumerate(replicas):
            table[e, :len(ranks)] = torch.tensor(ranks)
        slot_of = torch.full((W, E), -1, dtype=torch.long)  # [W, E] local slot of expert e on rank w
        for w in range(W):
            for i, e in enumerate(placement.local_experts(layer, w)):
                slot_of[w, e] = i
        self.register_buffer("replica_table", table.to(gate_up_proj.device), persistent=False)  # [E, Rmax]
        self.register_buffer("replica_count", torch.tensor([len(r) for r in replicas],
                                                           device=gate_up_proj.device), persistent=False)  # [E]
        self.register_buffer("slot_of", slot_of.to(gate_up_proj.device), persistent=False)
        self._num_experts = E

    @property
    def num_experts(self) -> int:
        return self._num_experts

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, rank={self.rank}/{self.world}, local_experts={self.local_experts}, "
                f"tokens={self.config.tokens}, dedup={self.config.dedup}, overlap={self.config.overlap}")

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        st = LayerStats(calls=1)
        N = x.shape[0]
        # 1. shard
        if self.config.tokens == "replicated":
            lo, hi = self.rank * N // self.world, (self.rank + 1) * N // self.world
        else:
            lo, hi = 0, N
        xs, idx, w = x[lo:hi], routing.indices[lo:hi], routing.weights[lo:hi]
        gid = torch.arange(lo, hi, device=x.device) + (self.rank if self.config.tokens == "sharded" else 0)
        n = hi - lo
        st.tokens = n
        bounds = [(0, n // 2), (n // 2, n)] if self.config.overlap else [(0, n)]
        # 2. plan each micro-batch
        plans = [self._plan(xs[a:b], idx[a:b], w[a:b], gid[a:b]) for a, b in bounds]
        # 3. counts
        self._exchange_counts(plans, N, st)
        # 4-6. dispatch, compute, combine (pipelined when there are two micro-batches)
        overlap = len(plans) > 1
        for p in plans:
            self._dispatch(p, st, async_op=overlap)
        for p in plans:
            self._wait(p, st)
            self._compute(p, st)
            self._return(p, st, async_op=overlap)
        outs = []
        for p in plans:
            self._wait(p, st)
            assert p.y_back is not None
            outs.append(torch.zeros(p.n, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, p.unit_token,
                                                                                                 p.y_back))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        # 7. all-gather in replicated mode
        if self.config.tokens == "replicated" and self.world > 1:
            out = self._gather(out, N, st)
        self.stats.layer(self.layer).add(st)
        return out

    def _what(self, op: str) -> str:
        return f"{op} of MoE layer {self.layer} (rank {self.rank} of {self.world})"

    def _plan(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gid: torch.Tensor) -> _Plan:
        n, K = idx.shape
        choice = gid[:, None] % self.replica_count[idx]  # [n, K] which replica serves (token, k)
        dest = self.replica_table[idx, choice]  # [n, K]
        slot = self.slot_of[dest, idx]  # [n, K] slot on the destination rank
        token = torch.arange(n, device=x.device)[:, None].expand(n, K)
        kk = torch.arange(K, device=x.device)[None, :].expand(n, K)
        m = max(n, 1)
        # Units sorted by destination, then token (then k without dedup).
        key = dest * m + token if self.config.dedup else (dest * m + token) * K + kk
        keys, inverse = torch.unique(key.reshape(-1), return_inverse=True)
        per = keys if self.config.dedup else keys // K
        unit_token, unit_dest = per % m, per // m
        U = keys.shape[0]
        meta_slot = torch.full((U, K), -1, dtype=torch.int32, device=x.device)
        meta_w = torch.zeros(U, K, dtype=torch.float32, device=x.device)
        meta_slot[inverse, kk.reshape(-1)] = slot.reshape(-1).to(torch.int32)
        meta_w[inverse, kk.reshape(-1)] = w.reshape(-1).float()
        meta = torch.cat([meta_slot, meta_w.view(torch.int32)], dim=1)  # [U, 2K]
        counts = torch.bincount(unit_dest, minlength=self.world).tolist()
        return _Plan(n=n, unit_token=unit_token, send_counts=counts, x_send=x[unit_token], meta_send=meta)

    def _exchange_counts(self, plans: list[_Plan], N: int, st: LayerStats) -> None:
        t0 = time.perf_counter()
        send = torch.tensor([[p.send_counts[r] for p in plans] + [N] for r in range(self.world)],
                            dtype=torch.long)  # [W, mb + 1]
        recv = torch.empty_like(send)
        if send.device.type != plans[0].x_send.device.type:
            send, recv = send.to(plans[0].x_send.device), recv.to(plans[0].x_send.device)
        all_to_all(recv, send, [1] * self.world, [1] * self.world, group=self.group,
                   what=self._what("token-count exchange"), rank=self.rank, timeout_s=self.config.timeout_s)
        recv = recv.cpu()
        if self.config.tokens == "replicated" and bool((recv[:, -1] != N).any()):
            raise ExpertParallelError(
                f"rank {self.rank}: ranks disagree on the batch in MoE layer {self.layer} (tokens per rank: "
                f"{recv[:, -1].tolist()}); in replicated mode every rank must run the same inputs")
        for i, p in enumerate(plans):
            p.recv_counts = recv[:, i].tolist()
        st.comm_s += time.perf_counter() - t0

    def _dispatch(self, p: _Plan, st: LayerStats, *, async_op: bool) -> None:
        t0 = time.perf_counter()
        M, K2 = sum(p.recv_counts), p.meta_send.shape[1]
        p.x_recv = p.x_send.new_empty(M, p.x_send.shape[1])
        p.meta_recv = p.meta_send.new_empty(M, K2)
        kw = dict(group=self.group, rank=self.rank, timeout_s=self.config.timeout_s, async_op=async_op)
        p.pending = [all_to_all(p.x_recv, p.x_send, p.recv_counts, p.send_counts,
                                what=self._what("dispatch all-to-all"), **kw),
                     all_to_all(p.meta_recv, p.meta_send, p.recv_counts, p.send_counts,
                                what=self._what("routing-metadata all-to-all"), **kw)]
        unit_bytes = p.x_send.shape[1] * p.x_send.element_size() + K2 * 4
        st.units_sent += sum(p.send_counts)
        st.units_received += M
        st.bytes_sent += (sum(p.send_counts) - p.send_counts[self.rank]) * unit_bytes
        st.bytes_received += (M - p.recv_counts[self.rank]) * unit_bytes
        st.comm_s += time.perf_counter() - t0

    def _wait(self, p: _Plan, st: LayerStats) -> None:
        t0 = time.perf_counter()
        for pending in p.pending:
            pending.wait()
        p.pending = []
        st.comm_s += time.perf_counter() - t0

    def _compute(self, p: _Plan, st: LayerStats) -> None:
        t0 = time.perf_counter()
        assert p.x_recv is not None and p.meta_recv is not None
        M, K = p.meta_recv.shape[0], p.meta_recv.shape[1] // 2
        slots = p.meta_recv[:, :K]  # [M, K]
        weights = p.meta_recv[:, K:].contiguous().view(torch.float32)  # [M, K]
        valid = slots >= 0
        unit = torch.arange(M, device=slots.device)[:, None].expand(M, K)[valid]  # [P]
        slot = slots[valid].long()
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=len(self.local_experts))
        y = expert_compute(p.x_recv[unit[order]], counts, self.gate_up_proj, self.down_proj)  # [P, D]
        wt = weights[valid][order].to(y.dtype)
        p.y_recv = torch.zeros_like(p.x_recv).index_add_(0, unit[order], y * wt[:, None])
        st.slots_computed += int(slot.numel())
        st.compute_s += time.perf_counter() - t0

    def _return(self, p: _Plan, st: LayerStats, *, async_op: bool) -> None:
        t0 = time.perf_counter()
        assert p.y_recv is not None
        p.y_back = p.y_recv.new_empty(sum(p.send_counts), p.y_recv.shape[1])
        p.pending = [all_to_all(p.y_back, p.y_recv, p.send_counts, p.recv_counts, group=self.group,
                                what=self._what("combine all-to-all"), rank=self.rank,
                                timeout_s=self.config.timeout_s, async_op=async_op)]
        row = p.y_recv.shape[1] * p.y_recv.element_size()
        st.bytes_sent += (p.y_recv.shape[0] - p.recv_counts[self.rank]) * row
        st.bytes_received += (p.y_back.shape[0] - p.send_counts[self.rank]) * row
        st.comm_s += time.perf_counter() - t0

    def _gather(self, out: torch.Tensor, N: int, st: LayerStats) -> torch.Tensor:
        t0 = time.perf_counter()
        W = self.world
        sizes = [(r + 1) * N // W - r * N // W for r in range(W)]
        width = max(sizes)
        padded = out.new_zeros(width, out.shape[1])
        padded[:out.shape[0]] = out
        parts = [torch.empty_like(padded) for _ in range(W)]
        guarded(self._what("all-gather"), lambda: dist.all_gather(parts, padded, group=self.group),
                rank=self.rank, timeout_s=self.config.timeout_s)
        st.bytes_gathered += (W - 1) * width * out.shape[1] * out.element_size()
        st.comm_s += time.perf_counter() - t0
        return torch.cat([part[:s] for part, s in zip(parts, sizes)])
