"""Experts whose weights do not fit in the last-level cache are priced at the profile's rate for
weights streamed from memory (toy numbers); the profile measures that rate on experts of the cache's
size (run, never timed here)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from plan_helpers import synthetic_profile

from moeinfer.planning.costs import MeasuredCosts, ModelSizes
from moeinfer.planning.profile import (ExpertRate, MachineProfile, measure_variant, stored_expert_bytes,
                                       streaming_shape)
from moeinfer.planning.sizes import sizes_from_checkpoint

IN_CACHE, STREAMED = 4e9, 1e9


def _profile(llc_bytes: int) -> MachineProfile:
    rate = ExpertRate(call_s=1e-5, expert_fixed_s=2e-6, bytes_per_s=IN_CACHE, flops_per_s=1e15,
                      stream_bytes_per_s=STREAMED)
    base = synthetic_profile()
    return replace(base, llc_bytes=llc_bytes, experts={**base.experts, "bf16/cpu": rate})


def _mixtral_2l() -> ModelSizes:
    """The real-shape benchmark's model: 2 layers of Mixtral-8x7B (352 MB experts)."""
    return ModelSizes(name="mixtral-2l", num_layers=2, num_experts=8, top_k=2, hidden=4096, inter=14336,
                      dtype_bytes=2, dense_params_per_layer=4096 * 6144 + 4096 * 4096 + 2 * 4096 + 8 * 4096,
                      other_params=2 * 32000 * 4096, head_params=32000 * 4096, kv_bytes_per_token=2 * 2 * 8 * 128 * 2,
                      vocab=32000, max_context=4096)


@pytest.mark.parametrize("sizes, llc, streamed", [
    (_mixtral_2l(), 32 << 20, True),  # 1.4 GB of experts a step: from memory
    (sizes_from_checkpoint("tiny"), 32 << 20, False),  # the shipped model's 9 MB a step stay cached
    (sizes_from_checkpoint("tiny"), 1 << 20, True),  # ... not in a 1 MiB cache
    (_mixtral_2l(), 0, False),  # cache size unknown (synthetic profile): the in-cache fit
])
def test_experts_beyond_the_cache_get_the_streamed_rate(sizes, llc, streamed):
    prof = _profile(llc)
    c = MeasuredCosts(sizes, prof, ["bf16"] * sizes.num_layers, kernel="cpu")
    assert c.streamed is streamed
    nbytes = stored_expert_bytes("bf16/cpu", sizes.hidden, sizes.inter)
    want = 2e-6 + nbytes / (STREAMED if streamed else IN_CACHE)
    assert c.expert_s(0, 1) == pytest.approx(want, rel=1e-9)


def test_a_rate_without_a_streamed_measurement_uses_the_in_cache_one_and_round_trips():
    old = ExpertRate(call_s=0.0, expert_fixed_s=0.0, bytes_per_s=IN_CACHE, flops_per_s=1e12)
    assert old.read_rate(True) == old.read_rate(False) == IN_CACHE
    prof = _profile(32 << 20)
    back = MachineProfile.from_dict(prof.to_dict())
    assert back == prof and back.rate("bf16/cpu").read_rate(True) == STREAMED
    # a profile written before these fields (no llc_bytes, no stream rate) still loads
    d = prof.to_dict()
    d.pop("llc_bytes")
    d.pop("dense_read_gbps")
    d.pop("read_overlap")
    for r in d["experts"].values():
        r.pop("stream_bytes_per_s")
    older = MachineProfile.from_dict(d)
    assert older.llc_bytes == 0 and not older.streams(1e12) and older.dense_read_rate() == prof.mem_read_gbps * 1e9
    assert older.overlaps_reads()  # as the simulator did before the measurement


@pytest.mark.parametrize("variant", ["bf16/cpu", "bf16/reference", "int4", "int8"])
@pytest.mark.parametrize("llc", [1 << 20, 32 << 20])
def test_streaming_shape_is_at_least_the_cache(variant, llc):
    D, I = streaming_shape(variant, llc)
    nbytes = stored_expert_bytes(variant, D, I)
    assert nbytes >= llc
    assert stored_expert_bytes(variant, D, I - 128) < llc  # the smallest such multiple of 128


def test_measure_variant_measures_a_streamed_rate_when_given_the_cache_size():
    dev = torch.device("cpu")
    kw = dict(small=(64, 64), large=(128, 128), repeats=1)
    assert measure_variant("bf16/reference", dev, **kw).stream_bytes_per_s is None
    rate = measure_variant("bf16/reference", dev, llc_bytes=64 << 10, **kw)
    assert rate.stream_bytes_per_s is not None and rate.stream_bytes_per_s > 0


def test_streamed_rates_are_measured_in_turn_with_the_dense_read(monkeypatch):
    """Each variant's streamed call runs in turn with the dense read, one variant's weights at a time, and
    every rate is priced against the dense read's median over all rounds (times scripted): a variant
    timed in a phase twice as slow gets the rate a fast phase would give."""
    from moeinfer.planning import profile

    events: list[str] = []
    slow = {"int8": 2.0, "int4": 1.0}  # int8's rounds run while the machine is at half speed
    live: set[str] = set()

    def reference(device, llc_bytes):
        return (lambda: 0.1 * slow[events[-1]] if events else 0.1), 1_000_000

    def streamed(variant, device, llc_bytes):
        assert live == set()  # the previous variant's weights are gone
        events.append(variant)
        live.add(variant)

        class Call:
            def __call__(self):
                return 0.2 * slow[variant] + 1e-3  # twice the reference's time, plus call and fixed costs

            def __del__(self):
                live.discard(variant)
        return Call(), 2_000_000

    monkeypatch.setattr(profile, "_dense_read_call", reference)
    monkeypatch.setattr(profile, "_streamed_experts_call", streamed)
    rate = ExpertRate(call_s=6e-4, expert_fixed_s=2e-4, bytes_per_s=1e10, flops_per_s=1e12)
    rates, dense_gbps = profile.streamed_in_turn([("int8", rate), ("int4", rate)], torch.device("cpu"), 1 << 20,
                                                 rounds=3)
    assert events == ["int8", "int4"]
    # the dense read's median over all 6 rounds (3 at 0.2 s, 3 at 0.1 s): 0.15 s for 1 MB
    assert dense_gbps == pytest.approx(1e6 / 0.15 / 1e9)
    # 2 MB in 0.15 s x the call's median ratio to the dense read in its own rounds, less call_s and two
    # experts' fixed costs; the other fitted figures kept
    want8 = 2e6 / (0.15 * (0.4 + 1e-3) / 0.2 - 1e-3)
    want4 = 2e6 / (0.15 * (0.2 + 1e-3) / 0.1 - 1e-3)
    assert rates[0].stream_bytes_per_s == pytest.approx(want8)
    assert rates[1].stream_bytes_per_s == pytest.approx(want4)
    assert want8 == pytest.approx(want4, rel=0.01)  # each its own time alone would say 2x apart
    assert all((r.call_s, r.bytes_per_s, r.flops_per_s) == (rate.call_s, rate.bytes_per_s, rate.flops_per_s)
               for r in rates)
