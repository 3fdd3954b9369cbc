"""The native CPU kernels (moeinfer/kernels/native) against the eager references, each instruction-set
variant forced by name: stacked bf16/fp32 experts at batch 1 (cpu kernel), packed int8/int4 experts
(QuantizedExperts, asymmetric RTN/HQQ groups of 128 and 32, symmetric Q8_0/Q4_0 groups of 32,
decode and prefill, fp32 activations; the int8-activation decode: test_kernels_native_q8.py), dense
linears; plus the fallback when the library is missing.

Tolerances: paths that compute in fp32 compare with a fp32 reference on the same weights at 1e-5 of
the output's scale (only the order of fp32 additions differs); bf16 outputs at one bf16 rounding
(2^-8 relative), so a 1% error fails everywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kernel_cases import make_problem
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.kernels import native
from moeinfer.kernels.cpu import cpu_moe
from moeinfer.kernels.cpu_native import ENGINES, choose_engine
from moeinfer.kernels import quantized_cpu
from moeinfer.kernels.quantized_cpu import quantized_moe_cpu
from moeinfer.kernels.reference import reference_moe
from moeinfer.model.moe import Routing
from native_helpers import experts_decode_and_prefill, native_ops, require, variant_params

BF16_RTOL = 2.0**-8


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """out (in `dtype`) against an fp32 reference; a 1% error fails for every dtype."""
    assert out.shape == ref.shape and out.dtype == dtype
    scale = float(ref.abs().max()) + 1e-6
    rtol = 1e-5 if dtype == torch.float32 else BF16_RTOL
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-5 * scale, rtol=rtol)


def test_a_one_percent_error_fails_the_check():
    ref = torch.linspace(-1, 1, 64)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(AssertionError):
            close((ref * 1.01).to(dtype), ref, dtype)


def test_every_variant_runs_or_says_why():
    native_ops()
    assert native.why_not("generic") is None
    for v in native.VARIANTS:
        why = native.why_not(v)
        assert why is None or "lacks the instructions" in why or "not in this build" in why
    assert native.best_variant() in native.VARIANTS
    with pytest.raises(ValueError, match="valid: generic, avx2, avx512, amx"):
        native.why_not("avx9000")
    with pytest.raises(ValueError, match="valid: torch, generic, avx2, avx512, amx"):
        choose_engine("fast")


def test_use_variant_sets_what_ops_left_to_choose_run():
    native_ops()
    fastest = native.best_variant()
    try:
        native.use_variant("generic")
        assert native.best_variant() == "generic" and choose_engine(None) == "generic"
        with pytest.raises(ValueError, match="unknown native variant 'avx9000'"):
            native.use_variant("avx9000")
    finally:
        native.use_variant(None)
    assert native.best_variant() == fastest


def test_a_variant_the_cpu_lacks_is_refused_with_the_reason(monkeypatch):
    native_ops()

    class NoAvx:
        def built(self, variant):
            return True

        def supports(self, variant):
            return variant == "generic"

    monkeypatch.setitem(native._state, "ops", NoAvx())
    with pytest.raises(ValueError, match="cannot run here: this CPU lacks the instructions of variant 'avx2'"):
        choose_engine("avx2")


def test_a_variant_the_compiler_rejects_is_left_out_of_the_build(tmp_path, monkeypatch):
    """An optional variant whose flags the compiler rejects (AMX needs GCC >= 11) is left out with a
    warning; the library still builds and loads, and why_not names the reason. Built into a temporary
    folder from the cached objects (the AMX object removed, its compile made to fail), loaded in a fresh
    process (one process cannot register the ops twice)."""
    native_ops()
    from moeinfer.kernels.native import build as b

    shutil.copytree(b.BUILD_DIR / "obj", tmp_path / "obj")
    for obj in (tmp_path / "obj").glob("kern_amx-*.o"):
        obj.unlink()
    monkeypatch.setattr(b, "BUILD_DIR", tmp_path)
    real_run = b._run

    def run(cmd, verbose):
        if "-mamx-tile" in cmd:
            raise RuntimeError("native kernel build failed (g++ -O3 ... exit 1):\nerror: unrecognized "
                               "command-line option '-mamx-tile'")
        real_run(cmd, verbose)

    monkeypatch.setattr(b, "_run", run)
    with pytest.warns(RuntimeWarning, match="(?s)native variant 'amx' left out of the build .*-mamx-tile"):
        lib = b.build()
    code = ("import json; from moeinfer.kernels import native; "
            "print(json.dumps({v: native.why_not(v) for v in native.VARIANTS}))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MOEINFER_NATIVE_LIB": str(lib)},
                          capture_output=True, text=True, check=True)
    why = json.loads(proc.stdout.splitlines()[-1])
    assert "variant 'amx' is not in this build" in why["amx"]
    assert why["generic"] is None and why["avx2"] == native.why_not("avx2")
    assert why["avx512"] == native.why_not("avx512")  # built: as the full library says


INTERLEAVED = ("avx2", "avx512", "amx")  # the variants whose GEMM takes activation rows interleaved by eight


def test_interleaved_gemms_give_the_same_bits_in_every_variant():
    """The avx2 tile (8 rows a vector), the avx512 one (16) and AMX tiles (16 weight rows x 8 activation
    rows a tdpbusd) sum each element's blocks in order with the same operations, so gemm_q and the
    experts' prefill give the same bits in each variant this CPU runs (avx2 is on every such CPU)."""
    ops = native_ops()
    here = [v for v in INTERLEAVED if native.why_not(v) is None]
    if len(here) < 2:
        pytest.skip(f"this CPU runs only {here} of {INTERLEAVED}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(21, 320, generator=g)
    for bits in (4, 8):
        qe = quantized_problem(bits, 32, "sym", d=320, i=96)
        stack = quantized_cpu._stack(qe, bits, midpoints=False)
        for zeros in (False, True):
            st = stack if zeros else (stack[0], stack[1], None, stack[3], stack[4], None)
            q, s, z = st[0][0], st[1][0], None if st[2] is None else st[2][0]
            outs = [(ops.gemm_q(x, q, s, z, bits, 32, v, "q8", None),
                     experts_decode_and_prefill(ops, st, bits, 320, 96, v, "q8")[1]) for v in here]
            for v, (y, pre) in zip(here[1:], outs[1:]):
                assert torch.equal(y, outs[0][0]) and torch.equal(pre, outs[0][1]), (bits, zeros, v)


# --- stacked bf16/fp32 experts, batch 1 (cpu kernel's decode) ---

@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,i", [(36, 20), (64, 32), (2048, 64)], ids=["unaligned", "aligned", "wide"])
@pytest.mark.parametrize("E,K,map_half", [(8, 2, False), (64, 8, False), (16, 4, True)])
def test_stacked_decode_matches_reference(variant, dtype, d, i, E, K, map_half):
    require(variant)
    p = make_problem(N=1, E=E, K=K, dtype=dtype, d=d, i=i, map_half=map_half)
    out = cpu_moe(*p.args(), expert_map=p.expert_map, engine=variant)
    ref = reference_moe(p.x.float(), p.indices, p.weights, p.gate_up.float(), p.down.float(),
                        expert_map=p.expert_map)
    close(out, ref, dtype)


def test_torch_engine_is_the_old_path():
    p = make_problem(N=1, E=8, K=2)
    out = cpu_moe(*p.args(), engine="torch")
    close(out, reference_moe(*p.args()), torch.float32)
    assert set(ENGINES) == {"torch", *native.VARIANTS}


# --- packed int8/int4 experts ---

SCHEMES = [(8, 128, "rtn"), (4, 128, "rtn"), (4, 128, "hqq"), (8, 32, "rtn"), (4, 32, "rtn"),
           (8, 32, "sym"), (4, 32, "sym")]


def quantized_problem(bits, group_size, algorithm, *, d, i, E=8, mixed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * i, d, generator=g) / d**0.5
    down = torch.randn(E, d, i, generator=g) / i**0.5
    widths = [bits if not mixed or e % 2 else 12 - bits for e in range(E)]
    return QuantizedExperts.from_float(gate_up, down, widths, group_size=group_size, algorithm=algorithm)


def routing(N, E, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]) if N else torch.empty(0, K).long()
    return Routing(indices=idx, weights=torch.rand(N, K, generator=g), logits=torch.zeros(N, E))


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("bits,group_size,algorithm", SCHEMES, ids=[f"{a}{b}g{g}" for b, g, a in SCHEMES])
@pytest.mark.parametrize("d,i", [(36, 20), (64, 32), (160, 96)], ids=["unaligned", "aligned", "wider"])
@pytest.mark.parametrize("N,path", [(1, "decode"), (2, "decode"), (5, "prefill"), (33, "decode"),
                                    (33, "prefill")])
