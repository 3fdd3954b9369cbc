"""MoEModel.forward's shortcut for unpadded rows on the CPU (`unpadded_on_cpu`): positions taken as the
slots and, for one new token per row, no mask built. It must give exactly the logits of the general path
(count the real tokens, build every mask, drop the ones that hide nothing), step after step of decode,
for every attention kind and sliding windows shorter and longer than the context, on the eager model
and under the CPU kernels."""

from __future__ import annotations

import pytest
import torch

from compress_quant_helpers import build_random
from moeinfer.kernels import use_kernel_
from moeinfer.model import transformer
from moeinfer.model.kv_cache import KVCache
from native_helpers import native_ops


def decode(model, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Logits of a left-padded prefill and `steps` greedy decode steps over a KV cache, then a forward
    without a cache of the first prompt."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
    cache = KVCache(model.config, batch_size=len(prompts), max_length=T + steps + 1, dtype=model.dtype)
    with torch.no_grad():
        out = [model(ids, attention_mask=mask, cache=cache)[:, -1]]
        for _ in range(steps):
            out.append(model(out[-1].argmax(-1)[:, None], cache=cache)[:, -1])
        out.append(model(torch.tensor([prompts[0]])))
    return out


def both_paths(model, prompts, monkeypatch, steps: int = 6) -> int:
    """Assert the shortcut's logits equal the general path's; return how many forwards took it."""
    taken = []
    real = transformer.unpadded_on_cpu
    monkeypatch.setattr(transformer, "unpadded_on_cpu", lambda *a: taken.append(real(*a)) or taken[-1])
    fast = decode(model, prompts, steps)
    monkeypatch.setattr(transformer, "unpadded_on_cpu", lambda *a: False)
    general = decode(model, prompts, steps)
    for a, b in zip(fast, general):
        assert torch.equal(a, b)
    return taken.count(True)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen3_moe", "deepseek_v2"])
@pytest.mark.parametrize("window", [None, 4, 64])
def test_unpadded_decode_equals_the_general_path(arch, window, monkeypatch):
    model = build_random(arch)
    for layer in model.layers:
        layer.window = window
    # prefill, 6 decode steps, the cache-less forward: all unpadded
    assert both_paths(model, [list(range(3, 14))], monkeypatch) == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shipped_model_under_cpu_kernels(tiny_fp32, dtype, monkeypatch):
    native_ops()
    model = tiny_fp32.to(dtype)
    use_kernel_(model, "cpu", linears=True)
    assert both_paths(model, [list(range(5, 25))], monkeypatch, steps=8) == 10


def test_padded_rows_take_the_general_path(monkeypatch):
    model = build_random("mixtral")
    # a left-padded batch: only the cache-less forward of one prompt takes the shortcut
    assert both_paths(model, [list(range(3, 14)), list(range(3, 8))], monkeypatch) == 1
