"""kernels.projection.head_projection (strided per-gate GEMMs) against the einsum it replaces."""
import pytest
import torch

from kernels.projection import head_projection


def _einsum(x, w):
    H, dh = w.shape[:2]
    return torch.einsum("...hi,higj->...ghj", x.unflatten(-1, (H, dh)), w).flatten(-2)


@pytest.mark.parametrize("lead", [(2, 5), (7,), (1, 3, 4)])
@pytest.mark.parametrize("H,dh,G", [(4, 3, 3), (1, 8, 2), (3, 2, 1)])
def test_matches_einsum_values_and_gradients(lead, H, dh, G):
    g = torch.Generator().manual_seed(H * 100 + dh * 10 + G)
    x = torch.randn(*lead, H * dh, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(H, dh, G, dh, dtype=torch.float64, generator=g, requires_grad=True)
    u = head_projection(x, w)
    ref = _einsum(x, w)
    assert u.shape == (*lead, G, H * dh)
    torch.testing.assert_close(u, ref, rtol=1e-12, atol=1e-12)
    gu = torch.randn_like(u)
    got = torch.autograd.grad((u * gu).sum(), (x, w))
    want = torch.autograd.grad((ref * gu).sum(), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: head_projection(a, b), (x, w))


def test_non_contiguous_input_and_single_grad():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 2, 12, dtype=torch.float64, generator=g)
    x = base.transpose(0, 1).requires_grad_()  # (2, 6, 12), not contiguous
    w = torch.randn(3, 4, 3, 4, dtype=torch.float64, generator=g)  # no grad wanted
    u = head_projection(x, w)
    torch.testing.assert_close(u, _einsum(x, w))
    (dx,) = torch.autograd.grad(u.square().sum(), (x,))
    (dref,) = torch.autograd.grad(_einsum(x, w).square().sum(), (x,))
    torch.testing.assert_close(dx, dref)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="head_projection"):
        head_projection(torch.randn(2, 10), torch.randn(3, 4, 3, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 2, 8])
def test_weight_grad_token_splits(dtype, splits):
    """The split-K weight gradient (chunks of the token axis, fp32 partial sums) equals the
    fp64 per-head reduction for every split count."""
    from kernels.projection import _weight_grad

    g = torch.Generator().manual_seed(splits)
    N, H, dh, W = 64, 3, 5, 15
    x = torch.randn(N, H * dh, generator=g).to(dtype)
    du = torch.randn(H, N, W, generator=g).to(dtype)
    ref = torch.einsum("nhi,hnw->hiw", x.double().unflatten(-1, (H, dh)), du.double())
    got = _weight_grad(x, du, H, splits)
    assert got.dtype == dtype and got.shape == (H, dh, W)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_split_on_gpu(dtype):
    """At a benchmark shape the GPU path splits the fp32 reduction; dW matches fp64 to the dtype's
    rounding either way."""
    from kernels.projection import _k_splits

    g = torch.Generator(device="cuda").manual_seed(0)
    N, H, dh, G = 16384, 16, 64, 3
    assert (_k_splits(N, H, dh, G * dh, torch.device("cuda"), dtype) > 1) == (dtype == torch.float32)
    x = torch.randn(N, H * dh, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(H, dh, G, dh, device="cuda", generator=g) / dh ** 0.5).to(dtype).requires_grad_()
    gu = torch.randn(N, G, H * dh, device="cuda", generator=g).to(dtype)
    (dw,) = torch.autograd.grad((head_projection(x, w) * gu).sum(), (w,))
    ref = torch.einsum("nhi,nghj->higj", x.double().unflatten(-1, (H, dh)), gu.double().unflatten(-1, (H, dh)))
    err = ((dw.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 5e-3), err
