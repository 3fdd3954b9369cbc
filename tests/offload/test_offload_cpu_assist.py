"""CPU-assisted experts: the cost model's decisions, and exact outputs when experts run where they live."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import generate_with_logits, random_mixtral

import moeinfer
from moeinfer.traces.trace import record_routing
from moeinfer.offload import OffloadConfig, offload_, simulate
from moeinfer.model.mlp import swiglu
from moeinfer.offload.cpu_assist import CostModel, CpuExperts, calibrate
from moeinfer.offload.hardware import ModelShape, load_profile
from moeinfer.offload.simulator import cost_model_for

# fetching costs 1 ms; the CPU costs 0.2 ms + 0.1 ms per token (+ 1 us of activations per token)
COST = CostModel(expert_bytes=10**6, activation_bytes=1000, link_bytes_per_s=1e9, cpu_s_per_token=1e-4,
                 cpu_s_fixed=2e-4)


def test_cost_model_decisions():
    assert COST.transfer_s() == pytest.approx(1e-3)
    assert COST.prefer_cpu((0, 0), 1) and COST.prefer_cpu((0, 0), 7)
    assert not COST.prefer_cpu((0, 0), 8)  # 0.2 + 8 x 0.101 = 1.008 ms > 1 ms
    on_disk = CostModel(**{**COST.__dict__, "weights_on_host": False})
    assert not on_disk.prefer_cpu((0, 0), 1)  # the CPU would read the expert from disk too
    with pytest.raises(ValueError, match="positive link bandwidth"):
        CostModel(expert_bytes=1, activation_bytes=1, link_bytes_per_s=0, cpu_s_per_token=0, cpu_s_fixed=0)
    shape = ModelShape(name="m", num_layers=1, num_experts=8, top_k=2, hidden=4096, inter=14336)
    h100 = cost_model_for(shape, load_profile("h100-pcie5"))
    assert h100.prefer_cpu((0, 0), 1) and not h100.prefer_cpu((0, 0), 4096)


def test_cpu_experts_match_the_reference_and_run_in_parallel():
    x = torch.randn(5, 16)
    weights = [(torch.randn(24, 16), torch.randn(16, 12)) for _ in range(3)]
    pool = CpuExperts(threads=2)
    outs = pool.compute([(x[i:i + 2], g, d) for i, (g, d) in enumerate(weights)])
    for i, (g, d) in enumerate(weights):
        assert torch.equal(outs[i], swiglu(x[i:i + 2], g, d))
    pool.close()


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_assisted_run_is_exact_and_simulated_exactly(tier, tmp_path):
    model = random_mixtral()
    prompt = [4, 8, 15, 16, 23, 42]
    ref, ref_logits = generate_with_logits(model, prompt, 8)
    cost = CostModel(**{**COST.__dict__, "weights_on_host": True})  # assist experts with < 8 tokens
    model = random_mixtral()
    cfg = {"cache": 3, "cpu_assist": True}
    offload_(model, OffloadConfig(tier=tier, offload_dir=tmp_path, **cfg), cost_model=cost)
    with record_routing(model, logits=False) as rec:
        tokens, logits = generate_with_logits(model, prompt, 8)
    assert tokens == ref
    assert torch.equal(logits, ref_logits)  # CPU-assisted experts compute exactly what resident ones do
    live = model.offload.cache.stats
    assert live.assisted > 0 and live.hits + live.misses == live.assisted + live.hits + live.demand_loads
    sim = simulate(rec.trace(), shape=ModelShape.from_model(random_mixtral()), config=OffloadConfig(tier="cpu", **cfg),
                   hardware=load_profile("h100-pcie5"), cost_model=cost)
    assert (sim.cache["hits"], sim.cache["assisted"], sim.cache["demand_loads"]) == (
        live.hits, live.assisted, live.demand_loads)
    model.offload.close()


def test_calibration_measures_positive_rates(tmp_path):
    model = offload_(random_mixtral(), OffloadConfig(offload_dir=tmp_path, cache=2, cpu_assist=True))
    cm = model.offload.stats.extra["cost_model"]
    assert cm.link_bytes_per_s > 0 and cm.cpu_s_per_token >= 0 and not cm.weights_on_host
    assert cm.expert_bytes == model.offload.store.expert_bytes
    model.offload.close()
    g, d = torch.empty(8, 4), torch.empty(4, 4)
    assert calibrate(read=lambda k, a, b: None, keys=[(0, 0)], gate_up_shape=(8, 4), down_shape=(4, 4),
                     dtype=torch.float32, weights_on_host=True).expert_bytes == (g.numel() + d.numel()) * 4
