"""Triton linear scans vs the sequential reference (TRITON_INTERPRET=1 on the CPU; tiny shapes)."""
import pytest
import torch

from pararnn_lm.kernels.scan.reference import linear_scan_sequential
from pararnn_lm.kernels.scan.triton import _launch, linear_scan_adjoint_triton, linear_scan_triton


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("T", [1, 5, 63, 130])
def test_scan_matches_sequential(K, T):
    g = torch.Generator().manual_seed(10 * K + T)
    A = torch.randn(2, T, K, K, 19, generator=g, dtype=torch.float64) * 0.6
    b = torch.randn(2, T, K, 19, generator=g, dtype=torch.float64)
    for reverse in (False, True):
        out = torch.empty(b.shape, dtype=torch.float32)
        _launch(A.float(), b.float(), out, reverse, CT=16, BD=16)  # 16-step chunks: multi-chunk paths
        ref = linear_scan_sequential(A, b, adjoint=reverse)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_scan_recursion_over_chunk_carries():
    # CT = 4 and T = 70: 18 chunks -> 5 -> 2 -> 1: three levels of carries, forward and adjoint.
    g = torch.Generator().manual_seed(1)
    A = torch.rand(1, 70, 2, 2, 3, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(1, 70, 2, 3, generator=g, dtype=torch.float64)
    for reverse in (False, True):
        out = torch.empty(b.shape, dtype=torch.float32)
        _launch(A.float(), b.float(), out, reverse, CT=4, BD=4)
        torch.testing.assert_close(out.double(), linear_scan_sequential(A, b, adjoint=reverse), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_ops_dtype_strides_and_grad(dtype):
    g = torch.Generator().manual_seed(2)
    A = (torch.randn(2, 9, 1, 1, 10, generator=g) * 0.5).to(dtype)
    b_big = torch.randn(2, 9, 1, 20, generator=g).to(dtype)
    b = b_big[..., ::2]  # non-contiguous channels
    x = linear_scan_triton(A, b)
    assert x.dtype == dtype and x.shape == b.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(x.double(), linear_scan_sequential(A.double(), b.double()), rtol=tol, atol=tol)
    xa = linear_scan_adjoint_triton(A, b)
    torch.testing.assert_close(xa.double(), linear_scan_sequential(A.double(), b.double(), adjoint=True), rtol=tol, atol=tol)
    if dtype == torch.float32:
        for fn, adj in ((linear_scan_triton, False), (linear_scan_adjoint_triton, True)):
            Ad = A.double().requires_grad_()
            bd = b.double().requires_grad_()
            gy = torch.randn(b.shape, generator=g, dtype=torch.float64)
            ref = torch.autograd.grad((linear_scan_sequential(Ad, bd, adjoint=adj) * gy).sum(), (Ad, bd))
            Af = A.clone().requires_grad_()
            bf = b.clone().requires_grad_()
            got = torch.autograd.grad((fn(Af, bf) * gy.float()).sum(), (Af, bf))
            for r, o in zip(ref, got):
                torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-5)


def test_scan_rejects_large_K():
    with pytest.raises(ValueError, match="K=3"):
        linear_scan_triton(torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 4))
