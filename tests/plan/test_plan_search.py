"""The planner's layer search on toy cost models with a known optimum (exact enumeration and DP)."""

from __future__ import annotations

import math
import random

import pytest

from moeinfer.planning.search import Option, search, search_dp, search_exact


def toy() -> list[list[Option]]:
    # per layer: float (fastest, biggest, lossless), int8 (slower, half, small loss), int4 (slowest, a
    # quarter, larger loss): the trade-off of a CPU whose quantized kernels dequantize
    return [[Option(1.0, 4.0, 0.0), Option(2.0, 2.0, 0.01), Option(3.0, 1.0, 0.05)] for _ in range(3)]


def test_known_optimum_memory_only() -> None:
    # 7 memory units: 4+2+1 (one of each) takes 6 time, 2+2+2 takes 6 too and less memory, 4+1+1 takes 7
    best = search_exact(toy(), memory=7.0)
    assert best is not None and best.time == 6.0 and best.memory == 6.0
    assert sorted(best.picks) == [1, 1, 1]
    # 3 units: all int4
    assert search_exact(toy(), memory=3.0).picks == (2, 2, 2)
    # 9 units: 4+2+2 (time 5, memory 8) ties 4+4+1 (time 5, memory 9) and wins on memory
    best = search_exact(toy(), memory=9.0)
    assert best is not None and (best.time, best.memory) == (5.0, 8.0) and sorted(best.picks) == [0, 1, 1]
    # unlimited memory: all float
    assert search_exact(toy(), memory=100.0).picks == (0, 0, 0)
    # nothing fits
    assert search_exact(toy(), memory=2.9) is None


def test_known_optimum_with_quality_budget() -> None:
    # memory 3 forces all int4 (quality 0.15); a quality budget of 0.1 makes it infeasible
    assert search_exact(toy(), memory=3.0, quality=0.1) is None
    # memory 5, quality 0.1: one int8 + two int4 (memory 4) has quality 0.11 > 0.1; two int8 + one int4:
    # quality 0.07, time 7, memory 5
    best = search_exact(toy(), memory=5.0, quality=0.1)
    assert best is not None and (best.time, best.memory) == (7.0, 5.0)
    assert sorted(best.picks) == [1, 1, 2]
    assert math.isclose(best.quality, 0.07)


@pytest.mark.parametrize("memory", [3.0, 5.0, 7.0, 9.0, 12.0])
@pytest.mark.parametrize("quality", [math.inf, 0.1, 0.03])
def test_dp_equals_exact_on_grid_costs(memory: float, quality: float) -> None:
    exact = search_exact(toy(), memory=memory, quality=quality)
    # memories are whole numbers (exact gcd buckets); quality buckets of 0.01 divide every quality cost
    qb = round(quality / 0.01) if math.isfinite(quality) else 1
    dp = search_dp(toy(), memory=memory, quality=quality, quality_buckets=qb)
    assert (exact is None) == (dp is None)
    if exact is not None:
        assert dp.time == pytest.approx(exact.time)


def test_dp_is_feasible_and_near_exact_on_random_instances() -> None:
    rng = random.Random(0)
    for _ in range(30):
        L = rng.randint(2, 6)
        options = [[Option(rng.uniform(0.1, 3), rng.uniform(0.5, 4), rng.uniform(0, 0.05)) for _ in range(3)]
                   for _ in range(L)]
        memory = rng.uniform(0.6, 3.0) * L
        quality = rng.choice([math.inf, 0.03 * L])
        exact = search_exact(options, memory=memory, quality=quality)
        dp = search_dp(options, memory=memory, quality=quality, memory_buckets=2048, quality_buckets=256)
        if dp is not None:  # rounding up never accepts what does not fit
            assert dp.memory <= memory + 1e-9 and dp.quality <= quality + 1e-9
            assert exact is not None and dp.time >= exact.time - 1e-9
        if exact is not None and dp is not None:
            assert dp.time <= exact.time * 1.10  # fine buckets: within 10% of the optimum here


def test_search_switches_to_dp_on_large_spaces() -> None:
    # 3^12 = 531441 choices > exact_limit: the DP runs and still finds the obvious optimum
    # with f float, e int8 layers: memory 3f + e + 12 <= 24 and time 36 - 2f - e, so all int8 is optimal
    options = [[Option(1.0, 4.0), Option(2.0, 2.0), Option(3.0, 1.0)] for _ in range(12)]
    best = search(options, memory=24.0, exact_limit=1000)
    assert best is not None and best.picks == (1,) * 12 and best.time == 24.0
    # 23.5 units: 3f + e <= 11.5, so 11 int8 + 1 int4 (time 25)
    best = search(options, memory=23.5, exact_limit=1000)
    assert best is not None and best.time == 25.0 and best.memory <= 23.5


def test_empty_layer_options_are_an_error() -> None:
    with pytest.raises(ValueError, match="at least one option"):
        search([[Option(1, 1)], []], memory=10)
