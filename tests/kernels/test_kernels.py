"""MoE kernels against the eager reference (moeinfer/model/moe.py): the `cpu` backend over the
issue's grid, the registry's errors, and kernel selection on a model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kernel_cases import make_problem, tolerance
from native_helpers import require
from moeinfer.kernels import KernelUnavailableError, get_kernel, native, resolve, use_kernel_
from moeinfer.kernels.cpu import SCHEDULES, cpu_moe, one_expert
from moeinfer.kernels.reference import reference_moe

GRID = [(E, K) for E in (8, 60, 64, 128) for K in (1, 2, 4, 6, 8) if K <= E]


def check(name: str, p, dtype: torch.dtype) -> None:
    out = get_kernel(name)(*p.args(), expert_map=p.expert_map)
    ref = reference_moe(*p.args(), expert_map=p.expert_map)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tolerance(ref, dtype), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 3, 64, 257])
@pytest.mark.parametrize("E,K", GRID)
def test_cpu_matches_reference(E, K, N, dtype):
    check("cpu", make_problem(N=N, E=E, K=K, dtype=dtype), dtype)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,i", [(36, 20), (64, 32)], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("E,K,N,hot", [(8, 2, 3, None), (64, 4, 64, 5), (60, 8, 257, None)])
def test_every_cpu_schedule_matches_reference(schedule, dtype, d, i, E, K, N, hot):
    """Each schedule forced, whatever this CPU would choose, on shapes that torch._grouped_mm's
    16-byte stride rule accepts and refuses in half precision (where 'grouped' must fall back)."""
    p = make_problem(N=N, E=E, K=K, dtype=dtype, hot=hot, d=d, i=i)
    out = cpu_moe(*p.args(), schedule=schedule)
    ref = reference_moe(*p.args())
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tolerance(ref, dtype), rtol=0)


def test_schedule_choice_follows_the_cpu_and_the_shape(monkeypatch):
    from moeinfer.kernels import cpu

    monkeypatch.setattr(cpu, "slow_half_matmul", lambda dtype: dtype != torch.float32)
    monkeypatch.setattr(cpu.native, "best_variant", lambda: "generic")
    assert cpu.choose_schedule(torch.bfloat16, 64, 32) == "rows"
    assert cpu.choose_schedule(torch.float16, 64, 32) == "widened"
    monkeypatch.setattr(cpu.native, "best_variant", lambda: None)  # no native library
    assert cpu.choose_schedule(torch.bfloat16, 64, 32) == "widened"
    monkeypatch.setattr(cpu, "slow_half_matmul", lambda dtype: False)
    monkeypatch.setattr(cpu, "grouped_mm_works", lambda dtype, d, i: d % 8 == 0 and i % 8 == 0)
    assert cpu.choose_schedule(torch.float32, 64, 32) == "grouped"
    assert cpu.choose_schedule(torch.float32, 36, 20) == "per-expert"
    assert cpu.choose_schedule(torch.bfloat16, 64, 32) == "per-expert"  # a native half matmul: F.linear per expert
    with pytest.raises(ValueError, match="valid: grouped, per-expert, widened, rows"):
        p = make_problem(N=3, E=8, K=2)
        cpu_moe(*p.args(), schedule="fast")


@pytest.mark.parametrize("engine", ["torch", *native.VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,i", [(36, 20), (64, 32)], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("E,K,N,hot,half_map", [(8, 2, 3, None, False), (64, 4, 64, 5, False), (60, 8, 33, None, True)])
def test_rows_schedule_every_engine_matches_reference(engine, dtype, d, i, E, K, N, hot, half_map):
    """The native "rows" schedule with each variant forced (and its fallbacks: engine 'torch', fp16
    weights), with idle experts and experts not held here (an expert map)."""
    if engine != "torch":
        require(engine)
    p = make_problem(N=N, E=E, K=K, dtype=dtype, hot=hot, d=d, i=i, map_half=half_map)
    out = cpu_moe(*p.args(), expert_map=p.expert_map, schedule="rows", engine=engine)
    ref = reference_moe(*p.args(), expert_map=p.expert_map)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tolerance(ref, dtype), rtol=0)


def test_grouped_mm_probe_uses_the_real_shapes():
    """The probe must answer for the shapes the kernel passes (the CI failure: aligned probe, unaligned
    model); a shape torch refuses in the probe is one it refuses in the kernel, never an exception."""
    from moeinfer.kernels.cpu import grouped_mm_works

    for dtype in (torch.float32, torch.bfloat16):
        for d, i in ((36, 20), (64, 32)):
            works = grouped_mm_works(dtype, d, i)
            p = make_problem(N=5, E=4, K=2, dtype=dtype, d=d, i=i)
            offs = torch.tensor([2, 4, 7, 10], dtype=torch.int32)
            try:
                torch._grouped_mm(p.x.repeat(2, 1), p.gate_up.transpose(1, 2), offs=offs)
                torch._grouped_mm(torch.ones(10, i, dtype=dtype), p.down.transpose(1, 2), offs=offs)
                ran = True
            except RuntimeError:
                ran = False
            assert works == ran, (dtype, d, i)


@pytest.mark.parametrize("N", [1, 64, 257])
@pytest.mark.parametrize("E,K,hot", [(8, 2, 2), (64, 4, 5), (128, 8, 8)])
def test_cpu_idle_experts(E, K, hot, N):
    """Only `hot` experts receive tokens: empty groups in the grouped GEMM (fp32) and skipped experts
    in the per-expert schedule (bf16 on CPUs without native bf16 matmul)."""
    check("cpu", make_problem(N=N, E=E, K=K, hot=hot), torch.float32)
    check("cpu", make_problem(N=N, E=E, K=K, hot=hot, dtype=torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,K,N", [(8, 2, 1), (8, 2, 257), (60, 4, 3), (128, 8, 64)])
def test_cpu_expert_map(E, K, N, dtype):
    check("cpu", make_problem(N=N, E=E, K=K, dtype=dtype, map_half=True), dtype)


def test_reference_expert_map_drops_absent_experts():
    p = make_problem(N=5, E=8, K=2, map_half=True)
    out = reference_moe(*p.args(), expert_map=p.expert_map)
    # The same problem with the absent experts' weights zeroed, computed without a map.
    full_gu = torch.zeros(8, *p.gate_up.shape[1:])
    full_dn = torch.zeros(8, *p.down.shape[1:])
    full_gu[::2], full_dn[::2] = p.gate_up, p.down
    torch.testing.assert_close(out, reference_moe(p.x, p.indices, p.weights, full_gu, full_dn))


def test_cpu_all_experts_absent_gives_zero():
    p = make_problem(N=4, E=8, K=2)
    out = get_kernel("cpu")(*p.args(), expert_map=torch.full((8,), -1))
    assert torch.equal(out, torch.zeros_like(out))


def test_unknown_kernel_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: auto, cpu, reference, triton"):
        resolve("fast", "cpu")


def test_triton_on_cpu_says_why(monkeypatch):
    from moeinfer.kernels.triton_backend import triton_unavailable

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = triton_unavailable(torch.device("cpu"))
    assert why is not None and ("CUDA" in why or "not installed" in why)
    if "CUDA" in why:
        with pytest.raises(KernelUnavailableError, match="unavailable on cpu: .*TRITON_INTERPRET"):
            resolve("triton", "cpu")


def test_auto_on_cpu_is_cpu():
    assert resolve("auto", "cpu").name == "cpu"


def test_import_touches_no_triton():
    code = ("import sys, moeinfer, moeinfer.kernels, moeinfer.cli.options.kernel; "
            "moeinfer.kernels.resolve('auto', 'cpu'); assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def tiny(tiny_fp32_shared):
    return tiny_fp32_shared


@pytest.mark.parametrize("fp32_weights", [False, True])
def test_use_kernel_on_model_matches_reference(tiny, fp32_weights):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 9))
    ref = tiny(ids)
    try:
        use_kernel_(tiny, "cpu", fp32_weights=fp32_weights)
        assert {b.experts.kernel for b in tiny.moe_blocks()} == {"cpu"}
        torch.testing.assert_close(tiny(ids), ref, atol=1e-4, rtol=1e-4)
    finally:
        use_kernel_(tiny, "reference")
    assert all(b.experts.kernel_fn is None for b in tiny.moe_blocks())


def test_fp32_weights_on_bf16_model():
    import moeinfer

    model = moeinfer.load("tiny")  # bf16
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    ref = model(ids).float()
    use_kernel_(model, "cpu", fp32_weights=True)
    experts = model.moe_blocks()[0].experts
    assert experts.compute_weights is not None and experts.compute_weights[0].dtype == torch.float32
    out = model(ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_cli_option(tiny):
    import argparse

    from moeinfer.cli.options import kernel

    p = argparse.ArgumentParser()
    kernel.add_args(p)
    assert p.parse_args([]).kernel == "auto"
    try:
        kernel.apply_(tiny, p.parse_args(["--kernel", "cpu"]))
        assert {b.experts.kernel for b in tiny.moe_blocks()} == {"cpu"}
        with pytest.raises(SystemExit):
            p.parse_args(["--kernel", "nope"])
    finally:
        use_kernel_(tiny, "reference")


def test_cpu_kernel_only_on_cpu():
    with pytest.raises(KernelUnavailableError, match="'cpu' is unavailable on meta: it runs on CPU tensors"):
        resolve("cpu", "meta")


def test_auto_kernel_leaves_compressed_experts_alone_and_explicit_kernels_say_why() -> None:
    import moeinfer
    from moeinfer.kernels import use_kernel_

    model = moeinfer.load("tiny", dtype="float32", progress=False)
    moeinfer.compress_(model, [{"method": "quantize", "bits": 8}], progress=False)
    assert use_kernel_(model, "auto") is model and use_kernel_(model, "reference") is model
    assert use_kernel_(model, "cpu") is model  # quantized experts run the native CPU kernels
    lowrank = moeinfer.load("tiny", dtype="float32", progress=False)
    moeinfer.compress_(lowrank, [{"method": "lowrank", "keep": 0.5}], progress=False)
    assert use_kernel_(lowrank, "auto") is lowrank
    with pytest.raises(ValueError, match="LowRankExperts, which run their own expert stage"):
        use_kernel_(lowrank, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_in_chunks_gives_the_whole_products_bits(dtype, monkeypatch):
    """The cpu kernel's combine runs in chunks of token rows (cpu.COMBINE_BYTES); every row's weighted sum
    is the same operations in the same order, so any chunking gives the bits of one whole product."""
    from moeinfer.kernels import cpu

    p = make_problem(N=37, E=8, K=3, dtype=dtype)
    whole = cpu_moe(*p.args(), schedule="per-expert")
    monkeypatch.setattr(cpu, "COMBINE_BYTES", 4 * 3 * p.x.shape[1] * 5)  # chunks of 5 rows, the last of 2
    assert torch.equal(cpu_moe(*p.args(), schedule="per-expert"), whole)
    g = torch.Generator().manual_seed(1)
    y, w = torch.randn(37, 3, 16, generator=g).to(dtype), torch.rand(37, 3, generator=g)
    ref = (y.double() * w.double()[..., None]).sum(1)
    # one rounding to the dtype at the end (fp32 sums of 3 terms: ~1e-7), so a 1% error fails
    rtol = 2.0**-8 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(cpu.combine(y, w, dtype).double(), ref, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("N", [3, 37])
def test_padded_half_experts_match_the_unpadded_ones(N, monkeypatch):
    """The per-expert schedule pads a half-precision expert's rows to cpu.PAD_ROWS (big experts only:
    cpu.PAD_MIN_WEIGHTS, lowered here) and cuts the zero rows off: the output is the unpadded one's
    within one bf16 rounding (the GEMM may block K differently for another row count), so a 1% error
    fails; and both match the reference at the file's bf16 tolerance."""
    from moeinfer.kernels import cpu

    p = make_problem(N=N, E=8, K=2, dtype=torch.bfloat16)
    unpadded = cpu_moe(*p.args(), schedule="per-expert")
    monkeypatch.setattr(cpu, "PAD_MIN_WEIGHTS", 0)
    padded = cpu_moe(*p.args(), schedule="per-expert")
    scale = float(unpadded.float().abs().max())
    torch.testing.assert_close(padded.float(), unpadded.float(), rtol=2.0**-8, atol=1e-3 * scale)
    with pytest.raises(AssertionError):
        torch.testing.assert_close((padded.float() * 1.01), unpadded.float(), rtol=2.0**-8, atol=1e-3 * scale)
    ref = reference_moe(p.x.float(), p.indices, p.weights, p.gate_up.float(), p.down.float())
    torch.testing.assert_close(padded.float(), ref, atol=tolerance(ref, torch.bfloat16), rtol=0)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("n", [1, 5, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("schedule", [None, *SCHEDULES])
def test_one_expert_gives_the_bits_of_cpu_moe_routing_every_row_to_it(schedule, dtype, n, pad, monkeypatch):
    """`one_expert` (an offload cache's call per expert) equals `cpu_moe` with every row routed to that one
    expert at weight 1, bit for bit, on every schedule forced (and the CPU's own choice), on rows taken
    at an offset of a bigger tensor as the offloaded layer takes them, with the padding of big half
    experts on and off; and both match the eager reference (fp32: a 1% error fails)."""
    from moeinfer.kernels import cpu

    if pad:
        monkeypatch.setattr(cpu, "PAD_MIN_WEIGHTS", 0)
    p = make_problem(N=n + 3, E=1, K=1, dtype=dtype)
    x, gate_up, down = p.x[3:], p.gate_up, p.down
    route, weight = torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1)
    got = one_expert(x, gate_up[0], down[0], schedule=schedule)
    assert torch.equal(got, cpu_moe(x, route, weight, gate_up, down, schedule=schedule))
    ref = reference_moe(x.float(), route, weight, gate_up.float(), down.float())
    torch.testing.assert_close(got.float(), ref, atol=tolerance(ref, dtype), rtol=0)
    if dtype == torch.float32:
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got * 1.01, ref, atol=tolerance(ref, dtype), rtol=0)
    with pytest.raises(ValueError, match="unknown cpu schedule 'fast'"):
        one_expert(x, gate_up[0], down[0], schedule="fast")
