"""Offloading with a GPU fast tier: pinned host tier and disk tier over the copy stream (needs CUDA)."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import generate_with_logits, random_mixtral

from moeinfer.offload import OffloadConfig, offload_

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPT = [3, 17, 99, 42, 7, 64]


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("prefetch", ["none", "next-layer"])
def test_gpu_cache_is_exact(tier, prefetch, tmp_path):
    ref, ref_logits = generate_with_logits(random_mixtral().cuda(), PROMPT, 10)
    model = random_mixtral().cuda()
    offload_(model, OffloadConfig(tier=tier, offload_dir=tmp_path, cache=3, prefetch=prefetch, cpu_assist=True))
    assert model.offload.slot_gate_up.is_cuda
    if tier == "cpu":
        assert model.offload.store.layers[0][0].is_pinned()
    tokens, logits = generate_with_logits(model, PROMPT, 10)
    assert tokens == ref
    # fp32 throughout; CPU-assisted experts sum in another order than the GPU's: a tolerance tied to fp32
    # that a 1% error exceeds by far
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert model.offload.stats.extra["cost_model"].link_bytes_per_s > 0
    model.offload.close()
