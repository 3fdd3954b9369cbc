"""lowrank: rank allocation under the budget, LowRankExperts against the eager reference, exact
recovery of truly low-rank experts, every architecture round-trips, bad budgets fail cleanly."""

from __future__ import annotations

import pytest
import torch

import moeinfer
from compress_quant_helpers import ARCHS, random_calibration, random_model, sample_ids
from moeinfer.compress.api import compress_
from moeinfer.formats.layout import RECORD_KEY
from moeinfer.formats.lowrank_experts import LowRankExperts
from moeinfer.compress.methods.lowrank import allocate_ranks
from moeinfer.compress.registry import CompressionError
from moeinfer.model.moe import Experts, Routing, combine, dispatch, expert_compute


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tmp_path_factory.mktemp("lowrank_models")


def test_allocate_ranks_respects_budget_and_importance() -> None:
    sv = [torch.linspace(4, 1, 16) for _ in range(4)]
    importance = torch.tensor([4.0, 1.0, 1.0, 0.25], dtype=torch.float64)
    cost_gu, cost_dn = 48, 40
    budget = 4 * (cost_gu + cost_dn) * 6
    r_gu, r_dn = allocate_ranks(sv, sv, importance, cost_gu, cost_dn, budget)
    spent = sum(r_gu) * cost_gu + sum(r_dn) * cost_dn
    assert budget - max(cost_gu, cost_dn) < spent <= budget
    assert min(r_gu + r_dn) >= 1
    assert r_gu[0] > r_gu[1] == r_gu[2] > r_gu[3]


@pytest.mark.parametrize("N,K", [(1, 1), (9, 2), (30, 3)])
def test_lowrank_experts_match_expert_compute_on_the_product(N: int, K: int) -> None:
    E, D, I = 5, 24, 16
    factors = [(torch.randn(2 * I, 3 + e), torch.randn(3 + e, D), torch.randn(D, 2 + e), torch.randn(2 + e, I))
               for e in range(E)]
    m = LowRankExperts.from_svd(factors, D, I)
    scores = torch.rand(N, E)
    scores[:, 2] = -1  # an expert without tokens
    w, idx = scores.softmax(-1).topk(K, dim=-1)
    routing = Routing(idx, w, scores)
    x = torch.randn(N, D)
    gu, dn = m.dense_all()
    d = dispatch(idx, E)
    ref = combine(expert_compute(x[d.tokens], d.counts, gu, dn), d, w, N)
    torch.testing.assert_close(m(x, routing), ref, rtol=1e-4, atol=1e-4)


def test_truly_low_rank_experts_are_recovered(ckpts) -> None:
    model = random_model("mixtral", ckpts)
    g = torch.Generator().manual_seed(0)
    for b in model.moe_blocks():  # rank-2 experts
        ex = b.experts
        E, two_i, D = ex.gate_up_proj.shape
        I = two_i // 2
        ex.gate_up_proj.data = torch.randn(E, two_i, 2, generator=g) @ torch.randn(E, 2, D, generator=g) / 4
        ex.down_proj.data = torch.randn(E, D, 2, generator=g) @ torch.randn(E, 2, I, generator=g) / 4
    ids = sample_ids(model)
    with torch.no_grad():
        ref = model(ids)
    report = compress_(model, [{"method": "lowrank", "keep": 0.5}], calibration=random_calibration(model),
                       progress=False)
    assert report.steps[0]["summary"]["energy_kept"] == pytest.approx(1.0, abs=1e-5)
    assert report.bytes_after < report.bytes_before
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_lowrank_every_arch_round_trips(arch, ckpts, tmp_path) -> None:
    model = random_model(arch, ckpts)
    report = compress_(model, [{"method": "lowrank", "keep": 0.6}], calibration=random_calibration(model),
                       progress=False)
    assert 0.5 < report.steps[0]["summary"]["params_kept"] <= 0.6
    assert all(isinstance(b.experts, LowRankExperts) for b in model.moe_blocks())
    ids = sample_ids(model)
    with torch.no_grad():
        before = model(ids)
    moeinfer.save(model, tmp_path / "lr")
    again = moeinfer.load(tmp_path / "lr", dtype="float32", progress=False)
    with torch.no_grad():
        assert torch.equal(again(ids), before)
    layout = again.config.hf_config[RECORD_KEY]["layout"]
    assert {v["kind"] for v in layout.values()} == {"lowrank"}


def test_lowrank_then_nothing_structural_after(ckpts) -> None:
    model = random_model("olmoe", ckpts)
    with pytest.raises(CompressionError, match="lowrank: keep=0.001 leaves layer"):
        compress_(model, [{"method": "lowrank", "keep": 0.001}], calibration=random_calibration(model),
                  progress=False)
    assert all(type(b.experts) is Experts for b in model.moe_blocks())
    calib = random_calibration(model)
    compress_(model, [{"method": "lowrank", "keep": 0.5}], calibration=calib, progress=False)
    with pytest.raises(CompressionError, match="plain experts"):
        compress_(model, [{"method": "quantize"}], progress=False)
