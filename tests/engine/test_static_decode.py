"""Static-shape decode (moeinfer/engine/static_decode.py): on the CPU the static step must give the
same greedy tokens as the ordinary decode; CUDA-graph capture is checked on the GPU."""

from __future__ import annotations

import pytest
import torch

from decode_helpers import left_padded_prefill

import moeinfer
from moeinfer.engine.static_decode import StaticDecoder, decode_step, static_decode_blocker
from moeinfer.kernels import use_kernel_
from moeinfer.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def tiny(tiny_fp32_shared):
    return tiny_fp32_shared


def greedy(model, prompts, steps, *, static, cuda_graph=False, finish_row0_at=2):
    """Left-padded prefill, then `steps` greedy tokens; returns tokens [B, steps] and last logits.
    Row 0 is marked finished after `finish_row0_at` steps (None: never), exercising padded rows."""
    device = model.device
    B = len(prompts)
    cache, logits = left_padded_prefill(model, prompts, steps)
    decode = (StaticDecoder(model, cache, cuda_graph=cuda_graph) if static
              else lambda n, a: model(n[:, None], attention_mask=a, cache=cache)[:, -1])
    out = []
    active = torch.ones(B, 1, dtype=torch.bool, device=device)
    for i in range(steps):
        nxt = logits.argmax(-1)
        out.append(nxt)
        if i == finish_row0_at:
            active[0] = False  # row 0 finished: its later tokens count as padding
        logits = decode(nxt, active)
    return torch.stack(out, 1), logits


@torch.no_grad()
def test_static_step_same_greedy_tokens(tiny):
    prompts = [[5, 17, 99, 3, 250], [7, 8]]
    ref_tokens, ref_logits = greedy(tiny, prompts, 12, static=False)
    tokens, logits = greedy(tiny, prompts, 12, static=True)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_static_step_with_cpu_kernel(tiny):
    try:
        use_kernel_(tiny, "cpu")
        a, _ = greedy(tiny, [[1, 2, 3]], 6, static=True)
    finally:
        use_kernel_(tiny, "reference")
    b, _ = greedy(tiny, [[1, 2, 3]], 6, static=False)
    assert torch.equal(a, b)


@torch.no_grad()
def test_static_decoder_checks(tiny):
    cache = KVCache(tiny.config, batch_size=2, max_length=4)
    cache.lengths[0] = 1
    with pytest.raises(ValueError, match="same length"):
        StaticDecoder(tiny, cache)
    full = KVCache(tiny.config, batch_size=1, max_length=2)
    tiny(torch.tensor([[1, 2]]), cache=full)
    with pytest.raises(ValueError, match="overflow"):
        StaticDecoder(tiny, full)(torch.tensor([3]), torch.ones(1, 1, dtype=torch.bool))


def test_blocker_and_cpu_fallback(tiny):
    assert "reference" in static_decode_blocker(tiny)
    cache = KVCache(tiny.config, batch_size=1, max_length=4)
    assert not isinstance(decode_step(tiny, cache), StaticDecoder)  # CPU: the ordinary forward


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_cuda_graph_decode_same_tokens():
    model = moeinfer.load("tiny", device="cuda", dtype="bfloat16")
    use_kernel_(model, "triton")
    assert static_decode_blocker(model) is None
    prompts = [[5, 17, 99, 3, 250], [7, 8]]
    ref, ref_logits = greedy(model, prompts, 16, static=True, cuda_graph=False)
    tokens, logits = greedy(model, prompts, 16, static=True, cuda_graph=True)
    assert torch.equal(tokens, ref)
    assert torch.equal(logits, ref_logits)  # a graph replays the same kernels: bit-identical
    out = moeinfer.generate(model, ["Once upon a time"], max_new_tokens=8)[0]
    ids = model.tokenizer.encode("Once upon a time")
    want, _ = greedy(model, [ids], 8, static=True, cuda_graph=False, finish_row0_at=None)
    assert out.token_ids == want[0].tolist()[:len(out.token_ids)]
    assert len(out.token_ids) == 8 or out.finish_reason == "eos"
