"""benchmarks/bench_planner.py --real-shape: the separate prefill forward (after the rounds, priced on the
rows it replays), quantized plans when the model fits whole, the budgets at which the issue's baselines
differ, and the stand-in quality model. Nothing here times anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_planner as bp  # noqa: E402


def test_prefill_tokens_and_float_only_options(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEINFER_MIXTRAL_TRACES", str(tmp_path))
    a = bp.parse_args(["--real-shape", "mixtral"])
    assert (a.prefill_tokens, a.float_only) == (None, False)  # main: the trace's mean sequence length
    b = bp.parse_args(["--real-shape", "mixtral", "--prefill-tokens", "0", "--float-only"])
    assert (b.prefill_tokens, b.float_only) == (0, True)


def test_the_prefill_forward_is_as_long_as_the_priced_sequences_mean():
    """The plans' prefill predictions price each of the trace's first sequences (those the planner keeps)
    in one forward; the default separate forward has their mean length, whose predicted tokens/s equals
    theirs (the plan's own
    prediction against the cost model's for that one forward: toy rates, one bf16 layer of the shipped
    model resident)."""
    from plan_helpers import synthetic_profile

    from moeinfer.planning import Plan
    from moeinfer.planning import routing as routes
    from moeinfer.planning.costs import simulate_plan
    from moeinfer.planning.sizes import sizes_from_checkpoint

    import numpy as np

    trace = routes.uniform(num_layers=4, num_experts=8, top_k=2, sequences=3, tokens=40, seed=1)
    assert bp.prefill_length(trace) == 40
    # sequences of 30, 50 and 40 tokens (a trace's rows need not come sorted by sequence)
    wide = routes.uniform(num_layers=4, num_experts=8, top_k=2, sequences=3, tokens=50, seed=1)
    uneven = routes.subset(wide, np.nonzero(wide.pos < np.array([30, 50, 40])[wide.seq])[0])
    assert np.unique(uneven.seq, return_counts=True)[1].tolist() == [30, 50, 40]
    assert bp.prefill_length(uneven) == 40
    # the real Mixtral trace's four sequences (166, 78, 81, 252 tokens): the planner prices the first two
    # (MAX_SIM_TOKENS = 256), so the forward has their mean, 122 tokens, not the four's 144
    big = routes.uniform(num_layers=4, num_experts=8, top_k=2, sequences=4, tokens=252, seed=2)
    mixtral_like = routes.subset(big, np.nonzero(big.pos < np.array([166, 78, 81, 252])[big.seq])[0])
    assert np.unique(mixtral_like.seq, return_counts=True)[1].tolist() == [166, 78, 81, 252]
    assert bp.prefill_length(mixtral_like) == 122
    plan = Plan(model="tiny", device="cpu", budget_bytes=10**9, objective="latency", precisions=("bf16",) * 4,
                kernel="reference")
    sizes, profile = sizes_from_checkpoint("tiny"), synthetic_profile()
    whole = simulate_plan(routes.prefill(trace), sizes, profile, plan.precisions, kernel="reference")
    one = bp.replayed_prediction(plan, "tiny", trace, profile, rounds=1, tokens=2,
                                 prefill_tokens=bp.prefill_length(trace))
    assert one["prefill_tok_s"] == pytest.approx(whole.tokens_per_s, rel=0.05)


@pytest.mark.parametrize("argv", [["--prefill-tokens", "8"], ["--float-only"],
                                  ["--real-shape", "mixtral", "--prefill-tokens", "-1"]])
def test_real_shape_only_options_are_refused_elsewhere(argv, capsys):
    with pytest.raises(SystemExit):
        bp.parse_args(argv)
    assert "--prefill-tokens" in capsys.readouterr().err


def test_separate_prefill_runs_after_the_rounds_and_replaces_their_prefill():
    order: list[str] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def round(self, tokens: int) -> dict[str, float]:
            order.append(f"round {self.name}")
            return {"decode_tok_s": 5.0, "prefill_tok_s": 1.0, "fastest_decode_step_tok_s": 6.0}

        def settle(self) -> None:
            order.append(f"settle {self.name}")

        def prefill(self, prompt: list[int]) -> float:
            order.append(f"prefill {self.name} {len(prompt)}")
            return 40.0 if self.name == "a" else 30.0

        def runs_as(self) -> str:
            return self.name

        def close(self) -> None:
            order.append(f"close {self.name}")

    got = bp.time_configs({"a": "a", "b": "b"}, Fake, rounds=2, tokens=4, interleave=False, prefill_prompt=[1] * 7)
    # the prefill forward right after the configuration's own untimed decode steps (settle)
    assert order == ["settle a", "round a", "settle a", "round a", "settle a", "prefill a 7", "close a",
                     "settle b", "round b", "settle b", "round b", "settle b", "prefill b 7", "close b"]
    assert (got["a"]["prefill_tok_s"], got["b"]["prefill_tok_s"]) == (40.0, 30.0)
    assert got["a"]["prefill_separate_forward"] and got["a"]["decode_tok_s"] == 5.0
    order.clear()
    plain = bp.time_configs({"a": "a"}, Fake, rounds=1, tokens=4, interleave=False)
    assert order == ["settle a", "round a", "close a"] and plain["a"]["prefill_tok_s"] == 1.0
    assert "prefill_separate_forward" not in plain["a"]
    with pytest.raises(ValueError, match="interleave"):
        bp.time_configs({"a": "a"}, Fake, rounds=1, tokens=4, interleave=True, prefill_prompt=[1])


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_prefill_forward_is_priced_on_the_rows_it_replays(tmp_path, policy):
    """The separate prefill forward replays the trace's first rows with the cache the rounds and the settling
    generation left, and puts the replay cursor back; the cost model's prefill for those rows sees the live
    cache's hits and misses."""
    import moeinfer
    from plan_helpers import synthetic_profile

    from moeinfer.planning import Plan, PlanOffload
    from moeinfer.planning import routing as routes

    trace = routes.uniform(num_layers=4, num_experts=8, top_k=2, sequences=2, tokens=12, seed=3)
    plan = Plan(model="tiny", device="cpu", budget_bytes=10**9, objective="latency", precisions=("bf16",) * 4,
                offload=PlanOffload(tier="disk", cache_experts=12, policy=policy), kernel="reference")
    cleaned: list[bool] = []
    run = bp.Runner(lambda: moeinfer.apply_plan_(moeinfer.load("tiny", progress=False), plan, offload_dir=tmp_path),
                    plan, [1] * bp.REAL_PROMPT_TOKENS, trace=trace, cleanup=lambda: cleaned.append(True))
    try:
        for _ in range(2):
            run.settle()
            run.round(4)
        run.settle()  # as the benchmark runs it before the prefill forward
        assert run.cursor.next == (bp.WARM_UP_TOKENS + 3 * bp.SETTLE_TOKENS + 2 * 4) % 24
        at = run.cursor.next
        cache = run.model.offload.cache
        before = (cache.stats.hits, cache.stats.misses)
        tok_s = run.prefill([5] * 6)
        hits, misses = cache.stats.hits - before[0], cache.stats.misses - before[1]
        assert run.cursor.next == at  # later forwards continue where the rounds stopped
        assert run.cursor.rows.tolist() == list(range(6))  # the prefill forward replayed rows 0..5
    finally:
        run.close()
    assert cleaned == [True]
    got = bp.replayed_prediction(plan, "tiny", trace, synthetic_profile(), rounds=2, tokens=4, prefill_tokens=6)
    assert got["prefill_hit_rate"] == pytest.approx(hits / (hits + misses), abs=1e-12)
    assert 0 < got["prefill_hit_rate"] < 1 and got["prefill_tok_s"] > 0 and tok_s > 0
    assert "prefill_tok_s" not in bp.replayed_prediction(plan, "tiny", trace, synthetic_profile(), rounds=2, tokens=4)
    # the rows are simulated at the machine's probed speeds as the plan's own predictions are: an offloaded
    # plan's compute at them, its loads' transfers not (moeinfer.planning.costs.simulate_plan)
    fast = bp.replayed_prediction(plan, "tiny", trace, synthetic_profile(), rounds=2, tokens=4, prefill_tokens=6,
                                  speed=1.5, decode_speed=0.8)
    assert 0.8 * got["decode_tok_s"] < fast["decode_tok_s"] < got["decode_tok_s"]
    assert got["prefill_tok_s"] < fast["prefill_tok_s"] < 1.5 * got["prefill_tok_s"]
    assert fast["hit_rate"] == got["hit_rate"]
    assert fast["prefill_hit_rate"] == got["prefill_hit_rate"]


