"""Offloading with a GPU fast tier: pinned host tier and disk tier over the copy stream (needs CUDA)."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import random_mixtral

import moeinfer
from moeinfer.offload import OffloadConfig, offload_

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPT = [3, 17, 99, 42, 7, 64]


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("prefetch", ["none", "next-layer"])
def test_gpu_cache_is_exact(tier, prefetch, tmp_path):
    ref = moeinfer.generate(random_mixtral().cuda(), [PROMPT], max_new_tokens=10)[0].token_ids
    model = random_mixtral().cuda()
    offload_(model, OffloadConfig(tier=tier, offload_dir=tmp_path, cache=3, prefetch=prefetch, cpu_assist=True))
    assert model.offload.slot_gate_up.is_cuda
    if tier == "cpu":
        assert model.offload.store.layers[0][0].is_pinned()
    assert moeinfer.generate(model, [PROMPT], max_new_tokens=10)[0].token_ids == ref
    assert model.offload.stats.extra["cost_model"].link_bytes_per_s > 0
    model.offload.close()
