"""benchmarks/bench_planner.py: its options (the shipped model interleaved; --real-shape measured in a
row with its own defaults and trace folder) and the median-round statistic. Nothing here times anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_planner as bp  # noqa: E402


def test_shipped_model_defaults_interleave_the_configurations():
    a = bp.parse_args([])
    assert (a.model, a.real_shape, a.tokens, a.rounds, a.runners, a.interleave) == ("tiny", None, 32, 21, 3, True)
    assert a.traces is None
    assert bp.parse_args(["--no-interleave", "--rounds", "4"]).interleave is False


def test_real_shape_defaults_and_trace_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEINFER_MIXTRAL_TRACES", str(tmp_path))
    a = bp.parse_args(["--real-shape", "mixtral"])
    assert (a.real_shape, a.layers, a.tokens, a.rounds, a.runners, a.interleave) == ("mixtral", 2, 8, 3, 1, False)
    assert a.traces == tmp_path
    monkeypatch.delenv("MOEINFER_MIXTRAL_TRACES")
    b = bp.parse_args(["--real-shape", "mixtral", "--tokens", "16", "--layers", "1"])
    assert b.tokens == 16 and b.layers == 1
    assert b.traces == ROOT.parent / "shared" / "data" / "traces" / "mixtral-8x7b-instruct"


@pytest.mark.parametrize("argv", [["--real-shape", "gpt2"], ["--tokens", "1"], ["--rounds", "0"],
                                  ["--real-shape", "mixtral", "--layers", "0"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bp.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_missing_trace_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(bp, "REAL_DIR", tmp_path)
    (tmp_path / "mixtral-8x7b-2l").mkdir()
    (tmp_path / "mixtral-8x7b-2l" / "config.json").write_text("{}")  # present: not built
    with pytest.raises(SystemExit, match="humaneval_2_routing.jsonl"):
        bp.real_shape_model("mixtral", layers=2, traces=tmp_path / "none")


def test_the_median_round_is_reported_and_the_best_beside_it():
    rounds = [{"decode_tok_s": 10.0, "prefill_tok_s": 100.0, "fastest_decode_step_tok_s": 12.0, "hit_rate": 0.5},
              {"decode_tok_s": 30.0, "prefill_tok_s": 90.0, "fastest_decode_step_tok_s": 40.0, "hit_rate": 0.7},
              {"decode_tok_s": 20.0, "prefill_tok_s": 80.0, "fastest_decode_step_tok_s": 25.0, "hit_rate": 0.6}]
    s = bp.summarize(rounds)
    assert (s["decode_tok_s"], s["decode_tok_s_best_round"]) == (20.0, 30.0)
    assert (s["prefill_tok_s"], s["prefill_tok_s_best_round"]) == (90.0, 100.0)
    assert s["decode_best_step_tok_s"] == 40.0 and s["hit_rate"] == pytest.approx(0.6)


def test_interleaved_rounds_rotate_the_starting_configuration():
    order: list[str] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def settle(self) -> None:
            pass

        def round(self, tokens: int) -> dict[str, float]:
            order.append(self.name)
            return {"decode_tok_s": 1.0, "prefill_tok_s": 1.0, "fastest_decode_step_tok_s": 1.0}

        def close(self) -> None:
            order.append(f"close {self.name}")

        def runs_as(self) -> str:
            return self.name

    got = bp.time_configs({"a": "a", "b": "b", "c": "c"}, Fake, rounds=3, tokens=4, interleave=True)
    assert order[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert sorted(order[9:]) == ["close a", "close b", "close c"]
    assert set(got) == {"a", "b", "c"} and len(got["a"]["rounds"]) == 3 and got["b"]["runs_as"] == "b"
    order.clear()
    bp.time_configs({"a": "a", "b": "b"}, Fake, rounds=2, tokens=4, interleave=False)
    assert order == ["a", "a", "close a", "b", "b", "close b"]


def test_plans_that_load_into_the_same_model_are_recognised():
    """'kernel auto' resolves to the kernel it picks: a plan naming that kernel runs the same model (their
    measured ratio is noise); another precision does not."""
    import moeinfer
    from moeinfer.planning import Plan

    def runner(kernel: str, precision: str) -> bp.Runner:
        plan = Plan(model="tiny", device="cpu", budget_bytes=10**9, objective="latency", precisions=(precision,) * 4,
                    kernel=kernel)
        return bp.Runner(lambda: moeinfer.apply_plan_(moeinfer.load("tiny", progress=False), plan), plan, [1, 2])

    auto = runner("auto", "bf16")
    try:
        picked = auto.model.moe_blocks()[0].experts.kernel  # "cpu" where the native kernels are built
        assert picked != "auto"
        signature = auto.runs_as()
    finally:
        auto.close()
    for kernel, precision, same in ((picked, "bf16", True), ("auto", "int4", False)):
        other = runner(kernel, precision)
        try:
            assert (other.runs_as() == signature) is same, (kernel, precision)
        finally:
            other.close()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_replayed_prediction_has_the_live_rounds_hit_rate(tmp_path, policy):
    """--real-shape: the cost model on the rows the rounds replayed, each after its untimed settling rows,
    sees the live cache's hits (the shipped model, offloaded, a random routing replayed with a one-token
    prompt as the benchmark does)."""
    import moeinfer
    from plan_helpers import synthetic_profile

    from moeinfer.planning import Plan, PlanOffload
    from moeinfer.planning import routing as routes

    trace = routes.uniform(num_layers=4, num_experts=8, top_k=2, sequences=2, tokens=12)
    plan = Plan(model="tiny", device="cpu", budget_bytes=10**9, objective="latency", precisions=("bf16",) * 4,
                offload=PlanOffload(tier="disk", cache_experts=16, policy=policy), kernel="reference")
    run = bp.Runner(lambda: moeinfer.apply_plan_(moeinfer.load("tiny", progress=False), plan, offload_dir=tmp_path),
                    plan, [1] * bp.REAL_PROMPT_TOKENS, trace=trace)
    try:
        live = [(run.settle(), run.round(5))[1] for _ in range(3)]  # as time_configs runs them
    finally:
        run.close()
    got = bp.replayed_prediction(plan, "tiny", trace, synthetic_profile(), rounds=3, tokens=5)
    assert got["hit_rate"] == pytest.approx(sum(r["hit_rate"] for r in live) / 3, abs=1e-12)
    assert 0 < got["hit_rate"] < 1 and got["decode_tok_s"] > 0


def test_a_probe_beside_every_round_takes_the_machines_drift_out():
    """Step 6: the probe runs right before each round (and the separate prefill forward); a figure at
    the profile's speed is the median over rounds of the round's figure over its probe's speed, so a
    machine that halves its speed for some rounds leaves it unchanged."""
    order: list[str] = []
    speeds = iter([1.0, 0.5, 1.0, 0.5, 0.5, 2.0])

    def probe() -> dict[str, float]:
        order.append("probe")
        s = next(speeds)
        return {"probe_decode_speed": s, "probe_prompt_speed": 2 * s}

    class Fake:
        def __init__(self, name: str) -> None:
            self.name, self.i = name, 0

        def round(self, tokens: int) -> dict[str, float]:
            order.append(self.name)
            s = [1.0, 0.5, 1.0][self.i] if self.name == "a" else [0.5, 0.5, 2.0][self.i]
            self.i += 1
            return {"decode_tok_s": 100.0 * s, "prefill_tok_s": 1000.0 * s, "fastest_decode_step_tok_s": 1.0}

        def settle(self) -> None:
            order.append(f"settle {self.name}")

        def prefill(self, prompt: list[int]) -> float:
            order.append(f"prefill {self.name}")
            return 500.0

        def close(self) -> None:
            pass

        def runs_as(self) -> str:
            return self.name

    got = bp.time_configs({"a": "a", "b": "b"}, Fake, rounds=3, tokens=4, interleave=False, probe=probe)
    assert order == ["probe", "settle a", "a"] * 3 + ["probe", "settle b", "b"] * 3
    for n in ("a", "b"):
        assert got[n]["decode_tok_s_at_profile_speed"] == pytest.approx(100.0)
        assert got[n]["prefill_tok_s_at_profile_speed"] == pytest.approx(500.0)
    assert got["a"]["decode_tok_s"] == 100.0 and got["b"]["decode_tok_s"] == 50.0  # the plain medians stay
    order.clear()
    speeds = iter([1.0, 0.5, 0.25])
    sep = bp.time_configs({"a": "a"}, Fake, rounds=2, tokens=4, interleave=False, prefill_prompt=[1], probe=probe)
    assert order == ["probe", "settle a", "a"] * 2 + ["probe", "settle a", "prefill a"]
    assert sep["a"]["prefill_tok_s"] == 500.0 and sep["a"]["prefill_tok_s_at_profile_speed"] == pytest.approx(1000.0)
    assert "prefill_tok_s_at_profile_speed" not in bp.summarize(sep["a"]["rounds"], prefill=500.0)


def test_forwards_are_timed_by_the_clock_alone_and_rounds_by_the_tokens_gaps():
    """forward_seconds: one (rows x tokens, start, seconds) per forward of the block, its hooks gone after
    it; a round's decode figure comes from the gaps between its decode forwards' starts, its prefill
    from the prompt's forward."""
    from types import SimpleNamespace

    import moeinfer

    model = moeinfer.load("tiny", progress=False)
    with bp.forward_seconds(model) as forwards:
        moeinfer.generate(model, [[5] * 10], max_new_tokens=4, ignore_eos=True)
    assert [n for n, _, _ in forwards] == [10, 1, 1, 1] and all(t > 0 for _, _, t in forwards)
    assert all(a[1] + a[2] <= b[1] for a, b in zip(forwards, forwards[1:]))  # starts in order, after the last end
    assert not model._forward_hooks and not model._forward_pre_hooks
    run = bp.Runner(lambda: model, SimpleNamespace(batch_size=1), [5] * 10)
    got = run.round(6)
    assert 0 < got["decode_tok_s"] <= got["fastest_decode_step_tok_s"] < float("inf")
    assert 0 < got["prefill_tok_s"] < float("inf") and 0 < got["prefill_first_tok_s"] < float("inf")
    assert not model._forward_hooks and not model._forward_pre_hooks
