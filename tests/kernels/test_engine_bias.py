"""parallel_rnn(..., u_bias=b): the mode that adds the input bias inside its kernels (``fused``;
TRITON_INTERPRET=1 on the CPU) against the fp64 sequential loop run on u + b - outputs, final states and
the gradients of u, p, b and h0; with packed documents (resets), one and several shooting segments and
the fallback pass; and the layer's bias through every path."""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.kernels import NewtonConfig, NewtonStats, ParaGRU, ParaGRULayer, ParaLSTM, ParaLSTMLayer, parallel_rnn, shooting
from pararnn_lm.kernels.modes import MODES

CELLS = {"gru": (ParaGRU(), 1, 3), "lstm": (ParaLSTM(), 2, 5)}


@pytest.fixture(autouse=True)
def small_tiles():
    shooting.TUNING.update(segments=4, BD=16)  # T = 13 .. 70 has several segments: the coarse update runs
    yield
    shooting.TUNING.clear()


def _problem(cell, T, seed, D=19):
    obj, K, P = CELLS[cell]
    g = torch.Generator().manual_seed(seed)
    B = 2
    u = torch.randn(B, T, 3, D, generator=g, dtype=torch.float64)
    p = (torch.rand(P, D, generator=g, dtype=torch.float64) * 2 - 1) * 0.5
    b = torch.randn(3, D, generator=g, dtype=torch.float64) * 0.7
    h0 = torch.randn(B, K, D, generator=g, dtype=torch.float64) * 0.5
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[1, T // 2] = True
    resets[0, 0] = True
    return obj, u, p, b, h0, resets


def _run(obj, u, p, b, h0, resets, gy, gh, **kw):
    leaves = [t.clone().requires_grad_() for t in (u, p, b, h0)]
    y, h_last = parallel_rnn(obj, leaves[0], leaves[1], leaves[3], resets=resets, u_bias=leaves[2], **kw)
    grads = torch.autograd.grad((y * gy).sum() + (h_last * gh).sum(), leaves)
    return y, h_last, grads


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("T,dtype", [(13, torch.float32), (70, torch.float32), (70, torch.bfloat16)])
def test_bias_inside_the_kernels_matches_u_plus_bias(cell, segments, T, dtype):
    shooting.TUNING.update(segments=segments)  # 1: the exact one-pass walk; 4: Newton on the segment starts
    mode = "fused"
    obj, u, p, b, h0, resets = _problem(cell, T, seed=T)
    # ParaGRU: the bias goes into the kernels; ParaLSTM: the engine adds it to u first (slower in-kernel).
    assert MODES[mode].input_bias(obj) == (cell == "gru")
    u = u.to(dtype).double()  # the reference sees the same rounded inputs
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(u.shape[0], T, u.shape[-1], generator=g, dtype=torch.float64)
    gh = torch.randn(h0.shape, generator=g, dtype=torch.float64)
    # Reference: the fp64 sequential loop on u + b (b's gradient then is the sum of u's over batch and time).
    ud, pd, bd, hd = (t.clone().requires_grad_() for t in (u, p, b, h0))
    y_ref, h_ref = parallel_rnn(obj, ud + bd, pd, hd, resets=resets, mode="sequential")
    g_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), (ud, pd, bd, hd))
    y, h_last, grads = _run(obj, u.to(dtype), p.float(), b.float(), h0.float(), resets, gy.to(dtype), gh.float(),
                            mode=mode)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, got, ref in zip(("y", "h_last", "du", "dp", "dbias", "dh0"), (y, h_last, *grads), (y_ref, h_ref, *g_ref)):
        err = (got.double() - ref).abs().max().item()
        assert err <= tol * (1 + ref.abs().max().item()), f"{name}: max error {err:.3e}"


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fused_op_takes_bias_rows(cell):
    """The cells' fused ops with p + 3 bias rows (ParaLSTM's too, although the engine does not send them),
    several segments and document starts, against the fp64 loop on u + b: trajectory and all gradients."""
    from pararnn_lm.kernels.cells.paragru.fused import fused_paragru
    from pararnn_lm.kernels.cells.paralstm.fused import fused_paralstm

    op = {"gru": fused_paragru, "lstm": fused_paralstm}[cell]
    obj, u, p, b, h0, resets = _problem(cell, 45, seed=7)
    T, D = u.shape[1], u.shape[-1]
    cu = torch.tensor([0, 20, 45])  # two documents packed in one row
    u1, gy = u[:1], torch.randn(1, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h01 = h0[:1].expand(2, -1, -1).contiguous()
    leaves = [t.float().clone().requires_grad_() for t in (u1, p, b, h01)]
    h = op(leaves[0], torch.cat((leaves[1], leaves[2])), leaves[3], cu)
    grads = torch.autograd.grad((obj.output(h) * gy.float()).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (u1, p, b, h01)]
    y_ref, _ = parallel_rnn(obj, ref_leaves[0] + ref_leaves[2], ref_leaves[1], ref_leaves[3], cu, mode="sequential")
    g_ref = torch.autograd.grad((y_ref * gy).sum(), ref_leaves)
    torch.testing.assert_close(obj.output(h).double(), y_ref, rtol=1e-4, atol=1e-4)
    for name, got, ref in zip(("du", "dp", "dbias", "dh0"), grads, g_ref):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_fallback_pass_adds_the_bias_too():
    """Gains large enough that the shooting Newton does not converge in its pass cap: the exact fallback
    pass finishes those channels - with the bias."""
    obj, u, p, b, h0, resets = _problem("gru", 70, seed=3)
    p = p.sign() * 3.0  # strongly non-contractive: |a| = 3
    newton = NewtonConfig(max_iters=1, on_failure="fallback", validate=False)
    stats = NewtonStats()
    y, h_last, _ = _run(obj, u.float(), p.float(), b.float(), h0.float(), resets,
                        torch.zeros(2, 70, 19), torch.zeros(2, 1, 19), mode="fused", newton=newton, stats=stats)
    assert stats.resolve().fell_back
    y_ref, h_ref = parallel_rnn(obj, u + b, p, h0, resets=resets, mode="sequential")
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h_last.double(), h_ref, rtol=1e-4, atol=1e-4)


