"""kernels/gated_norm.py: the fused gated RMSNorm against an fp64 reference written out in PyTorch
(y * silu(z), rms statistics, weight) in values and every gradient; other tilings and the multi-program
d weight reduction; the library ops (opcheck, torch.compile fullgraph); the model layer and a whole LM with
the fused norm on vs its PyTorch code."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from compiled_graphs import called_ops, compiled_with_graphs

import pararnn_lm.kernels.gated_norm as gated_norm
from pararnn_lm.kernels.gated_norm import gated_rms_norm, gated_rms_norm_op
from pararnn_lm.models.layers import CausalConv1d, GatedRMSNorm

EPS = 1e-5


def _reference(y, z, weight, eps=EPS):
    """fp64, nothing shared with the kernels: rmsnorm(y * silu(z)) * weight over the last axis."""
    x = y * z * torch.sigmoid(z)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _inputs(shape, y_dtype, z_dtype, seed, layout="strided", device="cpu"):
    """y as the state row of a (..., 2, D) trajectory, z as the second half of a (..., 2D) projection
    (``layout="strided"``), or both contiguous; weight fp32 around 1."""
    g = torch.Generator().manual_seed(seed)
    *lead, D = shape
    states = torch.randn(*lead, 2, D, generator=g)
    proj = torch.randn(*lead, 2 * D, generator=g) * 2
    weight = 1 + 0.3 * torch.randn(D, generator=g)
    if layout == "strided":
        y, z = states.to(device, y_dtype)[..., 1, :], proj.to(device, z_dtype)[..., D:]
    else:
        y, z = states[..., 1, :].to(device, y_dtype).contiguous(), proj[..., D:].to(device, z_dtype).contiguous()
    return y, z, weight.to(device)


def _tol(dtype):
    # bf16 outputs are rounded to 8 bits of mantissa (relative step 2^-8 .. 2^-7); fp32 keeps ~1e-7.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)


def _check(y, z, w, dout_seed=1, out_dtype=None):
    """Fused vs reference: the output (in ``out_dtype``, default y's) and the gradients of y, z and weight
    (scaled to each one's size)."""
    out_dtype = y.dtype if out_dtype is None else out_dtype
    ys, zs, ws = (t.detach().clone().requires_grad_() for t in (y, z, w))
    out = gated_rms_norm(ys, zs, ws, EPS, out_dtype=None if out_dtype == y.dtype else out_dtype)
    assert out.shape == y.shape and out.dtype == out_dtype and out.is_contiguous()
    yd, zd, wd = (t.detach().double().requires_grad_() for t in (y, z, w))
    want = _reference(yd, zd, wd)
    torch.testing.assert_close(out.double(), want, **_tol(out_dtype))
    dout = torch.randn(y.shape, generator=torch.Generator().manual_seed(dout_seed)).to(y.device, out_dtype)
    got = torch.autograd.grad(out, (ys, zs, ws), dout)
    ref = torch.autograd.grad(want, (yd, zd, wd), dout.double())
    for name, a, r, dtype in zip(("dy", "dz", "dweight"), got, ref, (y.dtype, z.dtype, torch.float32)):
        assert a.dtype == dtype, name
        scale = max(r.abs().max().item(), 1.0)
        tol = _tol(dtype)
        torch.testing.assert_close(a.double(), r, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 7), (3, 1, 40), (2, 9, 130), (37, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(shape, dtype):
    """Awkward widths (1, 7, 130, 257: no power of two) and row counts; y and z strided views."""
    _check(*_inputs(shape, dtype, dtype, seed=shape[-1]))


def test_contiguous_and_mixed_dtypes():
    """Contiguous inputs; y fp32 with a bf16 gate: output and dy in fp32, dz in bf16, or the output in
    bf16 when asked."""
    _check(*_inputs((3, 6, 24), torch.float32, torch.float32, seed=3, layout="contiguous"))
    _check(*_inputs((3, 6, 24), torch.float32, torch.bfloat16, seed=4))
    # as the mixers call it on the GPU: the recurrence's fp32 output (an LSTM's h, a strided view of its
    # state) gated by the bf16 projection, the output in bf16; dy in fp32 for the engine's backward
    _check(*_inputs((3, 6, 24), torch.float32, torch.bfloat16, seed=5), out_dtype=torch.bfloat16)
    _check(*_inputs((37, 130), torch.float32, torch.bfloat16, seed=6), out_dtype=torch.bfloat16)


def test_a_gradient_that_is_wrong_fails_the_check():
    """The tolerances catch a real bug: the backward without silu's derivative term z sig (1 - sig)."""
    y, z, w = _inputs((2, 4, 16), torch.float32, torch.float32, seed=5)
    zs = z.clone().requires_grad_()
    out = gated_rms_norm(y, zs, w, EPS)
    dz = torch.autograd.grad(out, zs, torch.ones_like(out))[0]
    zd = z.double().requires_grad_()
    want = torch.autograd.grad(_reference(y.double(), zd, w.double()), zd, torch.ones_like(out).double())[0]
    sig = torch.sigmoid(zd.detach())
    wrong = want / (1 + zd.detach() * (1 - sig))  # drop the term: dx * y * sig only
    torch.testing.assert_close(dz.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(dz.double(), wrong, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fwd_elements,bwd_elements,warps_per_sm", [(64, 32, 4), (128, 64, 8), (16, 16, 12)])
def test_tilings_and_partial_sums(monkeypatch, fwd_elements, bwd_elements, warps_per_sm):
    """Several rows per tile (masked last rows), backward programs (1 to 3) walking several row blocks with
    a ragged last program: the d weight partial sums over programs add up."""
    monkeypatch.setattr(gated_norm, "_FWD_TILE_ELEMENTS", fwd_elements)
    monkeypatch.setattr(gated_norm, "_BWD_TILE_ELEMENTS", bwd_elements)
    monkeypatch.setattr(gated_norm, "_BWD_WARPS_PER_SM", warps_per_sm)
    monkeypatch.setattr(gated_norm, "planning_sm_count", lambda device: 1)
    _check(*_inputs((3, 23, 13), torch.float32, torch.float32, seed=6))


def test_bad_inputs_raise():
    y, z, w = _inputs((2, 5, 8), torch.float32, torch.float32, seed=0)
    for args in ((y, z, w[:4]), (y.mT, z.mT, w[:5]), (y, z[:, :4], w), (y.double(), z, w)):
        # a weight of another width, channels not unit-strided, shapes that differ, fp64
        with pytest.raises(ValueError, match="gated_rms_norm"):
            gated_rms_norm(*args, EPS)


def test_opcheck():
    y, z, w = _inputs((9, 12), torch.float32, torch.float32, seed=7)
    torch.library.opcheck(gated_rms_norm_op, (y, z, w, EPS, torch.float32))
    torch.library.opcheck(gated_rms_norm_op, (y, z, w, EPS, torch.bfloat16))
    torch.library.opcheck(torch.ops.pararnn.gated_rms_norm_backward.default, (torch.randn(9, 12), y, z, w, EPS))


def test_compiled_graph_calls_the_library_ops():
    """fullgraph compile: the forward graph calls pararnn.gated_rms_norm, the backward
    pararnn.gated_rms_norm_backward (traced through the fakes); values and gradients equal eager."""
    torch._dynamo.reset()

    def fn(y, z, w):
        return gated_rms_norm(y * 2, z, w, EPS).square().sum()

    y, z, w = (t.detach().requires_grad_() for t in _inputs((2, 11, 12), torch.float32, torch.float32, seed=8))
    compiled, graphs = compiled_with_graphs(fn)
    got = compiled(y, z, w)
    got_grads = torch.autograd.grad(got, (y, z, w))
    want = fn(y, z, w)
    want_grads = torch.autograd.grad(want, (y, z, w))
    torch.testing.assert_close(got, want)
    for a, r in zip(got_grads, want_grads):
        torch.testing.assert_close(a, r)
    ops = [called_ops(gm) for gm in graphs]
    assert "pararnn.gated_rms_norm.default" in ops[0]
    assert "pararnn.gated_rms_norm_backward.default" in ops[1]


def test_layer_fused_path_equals_its_pytorch_path():
    """models.layers.GatedRMSNorm with the kernels forced on vs off (fp32): output and every gradient."""
    torch.manual_seed(0)
    norm = GatedRMSNorm(24)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    y, z, _ = _inputs((2, 6, 24), torch.float32, torch.float32, seed=9)
    outs = {}
    for fused in (True, False):
        norm.fused = fused
        norm.zero_grad()
        ys, zs = y.clone().requires_grad_(), z.clone().requires_grad_()
        out = norm(ys, zs)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        outs[fused] = (out, ys.grad, zs.grad, norm.weight.grad.clone())
    for a, r in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["paragru", "paralstm", "mamba2"])
def test_model_with_fused_mixer_path_equals_pytorch_path(arch):
    """A debug-preset LM on packed documents, forward + backward: logits and every parameter gradient
    equal with the mixers' gated norms and convs on the fused kernels and on their PyTorch code (the one
    model-level check of both fused ops)."""
    from pararnn_lm.models import ParaRNNLMForCausalLM, config_for

    torch.manual_seed(0)
    model = ParaRNNLMForCausalLM(config_for(arch, "debug", rnn_mode="newton_torch")).train()
    fusable = [m for m in model.modules() if isinstance(m, (GatedRMSNorm, CausalConv1d))]
    assert any(isinstance(m, GatedRMSNorm) for m in fusable)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    results = {}
    for fused in (True, False):
        for m in fusable:
            m.fused = fused
        model.zero_grad()
        out = model(ids, labels=ids, position_ids=position_ids)
        out.loss.backward()
        results[fused] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-5)
    for n, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][n], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("D", [1024, 4096])
def test_on_gpu_at_model_shapes(D):
    """(16, 2048) tokens at the 400M (1024) and the widest (4096) inner widths, bf16 strided inputs, and
    the mixers' call (fp32 strided y, bf16 gate and output), against the fp64 reference: output and all
    gradients."""
    _check(*_inputs((16, 2048, D), torch.bfloat16, torch.bfloat16, seed=D, device="cuda"))
    _check(*_inputs((16, 2048, D), torch.float32, torch.bfloat16, seed=D + 1, device="cuda"), out_dtype=torch.bfloat16)


@pytest.mark.parametrize("arch", ["paragru", "paralstm", "mamba2"])
def test_bf16_mixers_hand_the_fused_norm_their_fp32_output(arch):
    """Under bf16 autocast a mixer whose gated norm runs the fused kernels gives it the recurrence's (or
    the SSD's) fp32 output as it is - no rounded copy - and gets bf16 back for the out-projection; on the
    PyTorch path a ParaRNN norm sees y rounded to bf16. Both paths' logits and gradients agree within bf16
    rounding."""
    from pararnn_lm.models import ParaRNNLMForCausalLM, config_for

    torch.manual_seed(0)
    model = ParaRNNLMForCausalLM(config_for(arch, "debug", rnn_mode="newton_torch")).train()
    norms = [m for m in model.modules() if isinstance(m, GatedRMSNorm)]
    fusable = norms + [m for m in model.modules() if isinstance(m, CausalConv1d)]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    seen, results = [], {}
    hooks = [n.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, args[1].dtype, out.dtype)))
             for n in norms]
    for fused in (True, False):
        for m in fusable:
            m.fused = fused
        seen.clear()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        # unfused, the RNN mixers round y to their inputs' bf16; Mamba2 casts y to the residual stream's
        # dtype, fp32 under autocast
        y_dtype = torch.float32 if fused or arch == "mamba2" else torch.bfloat16
        assert seen and all(s == (y_dtype, torch.bfloat16, torch.bfloat16) for s in seen), (fused, seen)
        results[fused] = (out.logits.float().detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    for h in hooks:
        h.remove()
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0.05, atol=0.05)
    for n, g in results[False][1].items():
        scale = max(g.abs().max().item(), 1e-3)
        torch.testing.assert_close(results[True][1][n], g, rtol=0.1, atol=0.05 * scale, msg=lambda m, n=n: f"{n}: {m}")

