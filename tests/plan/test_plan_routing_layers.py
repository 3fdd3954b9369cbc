"""`moeinfer.planning.routing.layers`: a real 32-layer routing trace cut to the MoE layers of a model
with fewer layers (the planner benchmark's real-shape models replay it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from offload_helpers import random_mixtral

from moeinfer.offload.replay import replay_routing_
from moeinfer.planning import routing as routes
from moeinfer.traces.convert import convert_mixtral

MIXTRAL = Path(__file__).resolve().parents[1] / "data" / "traces" / "mixtral-8x7b-instruct" / "gsm8k_routing_trimmed.jsonl"


def test_layers_keeps_the_chosen_columns_in_order():
    tr = routes.uniform(num_layers=5, num_experts=8, top_k=2, sequences=2, tokens=4)
    cut = routes.layers(tr, [3, 0])
    assert cut.num_layers == 2 and list(cut.layers) == [0, 1]
    assert np.array_equal(cut.experts[:, 0], tr.experts[:, 3]) and np.array_equal(cut.experts[:, 1], tr.experts[:, 0])
    assert np.array_equal(cut.weights[:, 0], tr.weights[:, 3])
    assert np.array_equal(cut.seq, tr.seq) and np.array_equal(cut.pos, tr.pos)
    assert cut.meta["layers_kept"] == [3, 0]


@pytest.mark.parametrize("ids", [[], [5], [-1, 0]])
def test_layers_out_of_range_is_refused(ids):
    tr = routes.uniform(num_layers=5, num_experts=8, top_k=2, sequences=1, tokens=2)
    with pytest.raises(ValueError, match="0..4"):
        routes.layers(tr, ids)


def test_a_real_mixtral_trace_cut_to_two_layers_replays_on_a_two_layer_model():
    real = convert_mixtral(MIXTRAL)
    cut = routes.layers(real, [0, 1])
    model = random_mixtral(layers=2, experts=8, top_k=2)
    replay_routing_(model, cut)
    got = []
    handles = [b.gate.register_forward_hook(lambda m, a, out: got.append(out.indices.clone()))
               for b in model.moe_blocks()]
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    for h in handles:
        h.remove()
    assert len(got) == 2
    for layer, idx in enumerate(got):
        assert torch.equal(idx, torch.from_numpy(real.experts[:3, layer].astype("int64")))