def test_quantized_matches_eager(variant, bits, group_size, algorithm, d, i, N, path, monkeypatch):
    """Both the decode and the prefill path on every shape (the slot threshold forced either way)."""
    require(variant)
    monkeypatch.setattr(quantized_cpu, "DECODE_SLOTS_PER_EXPERT", 10**6 if path == "decode" else 0)
    if algorithm == "sym" and (d % group_size or i % group_size):
        d, i = 64, 32  # the symmetric formats need whole groups
    qe = quantized_problem(bits, group_size, algorithm, d=d, i=i)
    r = routing(N, 8, 3)
    x = torch.randn(N, d, generator=torch.Generator().manual_seed(2))
    out = quantized_moe_cpu(x, r.indices, r.weights, qe, engine=variant, activations="f32")
    close(out, qe.eager_forward(x, r), torch.float32)
    # bf16 activations: against the fp32 reference on the same (bf16-rounded) inputs
    xb = x.bfloat16()
    close(quantized_moe_cpu(xb, r.indices, r.weights, qe, engine=variant, activations="f32"),
          qe.eager_forward(xb.float(), r), torch.bfloat16)


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("N,path", [(1, "decode"), (9, "decode"), (9, "prefill")])
def test_quantized_mixed_widths(variant, N, path, monkeypatch):
    require(variant)
    monkeypatch.setattr(quantized_cpu, "DECODE_SLOTS_PER_EXPERT", 10**6 if path == "decode" else 0)
    qe = quantized_problem(4, 32, "rtn", d=64, i=48, mixed=True)
    assert sorted(set(qe.bits)) == [4, 8]
    r = routing(N, 8, 4)
    x = torch.randn(N, 64)
    close(quantized_moe_cpu(x, r.indices, r.weights, qe, engine=variant, activations="f32"), qe.eager_forward(x, r),
          torch.float32)


