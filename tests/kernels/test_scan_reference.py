import pytest
import torch

from pararnn_lm.kernels.scan import linear_scan_adjoint_torch, linear_scan_sequential, linear_scan_torch


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("T", [1, 2, 3, 63, 64, 1000])
def test_log_depth_scan_equals_loop(K, T):
    g = torch.Generator().manual_seed(K * 1000 + T)
    A = torch.randn(2, T, K, K, 5, generator=g, dtype=torch.float64) * 0.6
    b = torch.randn(2, T, K, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(linear_scan_torch(A, b), linear_scan_sequential(A, b), rtol=0, atol=1e-11)
    torch.testing.assert_close(
        linear_scan_adjoint_torch(A, b), linear_scan_sequential(A, b, adjoint=True), rtol=0, atol=1e-11
    )


def test_adjoint_is_the_transpose_of_the_causal_scan():
    # <y, L^{-1} b> == <L^{-T} y, b> for the causal solve L^{-1} and its adjoint.
    g = torch.Generator().manual_seed(0)
    A = torch.randn(1, 37, 2, 2, 3, generator=g, dtype=torch.float64) * 0.5
    b, y = torch.randn(2, 1, 37, 2, 3, generator=g, dtype=torch.float64)
    lhs = (y * linear_scan_torch(A, b)).sum()
    rhs = (linear_scan_adjoint_torch(A, y) * b).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)
