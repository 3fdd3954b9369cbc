"""Expert pruning (REAP, NAEE, frequency, task-specific) on tiny models of every architecture."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import moeinfer
from compress_cases import ARCHS, hf_logits, logits, num_experts, tiny
from moeinfer.compress import CompressionError, compress_
from moeinfer.compress.methods.prune_naee import NaeePruneParams, naee_search
from moeinfer.compress.methods.prune_reap import reap_saliency
from moeinfer.compress.surgery import keep_experts_

METHODS = ["prune_reap", "prune_naee", "prune_frequency"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_prune_round_trips(arch, method, root, tmp_path):
    _, model, calib = tiny(arch, root)
    E = model.moe_blocks()[0].experts.num_experts
    report = compress_(model, [{"method": method, "keep": E // 2}], calibration=calib, progress=False)
    assert num_experts(model) == [E // 2] * len(model.moe_blocks()) and report.hf_loadable
    assert report.bytes_after < report.bytes_before
    out = moeinfer.save(model, tmp_path / "pruned")
    again = moeinfer.load(out, progress=False)
    assert torch.equal(logits(again), logits(model))
    record = again.config.hf_config["moeinfer_compression"]
    assert record["steps"][0]["method"] == method and len(record["steps"][0]["summary"]["kept"]) == len(num_experts(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_uniformly_pruned(arch, root, tmp_path):
    _, model, calib = tiny(arch, root)
    compress_(model, [{"method": "prune_reap", "ratio": 0.5}], calibration=calib, progress=False)
    out = moeinfer.save(model, tmp_path / "pruned")
    assert (hf_logits(out) - logits(model)).abs().max() <= 1e-5


def test_deepseek_groups_keep_equal_counts(root):
    _, model, calib = tiny("deepseek_v3", root)  # n_group=2: experts 0-3 and 4-7
    with pytest.raises(CompressionError, match="n_group=2"):
        compress_(copy.deepcopy(model), [{"method": "prune_reap", "keep": 3}], calibration=calib, progress=False)
    with pytest.raises(CompressionError, match="fewer than 2 per group"):
        compress_(copy.deepcopy(model), [{"method": "prune_frequency", "keep": 2}], calibration=calib, progress=False)
    report = compress_(model, [{"method": "prune_naee", "keep": 4}], calibration=calib, progress=False)
    for kept in report.steps[0]["summary"]["kept"].values():
        assert sum(e < 4 for e in kept) == 2
    assert all(b.gate.cfg.n_group == 2 for b in model.moe_blocks())


def test_reap_scores_a_silent_expert_zero_and_prunes_it(root):
    _, model, calib = tiny("mixtral", root)
    block = model.moe_blocks()[0]
    block.experts.down_proj.data[3] = 0
    score = reap_saliency(block, calib.layer(block).x)
    assert score[3] == 0 and (score[torch.arange(8) != 3] > 0).all()
    report = compress_(model, [{"method": "prune_reap", "keep": 7}], calibration=calib, progress=False)
    assert 3 not in report.steps[0]["summary"]["kept"][str(block.layer_idx)]


def _eager_loss(block, x, keep):
    """Reference: actually prune a copy of the block and compare its output with the original's."""
    pruned = copy.deepcopy(block)
    keep_experts_(pruned, keep)
    with torch.no_grad():
        return float((block(x) - pruned(x)).pow(2).sum()) / x.shape[0]


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_naee_exhaustive_finds_the_eager_optimum(arch, root):
    _, model, calib = tiny(arch, root)
    block = model.moe_blocks()[-1]
    if block.shared_expert is not None:
        block.shared_expert = None
    x = calib.layer(block).x[:96]
    E = block.experts.num_experts
    n = E - 2
    keep, loss, search = naee_search(block, x, n, NaeePruneParams(keep=n, search="exhaustive"))
    losses = {tuple(S): _eager_loss(block, x, list(S)) for S in itertools.combinations(range(E), n)}
    assert search == "exhaustive"
    assert loss == pytest.approx(losses[tuple(keep)], rel=1e-4, abs=1e-7)
    assert losses[tuple(keep)] <= min(losses.values()) * (1 + 1e-4) + 1e-7
    greedy, g_loss, _ = naee_search(block, x, n, NaeePruneParams(keep=n, search="greedy"))
    assert g_loss >= loss - 1e-7 and len(greedy) == n


def test_naee_auto_goes_greedy_past_max_candidates(root):
    _, model, calib = tiny("olmoe", root)  # 16 experts
    report = compress_(model, [{"method": "prune_naee", "keep": 8, "max_candidates": 10}], calibration=calib,
                       progress=False)
    assert report.steps[0]["summary"]["search"] == ["greedy"] and num_experts(model)[0] == 8


def test_task_specific_pruning_records_its_domain(root):
    _, model, _ = tiny("mixtral", root)
    report = compress_(model, {"calibration": {"source": "python", "max_tokens": 128, "seq_len": 64},
                               "steps": [{"method": "prune_reap", "keep": 4}]}, progress=False)
    assert model.config.hf_config["moeinfer_compression"]["calibration"]["source"] == "python"
    assert report.hf_loadable


@pytest.mark.parametrize("params, match", [
    ({"keep": 9}, "cannot keep 9 experts"),
    ({"keep": 0}, "fewer than top_k"),
    ({"keep": 1}, "fewer than top_k"),
    ({}, "exactly one of keep"),
    ({"keep": 4, "ratio": 0.5}, "exactly one of keep"),
    ({"ratio": 1.0}, "ratio must be in"),
])
@pytest.mark.parametrize("method", ["prune_reap", "prune_naee"])
def test_bad_keep_is_a_clear_error(method, params, match, root):
    _, model, calib = tiny("mixtral", root)
    before = logits(model)
    with pytest.raises(CompressionError, match=match):
        compress_(model, [{"method": method, **params}], calibration=calib, progress=False)
    assert torch.equal(logits(model), before)  # nothing changed


def test_activation_methods_refuse_a_routing_trace(root, tmp_path):
    from moeinfer.compress.calibration import CalibrationData, LayerCalibration

    _, model, _ = tiny("mixtral", root)
    trace = CalibrationData("trace.npz", 4, {b.layer_idx: LayerCalibration(b.layer_idx, None, torch.zeros(4, 2).long(),
                                                                               torch.full((4, 2), 0.5))
                                             for b in model.moe_blocks()})
    with pytest.raises(CompressionError, match="needs activations"):
        compress_(model, [{"method": "prune_naee", "keep": 4}], calibration=trace, progress=False)
