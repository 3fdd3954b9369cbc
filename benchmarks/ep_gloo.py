"""Measured expert parallelism under gloo on this machine: replay the real Mixtral-8x7B routing traces
through the runtime's `ExpertParallelExperts` with 2 and 4 processes on loopback.

Each step, every rank brings `--tokens-per-rank` consecutive trace tokens ("sharded" token mode, as
with data-parallel attention) and runs all 32 MoE layers with the trace's experts and gating weights
(expert weights are random, D=64: bytes scale linearly with D x dtype bytes). For each placement and
dedup on/off it records, from the runtime's counters: all-to-all bytes between ranks, units sent,
per-step and whole-trace imbalance (max/mean expert token-slots per rank), seconds in communication
and in expert compute (2 shared CPU cores: not meaningful as speed). The simulator is run on the same
steps and must predict the same bytes and loads exactly.

    .venv/bin/python benchmarks/ep_gloo.py --ranks 2 4 --out benchmarks/results/ep_gloo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch

TRACES = "/work/shared/data/traces/mixtral-8x7b-instruct"
D, I = 64, 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch.distributed as dist

    from moeinfer.model.moe import Routing
    from moeinfer.parallel.config import ExpertParallelConfig
    from moeinfer.parallel.expert_parallel import ExpertParallelExperts
    from moeinfer.parallel.placement import make_placement
    from moeinfer.parallel.profile import read_profile
    from moeinfer.parallel.stats import RankStats, gather_stats

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    prof = read_profile(args["traces"])
    idx, layers = prof.indices, prof.layers  # [N, L, K]
    N, L, K = idx.shape
    tpr = args["tokens_per_rank"]
    T = world * tpr
    steps = -(-N // T)
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(N, L, K, generator=g)
    weights = weights / weights.sum(-1, keepdim=True)
    rows_of = [((torch.arange(T) + s * T) % N)[rank * tpr:(rank + 1) * tpr] for s in range(steps)]
    x_of = [torch.randn(tpr, D, generator=torch.Generator().manual_seed(1000 * s + rank)) for s in range(steps)]
    results = []
    for strategy in args["strategies"]:
        plc = make_placement(strategy, num_ranks=world, num_experts=prof.num_experts, layers=layers,
                             load=prof.load())
        for dedup, overlap in ((True, False), (False, False), (True, True)):
            cfg = ExpertParallelConfig(tokens="sharded", dedup=dedup, overlap=overlap, timeout_s=120)
            stats = RankStats(rank=rank)
            mods = []
            for layer in layers:
                n_local = len(plc.local_experts(layer, rank))
                gu = torch.randn(n_local, 2 * I, D, generator=g) * 0.1
                dn = torch.randn(n_local, D, I, generator=g) * 0.1
                mods.append(ExpertParallelExperts(layer=layer, placement=plc, gate_up_proj=gu, down_proj=dn,
                                                  group=dist.group.WORLD, config=cfg, stats=stats))
            step_imb = []
            dist.barrier()
            t0 = time.perf_counter()
            for s in range(steps):
                before = [st.slots_computed for st in (stats.layer(layer) for layer in layers)]
                for li, mod in enumerate(mods):
                    rows = rows_of[s]
                    mod(x_of[s], Routing(indices=idx[rows, li], weights=weights[rows, li], logits=None))
                after = [stats.layer(layer).slots_computed for layer in layers]
                mine = torch.tensor([a - b for a, b in zip(after, before)], dtype=torch.float)  # [L]
                every = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(every, mine)
                loads = torch.stack(every)  # [W, L]
                step_imb.append(float((loads.max(0).values / loads.mean(0)).mean()))
            wall = time.perf_counter() - t0
            ranks = gather_stats(stats)
            if rank == 0:
                per_layer = torch.tensor([[r.layers[layer].slots_computed for layer in layers] for r in ranks],
                                         dtype=torch.float)  # [W, L]
                tot = [r.total() for r in ranks]
                results.append({
                    "strategy": strategy, "dedup": dedup, "overlap": overlap, "steps": steps,
                    "tokens_per_rank": tpr, "max_experts_per_rank": plc.max_slots(),
                    "bytes_sent": sum(t.bytes_sent for t in tot), "units_sent": sum(t.units_sent for t in tot),
                    "slots": int(per_layer.sum()),
                    "imbalance_step": sum(step_imb) / len(step_imb),
                    "imbalance_total": float((per_layer.max(0).values / per_layer.mean(0)).mean()),
                    "comm_s": [round(t.comm_s, 4) for t in tot], "compute_s": [round(t.compute_s, 4) for t in tot],
                    "wall_s": round(wall, 3),
                    "placement": plc.to_json()})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _simulated(result: dict, world: int, traces: str) -> dict:
    from moeinfer.parallel.placement import Placement
    from moeinfer.parallel.profile import read_profile
    from moeinfer.model.shape import ModelShape
    from moeinfer.parallel.simulator import ClusterProfile, simulate

    prof = read_profile(traces)
    plc = Placement.from_json(result["placement"])
    shape = ModelShape("bench", num_layers=1, num_experts=8, top_k=prof.top_k, hidden=D, inter=I, dtype_bytes=4)
    cluster = ClusterProfile("loopback", ranks_per_node=world, intra_gbps=1.0, inter_gbps=1.0, latency_us=0.0,
                             expert_tflops=1.0)
    sim = simulate(prof.indices, prof.layers, plc, shape=shape, cluster=cluster,
                   tokens_per_rank=result["tokens_per_rank"], dedup=result["dedup"], max_steps=10**6)
    tokens = sim.steps * world * result["tokens_per_rank"] * len(prof.layers)
    return {"bytes_sent": round(sim.bytes_per_token * tokens), "imbalance_step": sim.imbalance,
            "imbalance_total": sim.imbalance_total}


def main() -> int:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens-per-rank", type=int, default=16)
    ap.add_argument("--traces", default=TRACES)
    ap.add_argument("--strategies", nargs="+", default=["contiguous", "round_robin", "balanced", "replicated"])
    ap.add_argument("--out", default="benchmarks/results/ep_gloo.json")
    a = ap.parse_args()
    report = {"device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "python": sys.version.split()[0], "hidden": D, "inner": I,
              "traces": a.traces, "runs": {}}
    for world in a.ranks:
        tmp = Path(a.out).with_suffix(f".rank-results-{world}.json")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        args = {"traces": a.traces, "tokens_per_rank": a.tokens_per_rank, "strategies": a.strategies}
        mp.start_processes(_worker, args=(world, _free_port(), args, str(tmp)), nprocs=world, start_method="spawn")
        results = json.loads(tmp.read_text())
        tmp.unlink()
        for r in results:
            r["simulated"] = _simulated(r, world, a.traces)
            r.pop("placement")
            print(f"W={world} {r['strategy']:<12} dedup={r['dedup']!s:<5} overlap={r['overlap']!s:<5} "
                  f"bytes={r['bytes_sent']:>9} (sim {r['simulated']['bytes_sent']:>9}) "
                  f"imb/step={r['imbalance_step']:.3f} (sim {r['simulated']['imbalance_step']:.3f}) "
                  f"imb/trace={r['imbalance_total']:.3f} comm={sum(r['comm_s']):.2f}s "
                  f"compute={sum(r['compute_s']):.2f}s", flush=True)
        report["runs"][str(world)] = results
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
