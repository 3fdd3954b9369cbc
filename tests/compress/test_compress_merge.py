"""Expert merging (HC-SMoE / MC-SMoE): clustering, neuron alignment, exact gate sums, round trips."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import moeinfer
from compress_cases import ARCHS, hf_logits, logits, num_experts, tiny
from moeinfer.compress import CompressionError, compress_
from moeinfer.compress.alignment import align
from moeinfer.compress.clustering import agglomerate
from moeinfer.model.moe import Experts, MoEBlock, route


def test_agglomerate_joins_the_closest():
    f = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [-1.0, 0.0]])
    assert agglomerate(f, 3) == [[0, 1], [2, 3], [4]]
    assert agglomerate(f, 5) == [[0], [1], [2], [3], [4]]
    assert agglomerate(f, 1, "complete") == [[0, 1, 2, 3, 4]]


def test_alignment_undoes_a_neuron_permutation():
    ex = Experts(1, 12, 10)
    torch.nn.init.normal_(ex.gate_up_proj)
    torch.nn.init.normal_(ex.down_proj)
    gu, dn = ex.gate_up_proj.data[0], ex.down_proj.data[0]
    perm = torch.randperm(10)
    shuffled_gu, shuffled_dn = gu[torch.cat([perm, perm + 10])], dn[:, perm]
    a_gu, a_dn = align(gu, dn, shuffled_gu, shuffled_dn)
    assert torch.equal(a_gu, gu) and torch.equal(a_dn, dn)


def _make_twins(model, pairs):
    """Copy expert a onto expert b in every layer: merging them must change nothing."""
    for block in model.moe_blocks():
        for a, b in pairs:
            block.experts.gate_up_proj.data[b] = block.experts.gate_up_proj.data[a]
            block.experts.down_proj.data[b] = block.experts.down_proj.data[a]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_map_router_merging_of_identical_experts_is_exact(arch, root, tmp_path):
    _, model, calib = tiny(arch, root)
    _make_twins(model, [(0, 1), (4, 6)])  # within DeepSeek-V3's groups 0-3 and 4-7
    before = logits(model)
    report = compress_(model, [{"method": "merge", "num_experts": 6}], calibration=calib, progress=False)
    for clusters in report.steps[0]["summary"]["clusters"].values():
        assert [0, 1] in clusters and [4, 6] in clusters
    assert num_experts(model) == [6] * len(model.moe_blocks()) and not report.hf_loadable
    assert torch.allclose(logits(model), before, atol=1e-5)
    out = moeinfer.save(model, tmp_path / "merged")
    again = moeinfer.load(out, progress=False)
    assert torch.equal(logits(again), logits(model))
    assert torch.equal(again.moe_blocks()[0].gate.expert_map, model.moe_blocks()[0].gate.expert_map)


def test_map_router_adds_the_gate_weights_of_merged_experts(root):
    _, model, calib = tiny("mixtral", root)
    block: MoEBlock = model.moe_blocks()[0]
    x = calib.layer(block).x[:32]
    original = route(x, block.gate.weight, block.gate.cfg)
    compress_(model, [{"method": "merge", "num_experts": 4}], calibration=calib, progress=False)
    emap, ex = block.gate.expert_map, block.experts

    def f(e, xn):  # merged expert e on one token
        gate, up = F.linear(xn, ex.gate_up_proj[e]).chunk(2, -1)
        return F.linear(F.silu(gate) * up, ex.down_proj[e])

    want = torch.stack([sum(w * f(int(emap[e]), xn) for w, e in zip(ws, es))
                        for xn, ws, es in zip(x, original.weights, original.indices)])
    folded = block.gate(x)  # one slot per distinct merged expert, weights added
    twice = emap[original.indices[:, 0]] == emap[original.indices[:, 1]]
    assert twice.any() and torch.equal(folded.k, 2 - twice.long())
    with torch.no_grad():
        assert torch.allclose(block(x), want, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("similarity", ["output", "router"])
def test_merge_every_architecture(arch, similarity, root, tmp_path):
    _, model, calib = tiny(arch, root)
    E = model.moe_blocks()[0].experts.num_experts
    report = compress_(model, [{"method": "merge", "ratio": 0.5, "similarity": similarity}], calibration=calib,
                       progress=False)
    assert num_experts(model) == [E // 2] * len(model.moe_blocks())
    assert torch.isfinite(logits(model)).all()
    if model.moe_blocks()[0].gate.cfg.n_group > 1:
        for clusters in report.steps[0]["summary"]["clusters"].values():
            assert all(max(c) < E // 2 or min(c) >= E // 2 for c in clusters)  # never across groups
    again = moeinfer.load(moeinfer.save(model, tmp_path / "m"), progress=False)
    assert torch.equal(logits(again), logits(model))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v2"])
def test_average_router_is_transformers_loadable(arch, root, tmp_path):
    _, model, calib = tiny(arch, root)
    report = compress_(model, [{"method": "merge", "num_experts": 4, "router": "average"}], calibration=calib,
                       progress=False)
    assert report.hf_loadable and all(b.gate.expert_map is None for b in model.moe_blocks())
    out = moeinfer.save(model, tmp_path / "avg")
    assert (hf_logits(out) - logits(model)).abs().max() <= 1e-5


def test_merge_bad_input(root):
    _, model, calib = tiny("mixtral", root)
    with pytest.raises(CompressionError, match="cannot keep 9"):
        compress_(model, [{"method": "merge", "num_experts": 9}], calibration=calib, progress=False)
    with pytest.raises(CompressionError, match="similarity"):
        compress_(model, [{"method": "merge", "num_experts": 4, "similarity": "cosine"}], calibration=calib)
    compress_(model, [{"method": "merge", "num_experts": 6}], calibration=calib, progress=False)
    for later in ({"method": "prune_reap", "keep": 4}, {"method": "merge", "num_experts": 4}, {"method": "dense"}):
        with pytest.raises(CompressionError, match="merged experts"):
            compress_(copy.deepcopy(model), [later], calibration=calib, progress=False)


def test_fold_duplicates_respects_a_gating_prefix():
    from moeinfer.model.moe import Routing, fold_duplicates

    r = Routing(indices=torch.tensor([[0, 1, 2], [3, 0, 1], [2, 3, 0]]),
                weights=torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]]),
                logits=torch.zeros(3, 4), k=torch.tensor([3, 2, 3]))
    f = fold_duplicates(r, torch.tensor([0, 1, 1, 0]))  # experts 0,3 -> 0 and 1,2 -> 1
    assert f.k.tolist() == [2, 1, 2]
    assert f.indices[0, :2].tolist() == [0, 1] and f.weights[0, :2].tolist() == pytest.approx([0.5, 0.5])
    assert f.indices[1, :1].tolist() == [0] and f.weights[1, 0].item() == pytest.approx(0.9)  # slot 3 is past k
    assert f.indices[2, :2].tolist() == [1, 0] and f.weights[2, :2].tolist() == pytest.approx([0.7, 0.3])