def test_real_shape_budgets_separate_the_baselines():
    """Quantized plans allowed: below uniform int4 only the --fit-like rule fits; then uniform int4 fits
    (the default not); then the default fits too. Float only: the three offloaded budgets as before."""
    budgets = bp.default_budgets("tiny", real_shape=True)
    kinds = [set(bp.baselines("tiny", b)) for b in budgets]
    assert kinds == [{"fit-rule"}, {"fit-rule", "uniform-int4"}, {"default", "uniform-int4"}]
    float_only = bp.default_budgets("tiny", real_shape=True, quantized=False)
    assert all(set(bp.baselines("tiny", b, quantized=False)) == {"fit-rule"} for b in float_only)


def test_a_baseline_that_is_the_chosen_plan_is_measured_once():
    from moeinfer.planning import Plan, PlanOffload

    common = dict(model="m", device="cpu", budget_bytes=10**9, objective="latency")
    int4 = Plan(precisions=("int4",) * 2, kernel="auto", **common)
    off = Plan(precisions=("int4",) * 2, kernel="auto", offload=PlanOffload(tier="disk", cache_experts=4), **common)
    off_lru = Plan(precisions=("int4",) * 2, kernel="auto",
                   offload=PlanOffload(tier="disk", cache_experts=4, policy="lfu"), **common)
    measured, same = bp.distinct_configs({"#1": int4, "#2": off, "#3": off_lru, "uniform-int4": int4})
    assert list(measured) == ["#1", "#2", "#3"] and same == {"uniform-int4": "#1"}
    assert bp.distinct_configs({"#1": int4, "#2": off}) == ({"#1": int4, "#2": off}, {})
