"""ParaGRU and ParaLSTM against the paper's equations (arXiv 2510.21450, section 3), written out here.

Every other engine test compares a mode with ``mode="sequential"``, which calls the cell's own ``step``:
a wrong sign in ``step`` would pass them all. Here the recurrences are written again, independently of the
cells' code: once with Python's ``math`` on scalars (values), once as a plain fp64 PyTorch loop with its
own sigmoid/tanh (values and gradients through autograd). Every solver mode must match both.
"""
from __future__ import annotations

import math

import pytest
import torch

from pararnn_lm.kernels import NewtonConfig, parallel_rnn
from pararnn_lm.kernels.cells import ParaGRU, ParaLSTM
from pararnn_lm.kernels.modes import MODES


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def _tanh(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * _sigmoid(2.0 * x) - 1.0


def paper_gru(u: torch.Tensor, p: torch.Tensor, h0: torch.Tensor):
    """z = s(a_z h + p_z); r = s(a_r h + p_r); c = tanh(a_c (h r) + p_c); h' = (1 - z) h + z c.
    u (B, T, 3, D) with gate rows (z, r, c); p (3, D) = (a_z, a_r, a_c); h0 (B, 1, D)."""
    a_z, a_r, a_c = p
    h, ys = h0[:, 0], []
    for t in range(u.shape[1]):
        z = _sigmoid(a_z * h + u[:, t, 0])
        r = _sigmoid(a_r * h + u[:, t, 1])
        c = _tanh(a_c * (h * r) + u[:, t, 2])
        h = (1 - z) * h + z * c
        ys.append(h)
    return torch.stack(ys, 1), h[:, None]


def paper_lstm(u: torch.Tensor, p: torch.Tensor, h0: torch.Tensor):
    """CIFG with peepholes: f = s(a_f h + p_f + c_f c); z = tanh(a_z h + p_z); c' = f c + (1 - f) z;
    o = s(a_o h + p_o + c_o c'); h' = o tanh(c'). u rows (f, z, o); p = (a_f, a_z, a_o, c_f, c_o);
    state rows (c, h); the output is h."""
    a_f, a_z, a_o, c_f, c_o = p
    c, h, ys = h0[:, 0], h0[:, 1], []
    for t in range(u.shape[1]):
        f = _sigmoid(a_f * h + u[:, t, 0] + c_f * c)
        z = _tanh(a_z * h + u[:, t, 1])
        c = f * c + (1 - f) * z
        o = _sigmoid(a_o * h + u[:, t, 2] + c_o * c)
        h = o * _tanh(c)
        ys.append(h)
    return torch.stack(ys, 1), torch.stack((c, h), 1)


CASES = {"paragru": (ParaGRU, paper_gru), "paralstm": (ParaLSTM, paper_lstm)}


def _scalar_gru(us, a, h):
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    out = []
    for u_z, u_r, u_c in us:
        z, r = sig(a[0] * h + u_z), sig(a[1] * h + u_r)
        h = (1 - z) * h + z * math.tanh(a[2] * h * r + u_c)
        out.append(h)
    return out


def _scalar_lstm(us, a, c, h):
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    out = []
    for u_f, u_z, u_o in us:
        f = sig(a[0] * h + u_f + a[3] * c)
        z = math.tanh(a[1] * h + u_z)
        c = f * c + (1 - f) * z
        h = sig(a[2] * h + u_o + a[4] * c) * math.tanh(c)
        out.append(h)
    return out


def _inputs(cell, B, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    u = (1.5 * torch.randn(B, T, cell.num_inputs, D, generator=g, dtype=torch.float64)).to(dtype)
    # Gains inside the paper's bound (|a| <= 0.5 per channel), peepholes included.
    p = (torch.rand(cell.num_params, D, generator=g, dtype=torch.float64) - 0.5).to(dtype)
    h0 = (0.5 * torch.randn(B, cell.state_size, D, generator=g, dtype=torch.float64)).to(dtype)
    return [x.requires_grad_() for x in (u, p, h0)]


@pytest.mark.parametrize("name", list(CASES))
def test_written_out_equations_match_python_math(name):
    """The test's own torch loop equals the same equations on Python floats (one channel, 12 steps)."""
    cell_cls, paper = CASES[name]
    u, p, h0 = (x.detach() for x in _inputs(cell_cls(), 1, 12, 1, torch.float64, seed=7))
    y, _ = paper(u, p, h0)
    us = u[0, :, :, 0].tolist()
    a = p[:, 0].tolist()
    want = _scalar_gru(us, a, h0[0, 0, 0].item()) if name == "paragru" else _scalar_lstm(us, a, *h0[0, :, 0].tolist())
    assert y[0, :, 0].tolist() == pytest.approx(want, abs=1e-12)


def _modes(name):
    cell = CASES[name][0]()
    u = torch.zeros(1, 1, cell.num_inputs, 1)
    return [m for m in ("sequential", "newton_torch", "newton_triton", "fused") if m in MODES and MODES[m].available(cell, u)]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["sequential", "newton_torch", "newton_triton", "fused"])
def test_every_mode_matches_the_paper_values_and_gradients(name, mode):
    cell_cls, paper = CASES[name]
    cell = cell_cls()
    if mode not in _modes(name):
        pytest.skip(f"{mode} does not serve {name} here")
    # fp64 where the mode computes in fp64; the Triton modes compute in fp32.
    triton_mode = mode in ("newton_triton", "fused")
    dtype = torch.float32 if triton_mode else torch.float64
    tol = dict(rtol=2e-4, atol=2e-5) if triton_mode else dict(rtol=1e-9, atol=1e-11)
    B, T, D = (2, 37, 5) if triton_mode else (3, 50, 6)
    u, p, h0 = _inputs(cell, B, T, D, dtype, seed=11)
    y, h_last = parallel_rnn(cell, u, p, h0, mode=mode, newton=NewtonConfig(max_iters=60, on_failure="raise"))
    u64, p64, h064 = (x.detach().double().requires_grad_() for x in (u, p, h0))
    y_ref, h_ref = paper(u64, p64, h064)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(h_last.double(), h_ref, **tol)

    g = torch.Generator().manual_seed(3)
    wy, wh = torch.randn(y.shape, generator=g, dtype=torch.float64), torch.randn(h_last.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * wy).sum() + (h_last.double() * wh).sum(), (u, p, h0))
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (h_ref * wh).sum(), (u64, p64, h064))
    for got, want, what in zip(grads, grads_ref, ("du", "dp", "dh0")):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= tol["atol"] * max(1.0, scale) + tol["rtol"] * scale, what
