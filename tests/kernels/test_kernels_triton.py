"""The fused Triton MoE against the eager reference. Without a GPU it runs in Triton's CPU
interpreter (TRITON_INTERPRET=1, set here before the kernels are defined), on small shapes."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernel_cases import make_problem, tolerance  # noqa: E402
from moeinfer.kernels import get_kernel  # noqa: E402
from moeinfer.kernels.align import align_slots, padded_capacity  # noqa: E402
from moeinfer.kernels.align_triton import align_for_kernel, align_slots_one_program, fits  # noqa: E402
from moeinfer.kernels.configs import KernelConfig, config_file_name, get_config  # noqa: E402
from moeinfer.kernels.fused_moe import fused_moe  # noqa: E402
from moeinfer.kernels.reference import reference_moe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter is slow: a subset of the grid that still covers every axis.
CASES = [  # E, K, N, dtype
    (8, 1, 1, torch.float32), (8, 2, 3, torch.float32), (8, 2, 257, torch.float32),
    (60, 6, 3, torch.float32), (64, 8, 64, torch.float32), (128, 8, 1, torch.float32),
    (128, 4, 257, torch.float32), (64, 2, 64, torch.float16), (8, 2, 64, torch.bfloat16),
    (60, 4, 3, torch.bfloat16),
]


def to_device(p):
    for f in ("x", "indices", "weights", "gate_up", "down", "expert_map"):
        if getattr(p, f) is not None:
            setattr(p, f, getattr(p, f).to(DEVICE))
    return p


def check(p, dtype, **kw):
    out = fused_moe(*p.args(), expert_map=p.expert_map, **kw)
    ref = reference_moe(*p.args(), expert_map=p.expert_map)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tolerance(ref, dtype), rtol=0)


@pytest.mark.parametrize("E,K,N,dtype", CASES)
def test_fused_matches_reference(E, K, N, dtype):
    check(to_device(make_problem(N=N, E=E, K=K, dtype=dtype)), dtype)


@pytest.mark.parametrize("E,K,N,hot", [(64, 4, 64, 5), (8, 2, 257, 2)])
def test_fused_idle_experts(E, K, N, hot):
    check(to_device(make_problem(N=N, E=E, K=K, hot=hot)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_expert_map(dtype):
    check(to_device(make_problem(N=33, E=60, K=4, dtype=dtype, map_half=True)), dtype)


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_fused_block_sizes(block_m):
    cfg = KernelConfig(block_m=block_m, block_n_gate_up=16, block_k_gate_up=16, block_n_down=32, block_k_down=16)
    check(to_device(make_problem(N=40, E=8, K=2, d=50, i=27)), torch.float32, config=cfg)


@pytest.mark.parametrize("gated", [False, True])
def test_fused_shared_expert(gated):
    p = to_device(make_problem(N=9, E=8, K=2))
    g = torch.Generator().manual_seed(1)
    Is, D = 28, p.x.shape[1]
    s_gu = (torch.randn(2 * Is, D, generator=g) / D**0.5).to(DEVICE)
    s_dn = (torch.randn(D, Is, generator=g) / Is**0.5).to(DEVICE)
    s_w = torch.rand(9, generator=g).to(DEVICE) if gated else None
    out = fused_moe(*p.args(), shared_gate_up=s_gu, shared_down=s_dn, shared_weight=s_w)
    gate, up = (p.x @ s_gu.T).chunk(2, -1)
    shared = (torch.nn.functional.silu(gate) * up) @ s_dn.T
    ref = reference_moe(*p.args()) + (shared if s_w is None else s_w[:, None] * shared)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_registry_triton_kernel():
    p = to_device(make_problem(N=3, E=8, K=2))
    torch.testing.assert_close(get_kernel("triton", DEVICE)(*p.args()), reference_moe(*p.args()),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("S,E,M", [(1, 8, 16), (7, 128, 16), (514, 64, 64), (0, 8, 16)])
def test_align_slots(S, E, M):
    g = torch.Generator().manual_seed(S)
    local = torch.randint(0, E + 1, (S,), generator=g)  # E = absent
    a = align_slots(local, E, M)
    assert a.slots.numel() == padded_capacity(S, E, M) == a.block_expert.numel() * M
    for b, e in enumerate(a.block_expert.tolist()):
        rows = a.slots[b * M:(b + 1) * M]
        real = rows[rows < S]
        if e < 0:
            assert real.numel() == 0
        else:
            assert (local[real.long()] == e).all()
    placed = a.slots[a.slots < S].sort().values
    assert torch.equal(placed.long(), (local < E).nonzero().flatten())  # every present slot once


@pytest.mark.parametrize("S,E,M", [(0, 8, 16), (1, 8, 16), (2, 8, 16), (16, 8, 16), (8, 64, 16), (7, 60, 32),
                                   (64, 128, 16), (128, 256, 16), (5, 3, 64)])
def test_one_program_align_equals_the_torch_ops(S, E, M):
    """The decode-sized Triton alignment gives exactly align_slots' slots and block experts."""
    g = torch.Generator().manual_seed(S * 31 + E)
    local = torch.randint(0, E + 1, (S,), generator=g).to(DEVICE)  # E = absent
    ref = align_slots(local, E, M)
    got = align_slots_one_program(local, E, M)
    assert torch.equal(got.slots, ref.slots) and torch.equal(got.block_expert, ref.block_expert)


