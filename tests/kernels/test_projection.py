"""kernels.projection.head_projection (strided per-gate GEMMs) against the einsum it replaces."""
import pytest
import torch
from compiled_graphs import called_ops, compiled_with_graphs

from pararnn_lm.kernels.projection import head_projection


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
    with pytest.raises(ValueError, match="dtype"):  # the compiled op's fake would not catch this
        head_projection(torch.randn(2, 12), torch.randn(3, 4, 3, 4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 2, 8])
def test_weight_grad_token_splits(dtype, splits):
    """The split-K weight gradient (chunks of the token axis, fp32 partial sums) equals the
    fp64 per-head reduction for every split count."""
    from pararnn_lm.kernels.projection import _weight_grad

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
    from pararnn_lm.kernels.projection import _k_splits

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


# ----------------------------------------------------------------------------- the torch.library ops
# Under torch.compile head_projection calls pararnn::head_projection (its autograd calls
# pararnn::head_projection_backward); eager calls take the autograd.Function. Same values either way.
from pararnn_lm.kernels.projection import head_projection_backward_op, head_projection_op  # noqa: E402

_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(N, H, dh, G, dtype, seed=0, strided=False, grad=True):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a (N, H * dh) view with leading dimension 2 * H * dh, as after .chunk(2, -1)
        x = torch.randn(N, 2 * H * dh, generator=g).to(dtype).chunk(2, dim=-1)[1]
    else:
        x = torch.randn(N, H * dh, generator=g).to(dtype)
    w = (torch.randn(H, dh, G, dh, generator=g) / dh ** 0.5).to(dtype)
    return x.requires_grad_(grad), w.requires_grad_(grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,G", [(1, 3), (4, 3), (1, 2), (4, 2)])
@pytest.mark.parametrize("strided", [False, True])
def test_library_op_matches_einsum(dtype, H, G, strided):
    N, dh = 37, 8
    x, w = _inputs(N, H, dh, G, dtype, seed=H * 10 + G, strided=strided)
    u = torch.ops.pararnn.head_projection(x, w)
    assert u.shape == (N, G, H * dh) and u.dtype == dtype and u.is_contiguous()
    # Reference in fp64 for fp32 (tight), in the dtype itself for bf16 (loose).
    ref_dtype = torch.float64 if dtype == torch.float32 else dtype
    xr, wr = (t.detach().to(ref_dtype).requires_grad_() for t in (x, w))
    ref = _einsum(xr, wr)
    torch.testing.assert_close(u, ref.to(dtype), **_TOL[dtype])
    gu = torch.randn(u.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad((u * gu).sum(), (x, w))
    want = torch.autograd.grad((ref * gu.to(ref_dtype)).sum(), (xr, wr))
    for a, b, t in zip(got, want, (x, w)):
        assert a.shape == t.shape and a.dtype == dtype and a.is_contiguous()
        torch.testing.assert_close(a, b.to(dtype), **_TOL[dtype])


@pytest.mark.parametrize("need_dx,need_dw", [(True, True), (True, False), (False, True)])
def test_library_backward_op_grads_asked_for(need_dx, need_dw):
    """Grads not asked for come back as empty placeholders; the op's autograd returns None there."""
    N, H, dh, G = 29, 4, 4, 3
    x, w = _inputs(N, H, dh, G, torch.float32, grad=False)
    du = torch.randn(N, G, H * dh, generator=torch.Generator().manual_seed(2))
    dx, dw = head_projection_backward_op(du, x, w, need_dx, need_dw)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    rx, rw = torch.autograd.grad((_einsum(xr, wr) * du.double()).sum(), (xr, wr))
    if need_dx:
        torch.testing.assert_close(dx, rx.float(), **_TOL[torch.float32])
    else:
        assert dx.numel() == 0
    if need_dw:
        torch.testing.assert_close(dw, rw.float(), **_TOL[torch.float32])
    else:
        assert dw.numel() == 0
    # Through the forward op's autograd: only the asked-for input gets a gradient.
    x.requires_grad_(need_dx)
    w.requires_grad_(need_dw)
    u = head_projection_op(x, w)
    got = torch.autograd.grad((u * du).sum(), [t for t in (x, w) if t.requires_grad])
    want = [r.float() for r, n in ((rx, need_dx), (rw, need_dw)) if n]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **_TOL[torch.float32])


def _op_samples(grad: bool):
    for dtype in (torch.float32, torch.bfloat16):
        for N, H, dh, G, strided in ((37, 4, 8, 3, False), (13, 1, 6, 2, True), (1, 2, 3, 3, False)):
            yield _inputs(N, H, dh, G, dtype, seed=N, strided=strided, grad=grad), (N, H, dh, G, dtype)


@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_forward(grad):
    for (x, w), _ in _op_samples(grad):
        torch.library.opcheck(torch.ops.pararnn.head_projection.default, (x, w))


def test_opcheck_backward():
    for (x, w), (N, H, dh, G, dtype) in _op_samples(False):
        du = torch.randn(N, G, H * dh, generator=torch.Generator().manual_seed(3)).to(dtype)
        for flags in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(torch.ops.pararnn.head_projection_backward.default, (du, x, w, *flags))


@pytest.mark.parametrize("x_grad", [True, False])
def test_compiled_graph_calls_the_library_op(x_grad):
    """fullgraph compile: the forward graph calls pararnn.head_projection and the backward
    pararnn.head_projection_backward (asking only for the grads needed), no einsum/permute copies
    of the projection; values and grads equal eager."""
    torch._dynamo.reset()

    def fn(x, w):
        return head_projection(torch.nn.functional.silu(x), w).square().sum()

    N, H, dh, G = 37, 4, 8, 3
    x, w = _inputs(N, H, dh, G, torch.float32, seed=5)
    x = x.detach().unflatten(0, (1, N)).requires_grad_(x_grad)  # leading dims are flattened by the wrapper
    compiled, graphs = compiled_with_graphs(fn)
    wrt = (x, w) if x_grad else (w,)
    got = compiled(x, w)
    got_grads = torch.autograd.grad(got, wrt)
    want = fn(x, w)
    want_grads = torch.autograd.grad(want, wrt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 2
    fw, bw = (called_ops(gm) for gm in graphs)
    assert "pararnn.head_projection.default" in fw
    assert "pararnn.head_projection_backward.default" in bw
    assert not any("einsum" in t or "bmm" in t or "permute" in t for t in fw | bw), fw | bw
    (bw_call,) = [n for n in graphs[1].graph.nodes if str(n.target) == "pararnn.head_projection_backward.default"]
    assert tuple(bw_call.args[3:]) == (x_grad, True)


def test_compiled_inductor_matches_eager():
    """The same function through inductor (the training path): values and grads equal eager."""
    torch._dynamo.reset()

    def fn(x, w):
        return head_projection(torch.nn.functional.silu(x), w).square().sum()

    x, w = _inputs(37, 4, 8, 3, torch.float32, seed=6)
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(x, w)
    got_grads = torch.autograd.grad(got, (x, w))
    want = fn(x, w)
    want_grads = torch.autograd.grad(want, (x, w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,dh,G", [(37, 2, 16, 3), (130, 1, 32, 2), (5, 3, 16, 1), (9, 1, 256, 2)])
def test_copy_free_backward_matches_fp64(dtype, N, H, dh, G):
    """16-bit gradients without the head-major copy of du (Triton dx whose K loop walks the gates, one
    strided GEMM per gate for dW) equal the fp64 einsum gradients to 16-bit rounding; N not a multiple of
    the token tile, du with a row stride that is not G * dim."""
    from pararnn_lm.kernels.projection import _backward, _triton_dx_ok

    g = torch.Generator().manual_seed(N + 10 * H + dh)
    x = torch.randn(N, H * dh, generator=g).to(dtype)
    w = (torch.randn(H, dh, G, dh, generator=g) / dh ** 0.5).to(dtype)
    du = torch.randn(N, G, H * dh + 8, generator=g).to(dtype)[:, :, 3 : 3 + H * dh]  # strided rows
    assert _triton_dx_ok(du, w)
    dx, dw = _backward(du, x, w, True, True)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref = _einsum(xd, wd)
    dx_ref, dw_ref = torch.autograd.grad(ref, (xd, wd), du.double())
    assert dx.dtype == dw.dtype == dtype and dx.is_contiguous() and dw.shape == w.shape
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    only_dw = _backward(du, x, w, False, True)
    assert only_dw[0] is None and torch.equal(only_dw[1], dw)


def test_copy_free_backward_is_not_taken_for_fp32_or_odd_head_widths():
    from pararnn_lm.kernels.projection import _triton_dx_ok

    assert not _triton_dx_ok(torch.randn(4, 3, 32), torch.randn(2, 16, 3, 16))  # fp32: cuBLAS numerics
    bf = torch.bfloat16
    assert not _triton_dx_ok(torch.randn(4, 3, 24, dtype=bf), torch.randn(2, 12, 3, 12, dtype=bf))  # dh = 12
    if torch.cuda.is_available():  # on the GPU, cuBLAS after the copy wins below 128-wide heads
        dev = dict(dtype=bf, device="cuda")
        assert not _triton_dx_ok(torch.randn(4, 3, 128, **dev), torch.randn(2, 64, 3, 64, **dev))
        assert _triton_dx_ok(torch.randn(4, 3, 256, **dev), torch.randn(2, 128, 3, 128, **dev))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,dh,G", [(4, 256, 3), (4, 1024, 4), (8, 128, 3)])
def test_copy_free_backward_on_gpu(dtype, H, dh, G):
    """At the shapes of the presets' layers (4 heads of 256 at 400M, of 1024 at 7B) and the narrowest head
    the GPU path takes (128), 3 gates (ParaGRU) and 4 (ParaLSTM), the copy-free 16-bit backward equals the fp64 einsum
    gradients to 16-bit rounding (the bf16 tensor-core dot is only reachable on a GPU)."""
    from pararnn_lm.kernels.projection import _backward, _triton_dx_ok

    g = torch.Generator(device="cuda").manual_seed(1)
    N = 4096
    x = torch.randn(N, H * dh, device="cuda", generator=g).to(dtype)
    w = (torch.randn(H, dh, G, dh, device="cuda", generator=g) / dh ** 0.5).to(dtype)
    du = torch.randn(N, G, H * dh, device="cuda", generator=g).to(dtype)
    assert _triton_dx_ok(du, w)
    dx, dw = _backward(du, x, w, True, True)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    dx_ref, dw_ref = torch.autograd.grad(_einsum(xd, wd), (xd, wd), du.double())
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,dh,G", [(37, 2, 16, 3), (130, 1, 32, 2), (5, 3, 16, 4)])
def test_one_pass_forward_matches_fp64(dtype, N, H, dh, G):
    """The 16-bit one-launch forward (a program reads its x tile once and writes every gate) equals the fp64
    einsum to 16-bit rounding: N not a multiple of the token tile, x with a row stride that is not dim,
    a non-contiguous weight."""
    from pararnn_lm.kernels.projection import _forward, _triton_fwd_ok

    g = torch.Generator().manual_seed(N + 10 * H + dh)
    x = torch.randn(N, H * dh + 8, generator=g).to(dtype)[:, 5 : 5 + H * dh]  # strided rows
    w = (torch.randn(H, G, dh, dh, generator=g) / dh ** 0.5).to(dtype).permute(0, 2, 1, 3)  # (H, dh, G, dh) view
    assert _triton_fwd_ok(x, w) and not w.is_contiguous()
    u = _forward(x, w)
    ref = _einsum(x.double(), w.double())
    assert u.dtype == dtype and u.is_contiguous() and u.shape == (N, G, H * dh)
    torch.testing.assert_close(u.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_one_pass_forward_is_not_taken_for_fp32_or_odd_head_widths():
    from pararnn_lm.kernels.projection import NARROW_FORWARD_MAX_HEAD, _triton_fwd_ok

    bf = torch.bfloat16
    assert not _triton_fwd_ok(torch.randn(4, 32), torch.randn(2, 16, 3, 16))  # fp32: cuBLAS numerics
    assert not _triton_fwd_ok(torch.randn(4, 24, dtype=bf), torch.randn(2, 12, 3, 12, dtype=bf))  # dh = 12
    wide = 2 * NARROW_FORWARD_MAX_HEAD
    assert not _triton_fwd_ok(torch.randn(4, wide, dtype=bf), torch.randn(1, wide, 3, wide, dtype=bf))
    assert not _triton_fwd_ok(torch.randn(32, 4, dtype=bf).t(), torch.randn(2, 16, 3, 16, dtype=bf))  # strided channels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,dh,G", [(16, 64, 3), (8, 128, 4), (64, 16, 3)])
def test_one_pass_forward_on_gpu(dtype, H, dh, G):
    """The tensor-core path of the one-pass forward (only reachable on a GPU) against fp64, through the
    public op with its gradients (the backward is unchanged)."""
    from pararnn_lm.kernels.projection import _triton_fwd_ok

    g = torch.Generator(device="cuda").manual_seed(2)
    N = 16384 + 3
    x = torch.randn(N, H * dh, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(H, dh, G, dh, device="cuda", generator=g) / dh ** 0.5).to(dtype).requires_grad_()
    assert _triton_fwd_ok(x, w)
    u = head_projection(x, w)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _einsum(xd, wd)
    torch.testing.assert_close(u.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    du = torch.randn_like(u)
    got = torch.autograd.grad(u, (x, w), du)
    want = torch.autograd.grad(ref, (xd, wd), du.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=1e-2 * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,dh,G", [(37, 2, 16, 3), (300, 1, 32, 2), (5, 3, 16, 4), (1000, 2, 16, 3)])
def test_narrow_backward_matches_fp64(dtype, N, H, dh, G):
    """Narrow 16-bit heads: dx and dW both from Triton kernels reading du in place (dW as fp32 partial sums
    over token chunks, summed after) equal the fp64 einsum gradients to 16-bit rounding - N not a multiple
    of the token tile or of the chunk, one chunk and several, strided x and du rows."""
    from pararnn_lm.kernels.projection import _backward, _narrow_backward_ok

    g = torch.Generator().manual_seed(N + 10 * H + dh)
    x = torch.randn(N, H * dh + 4, generator=g).to(dtype)[:, 2 : 2 + H * dh]
    w = (torch.randn(H, dh, G, dh, generator=g) / dh ** 0.5).to(dtype)
    du = torch.randn(N, G, H * dh + 8, generator=g).to(dtype)[:, :, 3 : 3 + H * dh]
    assert _narrow_backward_ok(du, x, w)
    dx, dw = _backward(du, x, w, True, True)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    dx_ref, dw_ref = torch.autograd.grad(_einsum(xd, wd), (xd, wd), du.double())
    assert dx.dtype == dw.dtype == dtype and dx.is_contiguous() and dw.shape == w.shape
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert _backward(du, x, w, False, True)[0] is None and _backward(du, x, w, True, False)[1] is None


def test_narrow_backward_is_not_taken_for_fp32_wide_or_odd_heads():
    from pararnn_lm.kernels.projection import NARROW_BACKWARD_MAX_HEAD, _narrow_backward_ok

    bf = torch.bfloat16
    assert not _narrow_backward_ok(torch.randn(4, 3, 32), torch.randn(4, 32), torch.randn(2, 16, 3, 16))
    assert not _narrow_backward_ok(torch.randn(4, 3, 24, dtype=bf), torch.randn(4, 24, dtype=bf),
                                   torch.randn(2, 12, 3, 12, dtype=bf))
    wide = 2 * NARROW_BACKWARD_MAX_HEAD
    assert not _narrow_backward_ok(torch.randn(4, 3, wide, dtype=bf), torch.randn(4, wide, dtype=bf),
                                   torch.randn(1, wide, 3, wide, dtype=bf))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,dh,G", [(16, 64, 3), (8, 128, 4), (64, 16, 3)])
def test_narrow_backward_on_gpu(dtype, H, dh, G):
    from pararnn_lm.kernels.projection import _backward, _narrow_backward_ok

    g = torch.Generator(device="cuda").manual_seed(3)
    N = 16384 + 5
    x = torch.randn(N, H * dh, device="cuda", generator=g).to(dtype)
    w = (torch.randn(H, dh, G, dh, device="cuda", generator=g) / dh ** 0.5).to(dtype)
    du = torch.randn(N, G, H * dh, device="cuda", generator=g).to(dtype)
    assert _narrow_backward_ok(du, x, w)
    dx, dw = _backward(du, x, w, True, True)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    dx_ref, dw_ref = torch.autograd.grad(_einsum(xd, wd), (xd, wd), du.double())
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())
