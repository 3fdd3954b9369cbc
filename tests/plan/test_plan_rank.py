"""Step 5's ranking (moeinfer.planning.planner._rank): by predicted decode speed, except that candidates
within TIE (5%) of the fastest in decode and in prefill are a tie decided by quality loss (not measured:
last), then speed, then memory — a 1% predicted gain never costs quality (toy predictions)."""

from __future__ import annotations

from moeinfer.planning.planner import TIE, _rank
from moeinfer.planning.spec import Prediction


def _p(speed: float, loss: float | None, memory: int = 100, prefill: float = 1.0) -> Prediction:
    return Prediction(decode_tok_s=speed, prefill_tok_s=prefill, memory_bytes=memory, quality_loss=loss)


def _names(scored):
    return [name for name, _ in _rank(scored)]


def test_a_tie_goes_to_the_lower_quality_loss():
    scored = [("int8", _p(825.0, 0.0004)), ("bf16", _p(815.0, 0.0)), ("int4", _p(781.0, 0.0011)),
              ("slow", _p(400.0, 0.0))]
    assert _names(scored) == ["bf16", "int8", "int4", "slow"]  # int4 is 5.3% behind: outside the tie


def test_a_faster_plan_beyond_the_tie_wins_whatever_its_loss():
    fast = 1000.0
    scored = [("lossless", _p(fast * (1 - TIE) - 1, 0.0)), ("quantized", _p(fast, 0.002))]
    assert _names(scored) == ["quantized", "lossless"]


def test_within_a_tie_equal_losses_keep_speed_then_memory_order():
    scored = [("b", _p(990.0, 0.001, memory=50)), ("a", _p(1000.0, 0.001, memory=90)),
              ("c", _p(990.0, 0.001, memory=40)), ("unmeasured", _p(1000.0, None))]
    assert _names(scored) == ["a", "c", "b", "unmeasured"]


def test_a_tie_in_decode_alone_is_no_tie():
    """The shipped model at 93.8 MB (fifteenth session): bf16 4% behind int4 in decode but 39% in prefill
    is not tied with it; int8, tied in both, wins the tie by quality."""
    scored = [("int4", _p(771.0, 0.0011, prefill=9270.0)), ("bf16", _p(738.0, 0.0, prefill=5697.0)),
              ("int8", _p(758.0, 0.0001, prefill=9256.0))]
    assert _names(scored) == ["int8", "int4", "bf16"]
    # a prefill just inside the tie keeps bf16 tied
    scored[1] = ("bf16", _p(738.0, 0.0, prefill=9270.0 * (1 - TIE) + 1))
    assert _names(scored) == ["bf16", "int8", "int4"]


def test_nothing_to_rank():
    assert _rank([]) == []