def test_one_program_align_size_limit():
    assert fits(128, 256) and not fits(129, 8) and not fits(64, 1024)
    local = torch.randint(0, 9, (300,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with pytest.raises(ValueError, match="exceed one program"):
        align_slots_one_program(local, 8, 16)
    assert torch.equal(align_for_kernel(local, 8, 16).slots, align_slots(local, 8, 16).slots)  # torch ops


def test_config_lookup(tmp_path):
    table = {"1": KernelConfig(block_m=16).to_json(), "64": KernelConfig(block_m=64).to_json()}
    (tmp_path / config_file_name(E=8, N=20, K=36, device="cpu")).write_text(json.dumps(table))
    assert get_config(E=8, N=20, K=36, tokens=3, device="cpu", config_dir=tmp_path).block_m == 16
    assert get_config(E=8, N=20, K=36, tokens=40, device="cpu", config_dir=tmp_path).block_m == 64
    default = get_config(E=9, N=20, K=36, tokens=1, device="cpu", config_dir=tmp_path)
    assert default == get_config(E=9, N=20, K=36, tokens=1, device="cpu")  # shipped default.json
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(block_m=24)


@torch.no_grad()
def test_model_with_triton_kernel():
    import moeinfer
    from moeinfer.kernels import use_kernel_

    model = moeinfer.load("tiny", dtype="float32", device=DEVICE)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), device=DEVICE)
    ref = model(ids)
    use_kernel_(model, "triton")
    torch.testing.assert_close(model(ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # ~12 s under Triton's interpreter; test_model_with_triton_kernel keeps the kernel in the model
@torch.no_grad()
def test_static_decode_with_triton_kernel():
    """The graph-safe path without the graph: static step + fused kernel = ordinary greedy decode."""
    import moeinfer
    from moeinfer.engine.static_decode import StaticDecoder, static_decode_blocker
    from moeinfer.kernels import use_kernel_
    from moeinfer.model.kv_cache import KVCache

    model = moeinfer.load("tiny", dtype="float32", device=DEVICE)

    def greedy(static: bool) -> list[int]:
        cache = KVCache(model.config, batch_size=1, max_length=12, device=DEVICE)
        logits = model(torch.tensor([[5, 17, 99]], device=DEVICE), cache=cache)[:, -1]
        step = StaticDecoder(model, cache) if static else (
            lambda n, a: model(n[:, None], attention_mask=a, cache=cache)[:, -1])
        active = torch.ones(1, 1, dtype=torch.bool, device=DEVICE)
        out = []
        for _ in range(3):
            out.append(int(logits.argmax(-1)))
            logits = step(logits.argmax(-1), active)
        return out

    ref = greedy(static=False)
    use_kernel_(model, "triton")
    assert static_decode_blocker(model) is None
    assert greedy(static=True) == ref
