"""Sparse to dense (OneS-style): one usage-weighted FFN per layer, top-1, on every architecture."""

from __future__ import annotations

import pytest
import torch

import moeinfer
from compress_cases import ARCHS, hf_logits, logits, num_experts, tiny
from moeinfer.compress import CompressionError, compress_


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "deepseek_v3"])
def test_dense_round_trips_and_transformers_loads_it(arch, root, tmp_path):
    _, model, calib = tiny(arch, root)
    report = compress_(model, ["dense"], calibration=calib, progress=False)
    assert num_experts(model) == [1] * len(model.moe_blocks()) and report.hf_loadable
    assert model.config.top_k == 1 and model.config.hf_config["num_experts_per_tok"] == 1
    out = moeinfer.save(model, tmp_path / "dense")
    again = moeinfer.load(out, progress=False)
    assert torch.equal(logits(again), logits(model))
    assert (hf_logits(out) - logits(model)).abs().max() <= 1e-5


def test_deepseek_v3_cannot_become_dense(root):
    _, model, calib = tiny("deepseek_v3", root)
    before = logits(model)
    with pytest.raises(CompressionError, match="two best experts"):
        compress_(model, ["dense"], calibration=calib, progress=False)
    assert torch.equal(logits(model), before)


def test_identical_experts_become_the_same_ffn(root):
    _, model, calib = tiny("mixtral", root)  # renormalised top-2: the weights of a token sum to one
    for block in model.moe_blocks():
        block.experts.gate_up_proj.data[:] = block.experts.gate_up_proj.data[2]
        block.experts.down_proj.data[:] = block.experts.down_proj.data[2]
    before = logits(model)
    compress_(model, ["dense"], calibration=calib, progress=False)
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_usage_weights_follow_the_calibration(root):
    _, model, calib = tiny("olmoe", root)
    block = model.moe_blocks()[0]
    lc = calib.layer(block)
    freq = lc.frequency(block)
    want = torch.einsum("e,eij->ij", freq / freq.sum(), block.experts.gate_up_proj.data)
    report = compress_(model, [{"method": "dense"}], calibration=calib, progress=False)
    assert torch.allclose(block.experts.gate_up_proj.data[0], want, atol=1e-6)
    assert 0 < report.steps[0]["summary"]["gate_weight_per_token"][str(block.layer_idx)] < 1  # raw top-4 probs
