"""Timings taken in turn and priced against a reference (moeinfer/planning/in_turn.py); the times are
scripted: tests never time anything."""

from __future__ import annotations

import pytest

from moeinfer.planning.in_turn import priced_by_reference, priced_by_shared_reference, rounds_in_turn


def test_every_call_runs_once_a_round_in_turn_after_a_warm_up_round():
    order: list[str] = []
    times = iter([9.0, 8.0, 1.0, 2.0, 1.5, 3.0])  # the warm-up round's 9 and 8 are dropped

    def call(name: str):
        return lambda: order.append(name) or next(times)

    assert rounds_in_turn([call("a"), call("b")], 2) == [[1.0, 2.0], [1.5, 3.0]]
    assert order == ["a", "b"] * 3


def test_a_drifting_machine_leaves_the_prices_on_the_median_rounds_level():
    # the machine's speed moves from round to round (x1, x2, x1.5, x3, x1.2); within a round calls
    # keep their proportions 1 : 3 : 0.5
    rounds = [[f * 1.0, f * 3.0, f * 0.5] for f in (1.0, 2.0, 1.5, 3.0, 1.2)]
    assert priced_by_reference(rounds) == pytest.approx([1.5, 4.5, 0.75])
    # priced against another call, at a price set elsewhere
    assert priced_by_reference(rounds, reference=1, seconds=6.0) == pytest.approx([2.0, 6.0, 1.0])


def test_a_blip_in_one_call_of_a_round_moves_its_price_not():
    """A least time per call takes a one-off fast run of one call (a phase the others' least times did not
    see): its difference to the others is then off. The median ratio keeps the rounds' proportion."""
    # round 3: the second call alone fast (a least time per call would say 1.2)
    rounds = [[1.0, 3.0], [1.1, 3.3], [1.0, 1.2], [1.2, 3.6], [1.0, 3.0]]
    assert priced_by_reference(rounds) == pytest.approx([1.0, 3.0])
    # nor a blip of the reference itself (a least time would have halved every price)
    rounds = [[1.0, 3.0], [0.5, 3.0], [1.0, 3.0]]
    assert priced_by_reference(rounds) == pytest.approx([1.0, 3.0])


def test_sets_of_rounds_share_the_reference_level():
    """Calls that cannot be held at once run in sets, each with the same reference: the reference's price
    is its median over every set's rounds, and each set's calls keep their ratio to it (a set taken in a
    phase twice as slow prices its call as a fast set would)."""
    fast = [[1.0, 2.0], [1.0, 2.0], [1.2, 2.4]]
    slow = [[2.0, 2.0], [2.2, 2.2], [2.0, 2.0]]  # the machine at half speed: the call is the reference's size
    (a, b), price = priced_by_shared_reference([fast, slow])
    assert price == pytest.approx(1.6)  # the median of 1, 1, 1.2, 2, 2.2, 2
    assert a == pytest.approx([1.6, 3.2]) and b == pytest.approx([1.6, 1.6])
