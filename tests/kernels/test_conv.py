"""kernels/conv.py: the fused causal conv (+ SiLU) against an independent fp64 reference - each document
convolved on its own by ``F.conv1d`` with left zero padding - in values and all gradients; the
library ops under torch.compile; the model layers with the fused path forced on."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from compiled_graphs import called_ops, compiled_with_graphs

from pararnn_lm.kernels.conv import causal_conv1d, causal_conv1d_op
from pararnn_lm.models.layers import CausalConv1d


def _reference(x, weight, bias, positions, silu):
    """Per document (a run of positions 0, 1, 2, ...), F.conv1d with K-1 zeros in front: no masking
    formula shared with the kernels."""
    B, T, C = x.shape
    K = weight.shape[1]
    rows = []
    for b in range(B):
        starts = [t for t in range(T) if positions[b, t] == 0 or t == 0] + [T]
        pieces = []
        for s, e in zip(starts[:-1], starts[1:]):
            doc = x[b, s:e].T.unsqueeze(0)  # (1, C, L)
            pieces.append(F.conv1d(F.pad(doc, (K - 1, 0)), weight.unsqueeze(1), bias, groups=C)[0].T)
        rows.append(torch.cat(pieces))
    y = torch.stack(rows)
    return F.silu(y) if silu else y


def _positions(B, T, starts):
    """Positions restarting at the given (row, t) document starts (every row starts at 0)."""
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        p = 0
        for t in range(T):
            p = 0 if (t == 0 or (b, t) in starts) else p + 1
            pos[b, t] = p
    return pos


def _inputs(B, T, C, K, dtype, seed, strided=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 2 * C, generator=g)
    x = (x.chunk(2, dim=-1)[1] if strided else x[..., :C].contiguous()).to(device, dtype)
    w = (torch.randn(C, K, generator=g) / K**0.5).to(device)
    b = torch.randn(C, generator=g).to(device)
    return x, w, b


_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("T", [1, 5, 63, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [True, False])
def test_matches_per_document_conv1d(T, dtype, silu):
    """Values and the gradients of x, weight and bias; C = 130 is not a multiple of the channel tile,
    T = 130 not of the token tile; documents start inside rows (one of length 1); x a strided view."""
    B, C, K = 2, 130, 4
    x, w, b = _inputs(B, T, C, K, dtype, seed=T)
    pos = _positions(B, T, {(0, T // 2), (1, 3), (1, 4), (1, T - 1)})
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = causal_conv1d(xs, ws, bs, pos, silu)
    assert y.shape == (B, T, C) and y.dtype == dtype and y.is_contiguous()
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    want = _reference(xd, wd, bd, pos, silu)
    torch.testing.assert_close(y.double(), want, **_TOL[dtype])
    dy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(y, (xs, ws, bs), dy)
    ref = torch.autograd.grad(want, (xd, wd, bd), dy.double())
    for name, a, r in zip(("dx", "dw", "db"), got, ref):
        scale = r.abs().max().item()
        torch.testing.assert_close(a.double(), r, rtol=_TOL[dtype]["rtol"], atol=_TOL[dtype]["atol"] * max(scale, 1),
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert got[1].dtype == ws.dtype and got[2].dtype == bs.dtype


@pytest.mark.parametrize("K", [1, 2, 3])
def test_other_kernel_widths(K):
    B, T, C = 3, 37, 20
    x, w, b = _inputs(B, T, C, K, torch.float32, seed=K, strided=False)
    pos = _positions(B, T, {(0, 9), (2, 1)})
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = causal_conv1d(xs, ws, bs, pos, True)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    want = _reference(xd, wd, bd, pos, True)
    torch.testing.assert_close(y.double(), want, **_TOL[torch.float32])
    for a, r in zip(torch.autograd.grad(y.sum(), (xs, ws, bs)), torch.autograd.grad(want.sum(), (xd, wd, bd))):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fwd_tile,g_tile,dx_tile", [((16, 32, 4), (8, 32, 4, 3), (16, 32, 2)),
                                                     ((32, 64, 2), (16, 64, 2, 1), (64, 64, 4)),
                                                     ((64, 128, 4), (32, 128, 4, 8), (32, 128, 4))])
def test_tilings(monkeypatch, fwd_tile, g_tile, dx_tile):
    """Other tiles (several channel blocks, programs walking several token blocks, a ragged last chunk) give
    the same values and gradients."""
    import pararnn_lm.kernels.conv as conv

    monkeypatch.setattr(conv, "_FWD_TILE", fwd_tile)
    monkeypatch.setattr(conv, "_BWD_G_TILE", g_tile)
    monkeypatch.setattr(conv, "_BWD_DX_TILE", dx_tile)
    B, T, C, K = 2, 300, 70, 4
    x, w, b = _inputs(B, T, C, K, torch.float32, seed=7)
    pos = _positions(B, T, {(0, 100), (1, 257), (1, 258)})
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = causal_conv1d(xs, ws, bs, pos, True)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    want = _reference(xd, wd, bd, pos, True)
    torch.testing.assert_close(y.double(), want, **_TOL[torch.float32])
    dy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(2))
    for a, r in zip(torch.autograd.grad(y, (xs, ws, bs), dy), torch.autograd.grad(want, (xd, wd, bd), dy.double())):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-4)


def test_bad_inputs_raise():
    x, w, b = _inputs(2, 5, 8, 4, torch.float32, seed=0)
    pos = _positions(2, 5, set())
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, w[:4], b, pos)
    with pytest.raises(ValueError, match="positions"):
        causal_conv1d(x, w, b, pos[:, :3])
    with pytest.raises(ValueError, match="unit channel stride"):
        causal_conv1d(x.transpose(1, 2).contiguous().transpose(1, 2), w, b, pos)
    with pytest.raises(ValueError, match="float64"):
        causal_conv1d(x.double(), w, b, pos)


def test_opcheck():
    x, w, b = _inputs(2, 9, 12, 4, torch.float32, seed=3)
    pos = _positions(2, 9, {(1, 4)})
    for silu in (True, False):
        torch.library.opcheck(causal_conv1d_op, (x, w, b, pos, silu))
        dy = torch.randn(2, 9, 12)
        torch.library.opcheck(torch.ops.pararnn.causal_conv1d_backward.default, (dy, x, w, b, pos, silu))


def test_compiled_graph_calls_the_library_ops():
    """fullgraph compile: the forward graph calls pararnn.causal_conv1d, the backward
    pararnn.causal_conv1d_backward; values and gradients equal eager."""
    torch._dynamo.reset()

    def fn(x, w, b, pos):
        return causal_conv1d(x * 2, w, b, pos, True).square().sum()

    x, w, b = (t.requires_grad_() for t in _inputs(2, 11, 12, 4, torch.float32, seed=4))
    pos = _positions(2, 11, {(0, 5)})
    compiled, graphs = compiled_with_graphs(fn)
    got = compiled(x, w, b, pos)
    got_grads = torch.autograd.grad(got, (x, w, b))
    want = fn(x, w, b, pos)
    want_grads = torch.autograd.grad(want, (x, w, b))
    torch.testing.assert_close(got, want)
    for a, r in zip(got_grads, want_grads):
        torch.testing.assert_close(a, r)
    ops = [called_ops(gm) for gm in graphs]
    assert "pararnn.causal_conv1d.default" in ops[0]
    assert "pararnn.causal_conv1d_backward.default" in ops[1]


@pytest.mark.parametrize("silu", [True, False])
def test_layer_fused_path_equals_its_pytorch_path(silu):
    """models.layers.CausalConv1d with the fused kernel forced on vs off: outputs, the returned window
    (a prefill's cache) and the parameter gradients."""
    torch.manual_seed(0)
    conv = CausalConv1d(24, 4)
    x, _, _ = _inputs(2, 6, 24, 4, torch.float32, seed=5)
    pos = _positions(2, 6, {(1, 2)})
    outs = {}
    for fused in (True, False):
        conv.fused = fused
        conv.zero_grad()
        xs = x.clone().requires_grad_()
        y, window = conv(xs, pos, silu=silu)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        outs[fused] = (y, window, xs.grad, conv.conv.weight.grad.clone(), conv.conv.bias.grad.clone())
    for a, r in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    # T < K - 1: the window is zero-padded in front, as the PyTorch path's
    conv.fused = True
    short = conv(x[:, :2], pos[:, :2], silu=silu)[1]
    conv.fused = False
    torch.testing.assert_close(short, conv(x[:, :2], pos[:, :2], silu=silu)[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("C", [1024, 2304])
def test_on_gpu_at_model_shapes(C):
    """(16, 2048) tokens with packed documents at the 400M ParaGRU conv width (1024) and a Mamba2-like
    one (2304), bf16, against the fp64 per-document reference."""
    B, T, K = 16, 2048, 4
    x, w, b = _inputs(B, T, C, K, torch.bfloat16, seed=C, device="cuda")
    g = torch.Generator().manual_seed(0)
    starts = {(int(r), int(t)) for r, t in zip(torch.randint(0, B, (40,), generator=g), torch.randint(1, T, (40,), generator=g))}
    pos = _positions(B, T, starts).cuda()
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = causal_conv1d(xs, ws, bs, pos, True)
    dy = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)
    got = torch.autograd.grad(y, (xs, ws, bs), dy)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    want = _reference(xd, wd, bd, pos, True)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)
    for a, r in zip(got, torch.autograd.grad(want, (xd, wd, bd), dy.double())):
        torch.testing.assert_close(a.double(), r, rtol=2e-2, atol=2e-2 * r.abs().max().item())