def test_quantized_forward_takes_the_native_path_and_can_be_forced_eager(monkeypatch):
    native_ops()
    qe = quantized_problem(4, 32, "sym", d=64, i=32)
    qe.cpu_activations = "f32"  # exact products (the int8-activation default: test_kernels_native_q8.py)
    r = routing(1, 8, 2)
    x = torch.randn(1, 64)
    ref = qe.eager_forward(x, r)
    monkeypatch.setattr(QuantizedExperts, "eager_forward", lambda self, x, routing: pytest.fail("eager ran"))
    close(qe(x, r), ref, torch.float32)
    monkeypatch.undo()
    qe.cpu_engine = "eager"
    calls = []
    monkeypatch.setattr(QuantizedExperts, "eager_forward", lambda self, x, routing: calls.append(1) or ref)
    qe(x, r)
    assert calls == [1]


def test_unsupported_widths_run_eager():
    native_ops()
    qe = quantized_problem(3, 32, "rtn", d=64, i=32, E=4)
    r = routing(2, 4, 2)
    x = torch.randn(2, 64)
    close(qe(x, r), qe.eager_forward(x, r), torch.float32)


def test_native_forward_keeps_the_checkpoint_format(tmp_path):
    """The native path reads the canonical storage in place: a quantized model saved after running it
    loads back with the same parameters and the same outputs."""
    import moeinfer
    from compress_quant_helpers import build_random, sample_ids

    native_ops()
    model = build_random("olmoe")
    moeinfer.compress_(model, "int4")
    ids = sample_ids(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(ids[:, :1])
        logits_prefill = model(ids)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    again = moeinfer.load(moeinfer.save(model, tmp_path / "q"), dtype="float32", progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())
    with torch.no_grad():
        torch.testing.assert_close(again(ids[:, :1]), logits, rtol=0, atol=0)
        torch.testing.assert_close(again(ids), logits_prefill, rtol=0, atol=0)


# --- fallback ---

def test_missing_library_warns_once_and_the_torch_paths_run(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEINFER_NATIVE_LIB", str(tmp_path / "absent.so"))
    monkeypatch.setattr(native, "_state", {})
    with pytest.warns(RuntimeWarning, match="not built"):
        assert native.load() is None
    assert native.load() is None  # once: the reason is remembered
    assert native.best_variant() is None and choose_engine(None) == "torch"
    p = make_problem(N=1, E=8, K=2)
    close(cpu_moe(*p.args()), reference_moe(*p.args()), torch.float32)
    qe = quantized_problem(8, 32, "rtn", d=64, i=32)
    r = routing(1, 8, 2)
    x = torch.randn(1, 64)
    close(qe(x, r), qe.eager_forward(x, r), torch.float32)
    with pytest.raises(ValueError, match="cannot run here: .*not built"):
        choose_engine("generic")


def test_build_without_a_compiler_says_so(monkeypatch):
    from moeinfer.kernels.native.build import build

    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler-xyz'"):
        build()


def test_importing_loads_nothing_native():
    import subprocess
    import sys

    code = ("import torch, moeinfer.kernels, moeinfer.formats.quantized_experts, moeinfer.kernels.linear\n"
            "from moeinfer.kernels import native\n"
            "assert native._state == {}, native._state\n"
            "assert not any('moeinfer_native' in str(l) for l in torch.ops.loaded_libraries)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
