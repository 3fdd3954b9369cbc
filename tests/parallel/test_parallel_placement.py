"""Placement strategies, placement files, routing profiles and the expert-parallel simulator (one process)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeinfer.cli import main
from moeinfer.parallel.placement import STRATEGIES, Placement, PlacementError, imbalance, make_placement
from moeinfer.parallel.profile import ProfileError, RoutingProfile, read_profile
from moeinfer.model.shape import SHAPES
from moeinfer.parallel.simulator import CLUSTERS, get_cluster, simulate, synthetic_trace

SKEWED = [[float(v) for v in (40, 1, 1, 30, 2, 2, 20, 4, 1, 3)]]  # one layer, 10 experts


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("ranks,experts", [(2, 8), (4, 6), (3, 10), (4, 4), (1, 5)])
def test_every_expert_placed_and_memory_bounded(strategy, ranks, experts):
    load = [[float((e * 7) % 5 + 1) for e in range(experts)]]
    plc = make_placement(strategy, num_ranks=ranks, num_experts=experts, layers=[3], load=load)
    per_rank = plc.experts_per_rank(3)
    assert all(plc.layers[3][e] for e in range(experts))
    bound = math.ceil(experts / ranks) + (1 if strategy == "replicated" else 0)
    assert max(per_rank) <= bound
    assert sorted(e for r in range(ranks) for e in plc.local_experts(3, r)) == sorted(
        e for e, reps in enumerate(plc.layers[3]) for _ in reps)


def test_contiguous_and_round_robin_layouts():
    assert make_placement("contiguous", num_ranks=4, num_experts=6, layers=[0]).layers[0] == (
        (0,), (0,), (1,), (2,), (2,), (3,))
    assert make_placement("round_robin", num_ranks=4, num_experts=6, layers=[0]).layers[0] == (
        (0,), (1,), (2,), (3,), (0,), (1,))


def test_balanced_then_replicated_lower_imbalance():
    def imb(strategy: str, **kw) -> float:
        plc = make_placement(strategy, num_ranks=4, num_experts=10, layers=[0], load=SKEWED, **kw)
        return imbalance(plc.rank_load(0, SKEWED[0]))

    contiguous, balanced, replicated = imb("contiguous"), imb("balanced"), imb("replicated", slots_per_rank=4)
    assert balanced < contiguous
    assert replicated < balanced
    # the hottest expert got replicas
    plc = make_placement("replicated", num_ranks=4, num_experts=10, layers=[0], load=SKEWED, slots_per_rank=4)
    assert len(plc.layers[0][0]) >= 2


def test_strategy_errors_are_clear():
    with pytest.raises(ValueError, match="valid: balanced, contiguous, replicated, round_robin"):
        make_placement("zigzag", num_ranks=2, num_experts=4, layers=[0])
    with pytest.raises(PlacementError, match="needs a routing profile"):
        make_placement("balanced", num_ranks=2, num_experts=4, layers=[0])
    with pytest.raises(PlacementError, match="slots_per_rank=1 is below"):
        make_placement("replicated", num_ranks=2, num_experts=4, layers=[0], load=[[1.0] * 4], slots_per_rank=1)
    with pytest.raises(PlacementError, match="expert 1 has no replica"):
        Placement(num_ranks=2, num_experts=2, layers={0: ((0,), ())})
    with pytest.raises(PlacementError, match="two replicas on one rank"):
        Placement(num_ranks=2, num_experts=2, layers={0: ((0, 0), (1,))})
    plc = make_placement("contiguous", num_ranks=2, num_experts=4, layers=[0, 1])
    with pytest.raises(PlacementError, match="process group has 4"):
        plc.check(num_ranks=4, num_experts=4, layers=[0, 1])
    with pytest.raises(PlacementError, match=r"no entry for MoE layer\(s\) \[2\]"):
        plc.check(num_ranks=2, num_experts=4, layers=[0, 1, 2])


def test_placement_file_round_trip_and_errors(tmp_path):
    plc = make_placement("replicated", num_ranks=3, num_experts=10, layers=[1], load=SKEWED, info={"x": 1})
    path = plc.save(tmp_path / "p.json")
    assert Placement.load(path) == plc
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlacementError, match="bad.json is not valid JSON"):
        Placement.load(tmp_path / "bad.json")
    (tmp_path / "v9.json").write_text(json.dumps({**plc.to_json(), "version": 9}))
    with pytest.raises(PlacementError, match="version 9"):
        Placement.load(tmp_path / "v9.json")
    with pytest.raises(PlacementError, match="does not exist"):
        Placement.load(tmp_path / "none.json")


def test_profile_from_json_and_moeinfer_trace(tmp_path):
    idx = torch.tensor([[[0, 1], [2, -1]], [[0, 3], [2, 1]]])  # [T=2, L=2, K=2], -1 unused
    prof = RoutingProfile(4, [1, 3], idx, source="t")
    assert prof.load().tolist() == [[2, 1, 0, 1], [0, 1, 2, 0]]
    prof.save(tmp_path / "p.json")
    again = read_profile(tmp_path / "p.json")
    assert torch.equal(again.indices, idx) and again.layers == [1, 3]
    with pytest.raises(ProfileError, match="does not exist"):
        read_profile(tmp_path / "missing.json")
    from moeinfer.traces.trace import RoutingTrace  # the project's own module: never skipped

    n = idx.shape[0]
    trace = RoutingTrace(experts=idx.numpy(), weights=torch.ones(2, 2, 2).numpy(), seq=[0] * n,
                                   pos=list(range(n)), is_prompt=[False] * n, layers=[1, 3], num_experts=4)
    trace.save(tmp_path / "t.npz")
    assert read_profile(tmp_path / "t.npz").load().tolist() == prof.load().tolist()


def test_mixtral_jsonl_keeps_complete_tokens(tmp_path):
    lines = [{"dataset": "d", "problem_id": 0, "layer": layer, "experts": [layer % 7, 7], "gating_probs": [0.6, 0.4],
              "token_idx": t} for t in range(3) for layer in range(32) if not (t == 2 and layer == 5)]
    path = tmp_path / "x_routing.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines))
    prof = read_profile(path)
    assert prof.indices.shape == (2, 32, 2) and prof.num_experts == 8


def test_placement_cli_writes_a_loadable_file(tmp_path, capsys):
    prof = RoutingProfile(10, [0, 1], torch.randint(0, 10, (50, 2, 2), generator=torch.Generator().manual_seed(0)))
    prof.save(tmp_path / "prof.json")
    out = tmp_path / "plc.json"
    assert main(["placement", "--trace", str(tmp_path / "prof.json"), "--ranks", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "replicated" in text and "contiguous" in text
    plc = Placement.load(out)
    assert plc.strategy == "replicated" and plc.num_ranks == 4 and sorted(plc.layers) == [0, 1]
    assert main(["placement", "--trace", str(tmp_path / "prof.json"), "--ranks", "16", "--simulate",
                 "--shape", "qwen3-30b-a3b", "--tokens-per-rank", "8"]) == 1  # 10 experts vs the shape's 128
    assert main(["placement", "--trace", str(tmp_path / "prof.json"), "--ranks", "16", "--simulate",
                 "--tokens-per-rank", "8"]) == 0
    assert "simulated on h100-nvlink-ib400" in capsys.readouterr().out
    assert main(["placement", "--trace", str(tmp_path / "prof.json"), "--ranks", "2", "-s", "nope"]) == 1
    assert "valid: balanced" in capsys.readouterr().err


def test_simulator_dedup_and_replication():
    idx = synthetic_trace(num_tokens=512, num_layers=2, num_experts=16, top_k=4, skew=1.0)
    prof = RoutingProfile(16, [0, 1], idx)
    from dataclasses import replace

    shape, cluster = replace(SHAPES["qwen3-30b-a3b"], num_experts=16, top_k=4), get_cluster("h100-nvlink-ib400")
    res = {}
    for strategy in ("contiguous", "replicated"):
        plc = make_placement(strategy, num_ranks=4, num_experts=16, layers=[0, 1], load=prof.load())
        for dedup in (True, False):
            res[strategy, dedup] = simulate(idx, [0, 1], plc, shape=shape, cluster=cluster, tokens_per_rank=32,
                                            dedup=dedup)
    assert res["contiguous", True].bytes_per_token < res["contiguous", False].bytes_per_token
    assert res["replicated", True].imbalance_total < res["contiguous", True].imbalance_total
    assert res["contiguous", True].inter_fraction == 0.0  # 4 ranks fit in one 8-GPU node
    with pytest.raises(ValueError, match="valid: "):
        get_cluster("tpu")
    with pytest.raises(ValueError, match="has 128 experts, top-8; the placement has 16 experts"):
        simulate(idx, [0, 1], plc, shape=SHAPES["qwen3-30b-a3b"], cluster=cluster, tokens_per_rank=32)
    assert "h100-nvlink-ib400" in CLUSTERS


def test_memory_budget_sets_slots(tmp_path, capsys):
    from hf_peers import save_hf_checkpoint
    from moeinfer.parallel.placement import slots_for_budget

    assert slots_for_budget(10 * 2**20, expert_bytes=2**20, num_layers=3) == 3
    with pytest.raises(PlacementError, match="holds no expert"):
        slots_for_budget(2**20, expert_bytes=2**20, num_layers=3)
    ckpt = tmp_path / "ckpt"
    save_hf_checkpoint("mixtral", ckpt)  # 2 MoE layers, 8 experts, D=40, I=24
    prof = RoutingProfile(8, [0, 1], torch.randint(0, 8, (64, 2, 2), generator=torch.Generator().manual_seed(1)))
    prof.save(tmp_path / "prof.json")
    expert = 3 * 40 * 24 * 2
    out = tmp_path / "plc.json"
    assert main(["placement", "--trace", str(tmp_path / "prof.json"), "--ranks", "4", "--model", str(ckpt),
                 "--budget-gib", str(3 * 2 * expert / 2**30), "--out", str(out)]) == 0
    assert "3 expert(s) per rank" in capsys.readouterr().out
    assert Placement.load(out).max_slots() == 3
    assert main(["placement", "--trace", str(tmp_path / "prof.json"), "--ranks", "4", "--budget-gib", "1"]) == 1
    assert "needs --model" in capsys.readouterr().err


def test_smoothing_shrinks_toward_uniform():
    load = [[100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    exact = make_placement("replicated", num_ranks=4, num_experts=8, layers=[0], load=load, smoothing=0.0)
    flat = make_placement("replicated", num_ranks=4, num_experts=8, layers=[0], load=load, smoothing=1.0)
    assert len(exact.layers[0][0]) == 4  # the hot expert gets every extra slot it can use
    assert len(flat.layers[0][0]) < 4  # uniform: extra slots spread
    assert exact.info["smoothing"] == 0.0
    with pytest.raises(PlacementError, match=r"smoothing must be in \[0, 1\]"):
        make_placement("replicated", num_ranks=4, num_experts=8, layers=[0], load=load, smoothing=1.5)
