"""Dynamic gating: prefix-of-top-k modes against an eager reference, counters, saving, CLI option."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

import moeinfer
from compress_cases import ARCHS, logits, tiny
from moeinfer.compress import CompressionError, compress_
from moeinfer.model.counters import RoutingCounter
from moeinfer.model.gating import GatingError, GatingMode, parse_mode, set_routing_
from moeinfer.model.moe import route


def _reference(block, x, k):
    """Eager reference: each token's first k[n] slots, weights renormalised as the config says."""
    g = block.gate
    r = route(x, g.weight, g.cfg, g.e_score_correction_bias, top_k=g.top_k)
    ex = block.experts
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        w = r.weights[n, :k[n]]
        if g.cfg.norm_topk_prob:
            w = w / w.sum() * g.cfg.scaling
        for wk, e in zip(w, r.indices[n, :k[n]].tolist()):
            gate, up = F.linear(x[n], ex.gate_up_proj[e]).chunk(2)
            out[n] += wk * F.linear(F.silu(gate) * up, ex.down_proj[e])
    return out


@pytest.mark.parametrize("mode", ["top-p:0.6", "threshold:0.5", "entropy:0.9", "top-p:0.5:4"])
@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "deepseek_v3"])
def test_modes_match_the_eager_reference(arch, mode, root):
    _, model, calib = tiny(arch, root)
    block = model.moe_blocks()[-1]
    block.shared_expert = None
    block.gate.weight.data *= 4  # peakier routing than a random router's, so tokens differ in k
    x = calib.layer(block).x[:40]
    if arch == "deepseek_v3" and mode.startswith("top-p"):  # sigmoid scores spread mass over all experts
        mode = mode.replace("0.6", "0.25").replace("0.5", "0.3")
    if arch == "deepseek_v3" and mode.startswith("entropy"):  # normalised sigmoid scores stay near uniform
        mode = "threshold:0.9"
    set_routing_(model, mode)
    routing = block.gate(x)
    assert routing.k is not None and routing.k.min() >= 1 and routing.k.max() <= routing.indices.shape[1]
    assert len(routing.k.unique()) > 1
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, _reference(block, x, routing.k.tolist()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_settings_are_bit_identical_to_default(arch, root):
    _, model, _ = tiny(arch, root)
    before = logits(model)
    for mode in ("top-p:1.0", "threshold:0", "default"):
        set_routing_(model, mode)
        assert torch.equal(logits(model), before), mode
    set_routing_(model, "top-k:1")
    top1 = logits(model)
    for block in model.moe_blocks():
        block.gate.mode, block.gate.top_k = None, 1
    assert torch.equal(logits(model), top1)


def test_experts_per_token_counts_what_ran(root):
    """A routing counter (an observer) counts the experts each mode really ran; once removed it stops."""
    _, model, _ = tiny("mixtral", root)
    counter = RoutingCounter.attach(model)
    set_routing_(model, None)
    logits(model)
    assert counter.per_token() == 2.0 and counter.tokens > 0
    for mode, expect in (("top-k:1", lambda v: v == 1.0), ("threshold:0.9", lambda v: 1.0 <= v < 2.0)):
        counter.reset()
        set_routing_(model, mode)
        logits(model)
        assert expect(counter.per_token()), (mode, counter.per_token())
    counter.remove()
    tokens = counter.tokens
    logits(model)
    assert counter.tokens == tokens and not any(b.routing_observers for b in model.moe_blocks())


@pytest.mark.parametrize("text, match", [("top-q:0.5", "unknown routing mode"), ("top-p:1.5", "mass in"),
                                         ("top-k:0", "integer"), ("top-p", "NAME:VALUE"), ("entropy:x", "numbers"),
                                         ("threshold:-0.1", "ratio")])
def test_bad_modes_are_clear_errors(text, match):
    with pytest.raises(GatingError, match=match):
        parse_mode(text)


def test_top_k_larger_than_the_experts_is_refused(root):
    _, model, _ = tiny("mixtral", root)
    with pytest.raises(GatingError, match="only 8 experts"):
        set_routing_(model, "top-k:9")


def test_recipe_step_is_saved_and_reapplied_on_load(root, tmp_path):
    _, model, _ = tiny("qwen3_moe", root)
    report = compress_(model, [{"method": "gating", "mode": "top-p:0.5"}], progress=False)
    assert report.steps[0]["summary"] == {"mode": "top-p:0.5"} and report.hf_loadable
    gated = logits(model)
    again = moeinfer.load(moeinfer.save(model, tmp_path / "g"), progress=False)
    assert all(b.gate.mode == GatingMode("top-p", 0.5) for b in again.moe_blocks())
    assert torch.equal(logits(again), gated)
    with pytest.raises(CompressionError, match="mass in"):
        compress_(model, [{"method": "gating", "mode": "top-p:2"}])


def test_cli_option_sets_and_clears_the_mode(root):
    from moeinfer.cli.options import routing

    _, model, _ = tiny("mixtral", root)
    p = argparse.ArgumentParser()
    routing.add_args(p)
    routing.apply_(model, p.parse_args(["--routing", "entropy:0.8"]))
    assert model.moe_blocks()[0].gate.mode == GatingMode("entropy", 0.8)
    assert model.config.hf_config["moeinfer_routing"] == "entropy:0.8"
    routing.apply_(model, p.parse_args([]))  # no flag: the mode stays
    assert model.moe_blocks()[0].gate.mode is not None
    routing.apply_(model, p.parse_args(["--routing", "default"]))
    assert model.moe_blocks()[0].gate.mode is None and "moeinfer_routing" not in model.config.hf_config


def test_gated_tokens_run_through_a_fast_kernel_as_through_the_reference(root):
    """Tokens grouped by k go through whatever experts stage the block has: the cpu kernel agrees."""
    from moeinfer.kernels import use_kernel_

    _, model, calib = tiny("mixtral", root)
    block = model.moe_blocks()[-1]
    block.gate.weight.data *= 4
    x = calib.layer(block).x[:40]
    set_routing_(model, "threshold:0.5")
    assert len(block.gate(x).k.unique()) > 1
    with torch.no_grad():
        want = block(x)
        use_kernel_(model, "cpu")
        got = block(x)
        use_kernel_(model, "reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
