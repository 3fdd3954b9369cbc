"""Unstructured pruning inside experts (MoE-Pruner): per-row sparsity, the score, saving."""

from __future__ import annotations

import pytest
import torch

import moeinfer
from compress_cases import ARCHS, logits, tiny
from moeinfer.compress import CompressionError, compress_
from moeinfer.compress.methods.prune_unstructured import prune_rows_


def test_rows_lose_the_lowest_scores():
    w = torch.tensor([[1.0, -4.0, 2.0, 3.0], [5.0, 1.0, -1.0, 2.0]])
    norms = torch.tensor([1.0, 0.1, 1.0, 1.0])  # column 1's input is small: |-4| x 0.1 = 0.4
    assert prune_rows_(w, norms, 0.5) == 4
    assert w.tolist() == [[0.0, 0.0, 2.0, 3.0], [5.0, 0.0, 0.0, 2.0]]


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsity_is_reached_and_saved(arch, root, tmp_path):
    _, model, calib = tiny(arch, root)
    report = compress_(model, [{"method": "prune_unstructured", "sparsity": 0.5}], calibration=calib,
                       progress=False)
    s = report.steps[0]["summary"]
    for block in model.moe_blocks():
        gu, dn = block.experts.gate_up_proj, block.experts.down_proj
        assert ((gu == 0).sum(-1) == gu.shape[-1] // 2).all() and ((dn == 0).sum(-1) == dn.shape[-1] // 2).all()
    assert s["expert_sparsity"] == pytest.approx(0.5, abs=0.02) and report.hf_loadable
    assert torch.isfinite(logits(model)).all()
    again = moeinfer.load(moeinfer.save(model, tmp_path / "u"), progress=False)
    assert torch.equal(logits(again), logits(model))


def test_router_weighting_changes_the_choice(root):
    _, base, calib = tiny("mixtral", root)
    _, plain, _ = tiny("mixtral", root)
    compress_(base, [{"method": "prune_unstructured", "sparsity": 0.5}], calibration=calib, progress=False)
    compress_(plain, [{"method": "prune_unstructured", "sparsity": 0.5, "router_weighted": False}],
              calibration=calib, progress=False)
    a, b = base.moe_blocks()[0].experts.gate_up_proj, plain.moe_blocks()[0].experts.gate_up_proj
    assert not torch.equal(a == 0, b == 0)


@pytest.mark.parametrize("sparsity", [1.0, -0.1])
def test_bad_sparsity(sparsity, root):
    _, model, calib = tiny("mixtral", root)
    with pytest.raises(CompressionError, match="sparsity must be in"):
        compress_(model, [{"method": "prune_unstructured", "sparsity": sparsity}], calibration=calib)
