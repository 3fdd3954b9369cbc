"""The MoE block's plug-in surface (moeinfer/model/moe.py): observers attached with handles, routing
transforms as an ordered list, every experts module an ExpertStage, kernels asked of the stage."""

from __future__ import annotations

import pytest
import torch

import moeinfer
from moeinfer.engine.static_decode import static_decode_blocker
from moeinfer.formats.lowrank_experts import LowRankExperts
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.kernels import use_kernel_
from moeinfer.model.gating import set_routing_
from moeinfer.model.moe import ExpertStage, Experts, MergedExperts


@pytest.fixture
def model(tiny_fp32):
    return tiny_fp32


def _ids() -> torch.Tensor:
    return torch.randint(0, 200, (2, 6))


def test_observer_handles_remove_exactly_their_observer_in_any_order(model) -> None:
    seen: dict[str, int] = {"a": 0, "b": 0, "c": 0}

    def counter(name):
        def fn(layer, routing):
            seen[name] += 1
        return fn

    ha, hb = model.add_routing_observer(counter("a")), model.add_routing_observer(counter("b"))
    hc = model.moe_blocks()[0].add_routing_observer(counter("c"))
    with torch.no_grad():
        model(_ids())
    L = len(model.moe_blocks())
    assert seen == {"a": L, "b": L, "c": 1}
    ha.remove()  # the first attached goes; the later ones stay
    with torch.no_grad():
        model(_ids())
    assert seen == {"a": L, "b": 2 * L, "c": 2}
    hc.remove()
    hb.remove()
    hb.remove()  # removing twice is harmless
    assert all(not b.routing_observers for b in model.moe_blocks())


def test_token_observer_handle(model) -> None:
    calls = []
    h = model.add_token_observer(lambda valid, positions, new: calls.append(valid.shape))
    with torch.no_grad():
        model(_ids())
    h.remove()
    with torch.no_grad():
        model(_ids())
    assert calls == [torch.Size([2, 6])] and model.token_observer is None


def test_routing_transforms_are_ordered_whatever_the_order_applied(model) -> None:
    x = torch.randn(7, model.config.hidden_size)
    first, second = (moeinfer.load("tiny", dtype="float32", progress=False) for _ in range(2))
    set_routing_(first, "threshold:1.0")
    first.moe_blocks()[0].gate.mask_expert(3)
    second.moe_blocks()[0].gate.mask_expert(3)
    set_routing_(second, "threshold:1.0")
    g1, g2 = first.moe_blocks()[0].gate, second.moe_blocks()[0].gate
    assert [t.name for t in g1.transforms] == [t.name for t in g2.transforms] == ["mask", "gating"]
    r1, r2 = g1(x), g2(x)
    assert r1.k is not None and r2.k is not None
    assert torch.equal(r1.indices, r2.indices) and torch.equal(r1.weights, r2.weights) and torch.equal(r1.k, r2.k)
    assert not bool((r1.indices[:, 0] == 3).any())  # the masked expert is never first choice
    g1.expert_map = torch.arange(g1.weight.shape[0])
    assert [t.name for t in g1.transforms] == ["mask", "gating", "merge"]
    assert isinstance(g1.get_transform("merge"), MergedExperts)
    g1.available = None
    set_routing_(first, None)
    assert [t.name for t in g1.transforms] == ["merge"]


def test_graph_capture_asks_the_stages(model) -> None:
    assert "(kernel 'reference')" in static_decode_blocker(model)
    for b in model.moe_blocks():
        b.experts.kernel_graph_safe = True  # what use_kernel_(model, 'triton') sets on a GPU
    assert static_decode_blocker(model) is None
    block = model.moe_blocks()[0]
    block.gate.expert_map = torch.arange(block.gate.weight.shape[0])  # merged experts fold on the host
    assert "merge" in static_decode_blocker(model)
    block.gate.expert_map = None
    h = block.add_routing_observer(lambda layer, routing: None)
    assert "observer" in static_decode_blocker(model)
    h.remove()
    assert static_decode_blocker(model) is None


def test_every_experts_module_is_an_expert_stage(model) -> None:
    assert isinstance(model.moe_blocks()[0].experts, ExpertStage)
    moeinfer.compress_(model, [{"method": "quantize", "bits": 8}], progress=False)
    assert all(isinstance(b.experts, QuantizedExperts) and isinstance(b.experts, ExpertStage)
               for b in model.moe_blocks())
    assert isinstance(LowRankExperts([2], [2], 8, 4), ExpertStage)


def test_kernel_choice_is_asked_of_the_stage_and_survives_compression(model) -> None:
    use_kernel_(model, "cpu")
    for b in model.moe_blocks():
        fresh = Experts(b.experts.num_experts, model.config.hidden_size, model.config.moe_intermediate_size)
        fresh.load_state_dict(b.experts.state_dict())
        b.experts = fresh
    assert {b.experts.kernel for b in model.moe_blocks()} == {"reference"}  # swapped in, as a method would
    moeinfer.compress_(model, [{"method": "gating", "mode": "top-k:2"}], progress=False)
    assert {b.experts.kernel for b in model.moe_blocks()} == {"cpu"}  # compress_ re-applied the choice
    moeinfer.compress_(model, [{"method": "quantize", "bits": 8}], progress=False)
    assert {b.experts.kernel for b in model.moe_blocks()} == {"cpu"}  # quantized experts run 'cpu' natively
    use_kernel_(model, "reference")
    block = model.moe_blocks()[0]
    assert block.experts.kernel == "reference"
    x = torch.randn(5, model.config.hidden_size)
    routing = block.gate(x)
    assert torch.equal(block.experts(x, routing), block.experts.eager_forward(x, routing))


def test_logits_to_keep_gives_the_last_positions(tiny_fp32_shared):
    """transformers' `logits_to_keep`: the last n positions' logits, as the full forward gives them
    (up to the matmul's row blocking), and a clear error for a negative n."""
    model = tiny_fp32_shared
    ids = torch.arange(3, 30).reshape(1, -1)
    with torch.no_grad():
        full = model(ids)
        for n in (1, 5):
            last = model(ids, logits_to_keep=n)
            assert last.shape == (1, n, model.config.vocab_size)
            torch.testing.assert_close(last, full[:, -n:], rtol=1e-5, atol=1e-5)
        assert torch.equal(model(ids, logits_to_keep=0), full)
        with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
            model(ids, logits_to_keep=-1)
