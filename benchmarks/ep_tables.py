"""Write the tables of docs/expert-parallel.md: placements on the real Mixtral-8x7B routing traces, the
simulator at 8 / 64 / 256 GPUs, and the gloo measurements of benchmarks/ep_gloo.py.

    .venv/bin/python benchmarks/ep_gloo.py            # measured, 2 and 4 processes (a few minutes)
    .venv/bin/python benchmarks/ep_tables.py          # simulated tables + renders the measured JSON

Each table replaces the text between `<!-- BEGIN name -->` and `<!-- END name -->` in the doc.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from moeinfer.parallel.placement import Placement, imbalance, make_placement
from moeinfer.parallel.profile import RoutingProfile, read_profile
from moeinfer.model.shape import SHAPES
from moeinfer.parallel.simulator import get_cluster, simulate, skew_of, synthetic_trace

TRACES = Path("/work/shared/data/traces/mixtral-8x7b-instruct")
STRATEGIES = ["contiguous", "round_robin", "balanced", "replicated@0", "replicated"]
"""`name@s`: strategy `name` with smoothing s instead of the default."""


def _plc(strategy: str, prof: RoutingProfile, W: int, slots: int | None = None) -> Placement:
    name, _, smooth = strategy.partition("@")
    kw = {"smoothing": float(smooth)} if smooth else {}
    return make_placement(name, num_ranks=W, num_experts=prof.num_experts, layers=prof.layers,
                          load=prof.load(), slots_per_rank=slots, **kw)


def _trace_imbalance(plc: Placement, prof: RoutingProfile) -> float:
    load = prof.load()
    return sum(imbalance(plc.rank_load(layer, load[i])) for i, layer in enumerate(prof.layers)) / len(prof.layers)


def _halves(prof: RoutingProfile) -> tuple[RoutingProfile, RoutingProfile]:
    n = prof.num_tokens // 2
    return prof.select(slice(0, n)), prof.select(slice(n, None))


def placement_table(both: RoutingProfile, tasks: list[RoutingProfile]) -> str:
    """Placements on real traces: whole-trace and per-step imbalance, fitted and held out.
    `tasks` are two traces of different workloads; `both` is their union."""
    t1, t2 = tasks
    shape, cluster = SHAPES["mixtral-8x7b"], get_cluster("h100-nvlink-ib400")
    rows = ["| ranks | placement | experts/rank | whole trace, fitted on it | same task, held-out half "
            "| other task | per step 16 tok/rank, held-out half | per step 64 tok/rank, held-out half "
            "| a2a units saved by dedup |",
            "|---|---|---|---|---|---|---|---|---|"]
    for W in (2, 4, 8):
        for strategy in STRATEGIES:
            fit = _plc(strategy, both, W)
            same = [(_plc(strategy, a, W), b) for a, b in (_halves(t1), _halves(t2))]
            other = [(_plc(strategy, t1, W), t2), (_plc(strategy, t2, W), t1)]
            same_imb = sum(_trace_imbalance(p, test) for p, test in same) / 2
            other_imb = sum(_trace_imbalance(p, test) for p, test in other) / 2

            def step(tpr: int, dedup: bool = True, same=same) -> tuple[float, float]:
                rs = [simulate(test.indices, test.layers, p, shape=shape, cluster=cluster, tokens_per_rank=tpr,
                               dedup=dedup, max_steps=10**6) for p, test in same]
                return sum(r.imbalance for r in rs) / 2, sum(r.units_per_token for r in rs) / 2

            s16, u_dedup = step(16)
            s64, _ = step(64)
            _, u_plain = step(16, dedup=False)
            saved = 1 - u_dedup / u_plain if u_plain else 0.0
            rows.append(f"| {W} | {strategy} | {fit.max_slots()} | {_trace_imbalance(fit, both):.3f} | "
                        f"{same_imb:.3f} | {other_imb:.3f} | {s16:.3f} | {s64:.3f} | {100 * saved:.1f}% |")
    return "\n".join(rows)


def mixtral_table() -> str:
    return placement_table(read_profile(TRACES), [read_profile(TRACES / "humaneval_2_routing.jsonl"),
                                                  read_profile(TRACES / "gsm8k_2_routing.jsonl")])


def tiny_profiles(prompts: int = 32, prompt_tokens: int = 64, new_tokens: int = 16) -> list[RoutingProfile] | None:
    """Routing of the shipped reference model (moeinfer.load("tiny")) on English and Python text."""
    import moeinfer
    from moeinfer.engine.generate import generate
    from moeinfer.traces.trace import record_routing
    from moeinfer.models import shipped_model_dir
    from moeinfer.parallel.profile import from_trace

    if shipped_model_dir("tiny") is None:
        return None
    model = moeinfer.load("tiny", dtype="float32", progress=False)
    data = Path(moeinfer.__file__).parent / "eval" / "data"
    profiles = []
    for kind in ("english", "python"):
        ids = model.tokenizer.encode((data / f"{kind}.txt").read_text()[:300_000])
        stride = len(ids) // prompts
        batch = [ids[i * stride:i * stride + prompt_tokens] for i in range(prompts)]
        with record_routing(model, logits=False) as rec:
            for i in range(0, prompts, 8):
                generate(model, batch[i:i + 8], max_new_tokens=new_tokens, ignore_eos=True)
        profiles.append(from_trace(rec.trace(), source=kind))
    return profiles


def tiny_table() -> str:
    profiles = tiny_profiles()
    if profiles is None:
        return "(the shipped model `tiny` is not available in this checkout)"
    both = RoutingProfile(profiles[0].num_experts, profiles[0].layers,
                          torch.cat([p.indices for p in profiles]), source="english+python")
    head = (f"moeinfer-tiny ({len(both.layers)} MoE layers, {both.num_experts} experts, top-{both.top_k}), 32 prompts "
            f"x (64 prompt + 16 generated) tokens from each of English and Python text ({profiles[0].num_tokens} + "
            f"{profiles[1].num_tokens} tokens); tasks = English, Python.\n\n")
    return head + placement_table(both, profiles)


def scale_table() -> str:
    """The simulator at 8 / 64 / 256 GPUs (8 per node, H100 + 400 Gb/s profile)."""
    cluster = get_cluster("h100-nvlink-ib400")
    mix = read_profile(TRACES)
    sigma = skew_of(mix.load())
    rows = ["| model, routing | GPUs | placement | experts/GPU | imbalance/step | KiB/token/layer | inter-node "
            "| a2a µs | experts µs | layer µs | layer µs, TBO | dedup saves |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cases = [("mixtral-8x7b", "real trace", mix, mix),
             ("deepseek-v3", f"synthetic σ={sigma:.2f} (Mixtral's skew)", None, sigma),
             ("deepseek-v3", "synthetic σ=1.0 (skewed)", None, 1.0)]
    for name, label, prof, skew in cases:
        shape = SHAPES[name]
        if prof is None:
            idx = synthetic_trace(num_tokens=2 * 16384, num_layers=3, num_experts=shape.num_experts,
                                  top_k=shape.top_k, skew=float(skew), seed=1)
            train = RoutingProfile(shape.num_experts, [0, 1, 2], idx[:16384])
            test = RoutingProfile(shape.num_experts, [0, 1, 2], idx[16384:])
        else:
            train = test = prof
        for W in (8, 64, 256):
            for strategy in (["contiguous", "replicated"] if name == "mixtral-8x7b"
                             else ["contiguous", "balanced", "replicated"]):
                plc = _plc(strategy, train, W)
                tpr = 128
                kw = dict(shape=shape, cluster=cluster, tokens_per_rank=tpr, max_steps=2)
                r = simulate(test.indices, test.layers, plc, dedup=True, **kw)
                plain = simulate(test.indices, test.layers, plc, dedup=False, **kw)
                saved = 1 - r.bytes_per_token / plain.bytes_per_token if plain.bytes_per_token else 0.0
                rows.append(f"| {name}, {label} | {W} | {strategy} | {plc.max_slots()} | {r.imbalance:.2f} | "
                            f"{r.bytes_per_token / 1024:.1f} | {100 * r.inter_fraction:.0f}% | {r.a2a_us:.0f} | "
                            f"{r.expert_us:.0f} | {r.step_us:.0f} | {r.step_overlap_us:.0f} | {100 * saved:.1f}% |")
    return "\n".join(rows)


def gloo_table(path: Path) -> str:
    if not path.is_file():
        return f"(run benchmarks/ep_gloo.py to produce {path})"
    rep = json.loads(path.read_text())
    D, K = rep["hidden"], 2
    rows = [f"Measured {', '.join(rep['runs'])} gloo processes on {rep['cpus']} shared CPU cores, torch "
            f"{rep['torch']}; D={D} fp32 activations (bytes scale with D x dtype size). "
            "`sim` = the simulator's prediction for the same steps.", "",
            "| ranks | placement | dedup | overlap | a2a MiB measured (sim) | remote units | imbalance/step (sim) "
            "| imbalance, whole trace | comm s | expert s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for W, runs in rep["runs"].items():
        for r in runs:
            units = r["bytes_sent"] / (2 * D * 4 + K * 8)
            rows.append(f"| {W} | {r['strategy']} | {r['dedup']} | {r['overlap']} | {r['bytes_sent'] / 2**20:.2f} "
                        f"({r['simulated']['bytes_sent'] / 2**20:.2f}) | {units:.0f} | {r['imbalance_step']:.3f} "
                        f"({r['simulated']['imbalance_step']:.3f}) | {r['imbalance_total']:.3f} | "
                        f"{sum(r['comm_s']):.2f} | {sum(r['compute_s']):.2f} |")
    return "\n".join(rows)


def write_section(doc: Path, name: str, body: str) -> None:
    text = doc.read_text()
    pattern = re.compile(rf"(<!-- BEGIN {name} -->).*?(<!-- END {name} -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{doc} has no <!-- BEGIN {name} --> ... <!-- END {name} --> markers")
    doc.write_text(pattern.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(2), text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", default="docs/expert-parallel.md")
    ap.add_argument("--gloo", default="benchmarks/results/ep_gloo.json")
    ap.add_argument("--only", nargs="*", default=None, help="write only these sections (mixtral tiny scale gloo)")
    a = ap.parse_args()
    torch.manual_seed(0)
    sections = {"mixtral": mixtral_table, "tiny": tiny_table, "scale": scale_table,
                "gloo": lambda: gloo_table(Path(a.gloo))}
    for name, make in sections.items():
        if a.only and name not in a.only:
            continue
        body = make()
        print(f"## {name}\n{body}\n")
        write_section(Path(a.doc), name, body)
    print(f"updated {a.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
