"""Mixed-precision loading: low-gate-weight misses fetch a group-wise 4-bit copy (HOBBIT, EdgeMoE)."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import random_mixtral

import moeinfer
from moeinfer.formats.quant.groupwise import quantize
from moeinfer.traces.trace import record_routing
from moeinfer.offload import OffloadConfig, OffloadError, offload_, simulate
from moeinfer.offload.hardware import ModelShape, load_profile

PROMPT = [3, 17, 99, 42, 7, 64]


def test_low_bit_copies_are_read_dequantized_and_counted(tmp_path):
    ref_model = random_mixtral()
    ref = moeinfer.generate(ref_model, [PROMPT], max_new_tokens=6)[0].token_ids
    gate_up = ref_model.moe_blocks()[1].experts.gate_up_proj.data[3].clone()
    # threshold 1.0: (nearly) every miss loads the 4-bit copy
    model = random_mixtral()
    cfg = {"cache": 4, "policy": "hobbit", "low_bit_threshold": 1.0, "low_bit_group_size": 16}
    offload_(model, OffloadConfig(tier="disk", offload_dir=tmp_path, **cfg))
    store = model.offload.store
    assert (tmp_path / "experts-001.q4g16.safetensors").is_file()
    assert store.low_bit_bytes < store.expert_bytes / 3
    g, d = torch.empty_like(gate_up), torch.empty(model.config.hidden_size, gate_up.shape[0] // 2)
    store.read_low_bit((1, 3), g, d)
    assert torch.equal(g, quantize(gate_up, bits=4, group_size=16).dequantize())
    with record_routing(model, logits=False) as rec:
        out = moeinfer.generate(model, [PROMPT], max_new_tokens=6)[0].token_ids
    st = model.offload.cache.stats
    assert st.demand_loads >= st.low_bit_loads > st.demand_loads * 0.8  # weights of 1.0 (fp rounding) load full
    full = st.demand_loads - st.low_bit_loads
    assert st.bytes_loaded == st.low_bit_loads * store.low_bit_bytes + full * store.expert_bytes
    assert len(out) == len(ref)  # tokens may differ (4-bit experts); the error is bounded in the next test
    sim = simulate(rec.trace(), shape=ModelShape.from_model(random_mixtral()),
                   config=OffloadConfig(tier="cpu", **cfg), hardware=load_profile("h100-pcie5"),
                   low_bit_bytes=store.low_bit_bytes)
    for k in ("hits", "misses", "low_bit_loads", "bytes_loaded"):
        assert sim.cache[k] == getattr(st, k), k
    model.offload.close()


def _dequantized(model, keys, group_size):
    """`model` with the experts `keys` [(layer, expert)] replaced by their 4-bit round trip: what the
    low-bit path must compute for exactly those experts."""
    with torch.no_grad():
        for block in model.moe_blocks():
            for layer, e in keys:
                if layer == block.layer_idx:
                    for t in (block.experts.gate_up_proj, block.experts.down_proj):
                        t[e] = quantize(t[e], bits=4, group_size=group_size).dequantize()
    return model


def test_low_bit_prefill_equals_the_dequantized_experts_and_bounds_the_error(tmp_path):
    """The approximate path, bounded: the prefill logits equal (fp32 tolerance) those of the resident model
    whose low-bit-loaded experts were round-tripped through 4 bits by the quantizer, and their distance
    to the full-precision logits is what 4 bits cost (nonzero, below 40%)."""
    model = random_mixtral()
    offload_(model, OffloadConfig(tier="disk", offload_dir=tmp_path, cache=4, policy="hobbit",
                                  low_bit_threshold=1.0, low_bit_group_size=16))
    store = model.offload.store
    low_bit: list[tuple[int, int]] = []
    real = store.read_low_bit
    store.read_low_bit = lambda key, g, d: (low_bit.append(key), real(key, g, d))[1]
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        got = model(ids)
        expected = _dequantized(random_mixtral(), low_bit, 16)(ids)
        full = random_mixtral()(ids)
    assert len(low_bit) == model.offload.cache.stats.low_bit_loads > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32: only summation order may differ
    err = ((got - full).norm() / full.norm()).item()
    assert 0 < err < 0.4


def test_low_bit_settings_are_checked(tmp_path):
    with pytest.raises(OffloadError, match="use tier='disk'"):
        offload_(random_mixtral(), OffloadConfig(tier="cpu", low_bit_threshold=0.3))
    with pytest.raises(ValueError, match="low_bit_bits must be"):
        OffloadConfig(tier="cpu", low_bit_threshold=0.3, low_bit_bits=5)
    with pytest.raises(ValueError, match=r"low_bit_threshold must be in \(0, 1\]"):
        OffloadConfig(tier="cpu", low_bit_threshold=1.5)