def test_modes_without_it_get_u_plus_bias_and_bad_shapes_raise():
    obj, u, p, b, h0, resets = _problem("lstm", 9, seed=5)
    assert not MODES["newton_torch"].input_bias(obj)
    y, h_last = parallel_rnn(obj, u, p, h0, resets=resets, u_bias=b, mode="newton_torch")
    y_ref, h_ref = parallel_rnn(obj, u + b, p, h0, resets=resets, mode="sequential")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h_last, h_ref)
    with pytest.raises(ValueError, match="u_bias"):
        parallel_rnn(obj, u, p, h0, u_bias=b[:2], mode="sequential")


@pytest.mark.parametrize("layer_cls", [ParaGRULayer, ParaLSTMLayer])
def test_layer_bias_reaches_every_mode_alike(layer_cls):
    """A layer with a (nonzero) bias: the fused mode (bias in the kernels) equals the sequential mode
    (bias added to u) in outputs and every parameter gradient."""
    torch.manual_seed(0)
    layer = layer_cls(32, 2, bias=True)
    with torch.no_grad():
        layer.bias.normal_(0, 0.5)
    x = torch.randn(2, 11, 32)
    out = {}
    for mode in ("fused", "sequential"):
        layer.mode = mode
        layer.zero_grad()
        y, h = layer(x)
        (y.square().sum() + h.sum()).backward()
        out[mode] = (y, h, {n: q.grad.clone() for n, q in layer.named_parameters()})
    torch.testing.assert_close(out["fused"][0], out["sequential"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["fused"][1], out["sequential"][1], rtol=1e-4, atol=1e-4)
    for n, g in out["sequential"][2].items():
        torch.testing.assert_close(out["fused"][2][n], g, rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    assert out["fused"][2]["bias"].abs().max() > 0
