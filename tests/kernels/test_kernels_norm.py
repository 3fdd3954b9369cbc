"""use_cpu_norms_: the native rms_norm against moeinfer.model.norm.RMSNorm (the eager reference) on the
same weights. fp32: the same formula up to the order of the sum of squares (rtol 1e-5; a 1% error
fails). bf16: the reference's two roundings (the normalised row cast to bf16, then the product with
the weight) are reproduced, so outputs may differ only where a rounding tie flips: at most one bf16
ulp, on a small share of the elements."""

from __future__ import annotations

import pytest
import torch

from moeinfer.kernels import use_kernel_
from moeinfer.kernels.norm import CpuRMSNorm, restore_norms_, use_cpu_norms_
from moeinfer.model.norm import RMSNorm
from native_helpers import native_ops


def pair(dim: int, dtype: torch.dtype) -> tuple[RMSNorm, RMSNorm]:
    torch.manual_seed(0)
    ref = RMSNorm(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(dim) * 0.5 + 1)
    fast = RMSNorm(dim, eps=1e-5).to(dtype)
    fast.load_state_dict(ref.state_dict())
    assert use_cpu_norms_(fast) == 1 and isinstance(fast, CpuRMSNorm)
    return fast, ref


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        return
    torch.testing.assert_close(out.float(), ref.float(), rtol=2.0**-7, atol=0.0)
    assert (out != ref).float().mean() <= 0.02, "more than 2% of the bf16 outputs differ from the reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 5, 7), (17, 64), (2, 1, 1000)])
def test_native_rms_norm_matches_the_reference(dtype, shape):
    native_ops()
    fast, ref = pair(shape[-1], dtype)
    x = (torch.randn(*shape) * 3).to(dtype)
    with torch.no_grad():
        check(fast(x), ref(x))


def test_a_one_percent_error_fails_the_check():
    ref = torch.linspace(-1, 1, 64)
    with pytest.raises(AssertionError):
        check(ref * 1.01, ref)
    with pytest.raises(AssertionError):
        check((ref * 1.01).bfloat16(), ref.bfloat16())


def test_non_finite_rows_stay_in_their_rows():
    native_ops()
    fast, ref = pair(16, torch.float32)
    x = torch.randn(3, 16)
    x[1, 4] = float("inf")
    x[2, 7] = float("nan")
    with torch.no_grad():
        out, want = fast(x), ref(x)
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1:].isnan(), want[1:].isnan())


def test_mixed_dtypes_and_autograd_run_the_reference():
    native_ops()
    fast, ref = pair(32, torch.float32)
    x = torch.randn(2, 32).bfloat16()  # fp32 weight, bf16 input: the reference's type promotion
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))
    xg = torch.randn(2, 32, requires_grad=True)
    fast(xg).sum().backward()
    assert xg.grad is not None


def test_use_kernel_linears_swaps_the_norms_and_restore_undoes_it(tiny_fp32):
    native_ops()
    model = tiny_fp32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = sum(isinstance(m, RMSNorm) for m in model.modules())
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        want = model(ids)
        use_kernel_(model, "auto", linears=True)
        got = model(ids)
    assert sum(isinstance(m, CpuRMSNorm) for m in model.modules()) == n > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert restore_norms_(model) == n
    assert not any(isinstance(m, CpuRMSNorm) for m in model.modules())
