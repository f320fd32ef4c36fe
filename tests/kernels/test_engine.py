"""newton_torch against the sequential reference: outputs, final states, every gradient."""
import logging

import pytest
import torch
from cells_for_tests import CELLS, Dense3Cell, make_inputs

from pararnn_lm.kernels import NewtonConfig, NewtonConvergenceError, NewtonStats, parallel_rnn
from pararnn_lm.kernels.newton_torch import step_and_jacobian

F64_ATOL = 1e-10


def _grads(y, h_last, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    wh = torch.randn(h_last.shape, generator=g, dtype=h_last.dtype)
    loss = (y * wy).sum() + (h_last * wh).sum()
    return torch.autograd.grad(loss, [x for x in inputs if x is not None])


@pytest.mark.parametrize("cell_name", list(CELLS))
@pytest.mark.parametrize("T", [1, 2, 63, 1000])
@pytest.mark.parametrize("with_h0", [True, False])
def test_newton_equals_sequential_fp64(cell_name, T, with_h0):
    cell = CELLS[cell_name]()
    B, D = (2, 3) if T == 1000 else (3, 5)
    u, p, h0 = make_inputs(cell, B, T, D, with_h0=with_h0, seed=T)
    stats = NewtonStats()
    y_ref, h_ref = parallel_rnn(cell, u, p, h0, mode="sequential")
    y, h_last = parallel_rnn(cell, u, p, h0, mode="newton_torch", stats=stats)
    assert stats.converged and not stats.fell_back and stats.mode == "newton_torch"
    assert (y - y_ref).abs().max() < F64_ATOL
    assert (h_last - h_ref).abs().max() < F64_ATOL
    for g, g_ref in zip(_grads(y, h_last, (u, p, h0)), _grads(y_ref, h_ref, (u, p, h0))):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cell_name", ["paragru", "paralstm", "dense3"])
def test_gradcheck(cell_name):
    cell = CELLS[cell_name]()
    u, p, h0 = make_inputs(cell, 2, 7, 3, seed=3)
    fn = lambda u, p, h0: parallel_rnn(cell, u, p, h0, mode="newton_torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (u, p, h0), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("cell_name", ["paragru", "paralstm"])
def test_fp32_matches_fp64_reference_at_T1024(cell_name):
    cell = CELLS[cell_name]()
    u, p, h0 = make_inputs(cell, 2, 1024, 16, seed=5, requires_grad=False)
    y_ref, h_ref = parallel_rnn(cell, u, p, h0, mode="sequential")
    y, h_last = parallel_rnn(cell, u.float(), p.float(), h0.float(), mode="newton_torch")
    assert y.dtype == torch.float32 and h_last.dtype == torch.float32
    assert (y.double() - y_ref).abs().max() < 1e-4
    assert (h_last.double() - h_ref).abs().max() < 1e-4


@pytest.mark.parametrize("cell_name", list(CELLS))
@pytest.mark.parametrize("shared_h0", [True, False])
def test_packed_documents_equal_separate_runs(cell_name, shared_h0):
    cell = CELLS[cell_name]()
    cu = torch.tensor([0, 1, 9, 9, 40, 41], dtype=torch.int32)  # includes a 1-step and an empty document
    N, T, D = len(cu) - 1, int(cu[-1]), 4
    u, p, _ = make_inputs(cell, 1, T, D, seed=11, with_h0=False)
    h0 = (torch.randn(1 if shared_h0 else N, cell.state_size, D, dtype=torch.float64) * 0.5).requires_grad_()
    y, h_last = parallel_rnn(cell, u, p, h0, cu_seqlens=cu, mode="newton_torch")
    assert y.shape == (1, T, D) and h_last.shape == (N, cell.state_size, D)
    ys, hs = [], []
    for n in range(N):
        a, b = int(cu[n]), int(cu[n + 1])
        h0_n = h0[0 if shared_h0 else n].unsqueeze(0)
        if b > a:
            y_n, h_n = parallel_rnn(cell, u[:, a:b], p, h0_n, mode="sequential")
            ys.append(y_n)
            hs.append(h_n)
        else:
            hs.append(h0_n)  # an empty document keeps its initial state
    y_sep, h_sep = torch.cat(ys, dim=1), torch.cat(hs)
    assert (y - y_sep).abs().max() < F64_ATOL and (h_last - h_sep).abs().max() < F64_ATOL
    for g, g_ref in zip(_grads(y, h_last, (u, p, h0)), _grads(y_sep, h_sep, (u, p, h0))):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


def test_no_gradient_crosses_a_document_boundary():
    cell = CELLS["paragru"]()
    u, p, _ = make_inputs(cell, 1, 20, 3, seed=2, with_h0=False)
    cu = torch.tensor([0, 8, 20])
    y, _ = parallel_rnn(cell, u, p, cu_seqlens=cu, mode="newton_torch")
    (grad_u,) = torch.autograd.grad(y[:, 8:].sum(), u)
    assert grad_u[:, :8].abs().max() == 0 and grad_u[:, 8:].abs().max() > 0


def test_jacobians_come_from_step():
    cell = Dense3Cell()
    u, p, h0 = make_inputs(cell, 1, 1, 2, seed=4, requires_grad=False)
    _, J = step_and_jacobian(cell, h0.unsqueeze(1), u, p)
    for d in range(2):
        def f_channel(h, d=d):
            full = h0.unsqueeze(1).clone()
            full[0, 0, :, d] = h
            return cell.step(full, u, p)[0, 0, :, d]

        J_ref = torch.autograd.functional.jacobian(f_channel, h0[0, :, d])
        torch.testing.assert_close(J[0, 0, :, :, d], J_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell_name", ["paragru", "paralstm"])
def test_default_layer_init_converges_quickly(cell_name):
    from pararnn_lm.kernels import ParaGRULayer, ParaLSTMLayer

    torch.manual_seed(0)
    layer = (ParaGRULayer if cell_name == "paragru" else ParaLSTMLayer)(64, 4, mode="newton_torch")
    layer(torch.randn(2, 2048, 64))
    stats = layer.last_stats
    assert stats.converged and not stats.fell_back
    assert stats.iterations <= 3, stats


def test_large_gains_fall_back_to_the_exact_answer(caplog):
    cell = CELLS["paragru"]()
    u, p, h0 = make_inputs(cell, 2, 500, 8, seed=9, requires_grad=False)
    p = (torch.rand(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 2 + 2) * torch.sign(
        torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype)
    )  # |a| ~ U(2, 4)
    u, p, h0 = u.requires_grad_(), p.requires_grad_(), h0.requires_grad_()
    stats = NewtonStats()
    cfg = NewtonConfig(max_iters=3, on_failure="fallback")
    with caplog.at_level(logging.WARNING):
        y, h_last = parallel_rnn(cell, u, p, h0, mode="newton_torch", newton=cfg, stats=stats, name="layer.7")
    assert stats.fell_back and not stats.converged and stats.residual > cfg.tolerance_for(u.dtype)
    assert "layer.7" in caplog.text
    y_ref, h_ref = parallel_rnn(cell, u, p, h0, mode="sequential")
    assert (y - y_ref).abs().max() < F64_ATOL and (h_last - h_ref).abs().max() < F64_ATOL
    for g, g_ref in zip(_grads(y, h_last, (u, p, h0)), _grads(y_ref, h_ref, (u, p, h0))):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


def test_large_gains_raise_with_the_raise_policy():
    cell = CELLS["paralstm"]()
    u, p, h0 = make_inputs(cell, 2, 500, 8, seed=9, gain=4.0, requires_grad=False)
    cfg = NewtonConfig(max_iters=2, on_failure="raise")
    with pytest.raises(NewtonConvergenceError, match=r"blocks\.3\.mixer: scaled residual [0-9.e+-]+ > tol"):
        parallel_rnn(cell, u, p, h0, mode="newton_torch", newton=cfg, name="blocks.3.mixer")


def test_diverging_newton_still_returns_the_sequential_answer():
    # Gains this large overflow Newton's iterates to inf/NaN; fallback must still be exact.
    cell = CELLS["elman"]()
    u, p, _ = make_inputs(cell, 1, 300, 4, seed=0, gain=30.0, requires_grad=False)
    stats = NewtonStats()
    y, _ = parallel_rnn(cell, u, p, mode="newton_torch", newton=NewtonConfig(max_iters=20), stats=stats)
    y_ref, _ = parallel_rnn(cell, u, p, mode="sequential")
    assert stats.fell_back and torch.isfinite(y).all() and (y - y_ref).abs().max() < F64_ATOL


def test_half_precision_inputs_compute_in_fp32():
    cell = CELLS["paragru"]()
    u, p, h0 = make_inputs(cell, 2, 100, 8, dtype=torch.float32, requires_grad=False)
    y, h_last = parallel_rnn(cell, u.bfloat16(), p, h0, mode="newton_torch")
    y_ref, _ = parallel_rnn(cell, u.bfloat16().double(), p.double(), h0.double(), mode="sequential")
    assert y.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    assert (y.double() - y_ref).abs().max() < 1e-2  # bf16 output rounding only


def test_unknown_mode_lists_known_modes():
    cell = CELLS["paragru"]()
    u, p, _ = make_inputs(cell, 1, 4, 2, requires_grad=False)
    with pytest.raises(ValueError, match="unknown parallel_rnn mode 'fastest'.*newton_torch"):
        parallel_rnn(cell, u, p, mode="fastest")


def test_auto_uses_newton_torch_on_cpu():
    cell = CELLS["paragru"]()
    u, p, _ = make_inputs(cell, 1, 4, 2, requires_grad=False)
    stats = NewtonStats()
    parallel_rnn(cell, u, p, stats=stats)
    assert stats.mode == "newton_torch"


@pytest.mark.parametrize("cell_name", ["paragru", "paralstm"])
def test_residual_history_starts_at_the_initial_guess_and_records_every_update(cell_name):
    cell = CELLS[cell_name]()
    u, p, h0 = make_inputs(cell, 2, 200, 4, gain=0.9, seed=3, requires_grad=False)
    stats = NewtonStats()
    parallel_rnn(cell, u, p, h0, mode="newton_torch", stats=stats)
    assert stats.converged and len(stats.residuals) == stats.iterations + 1 >= 3
    # the initial guess, written out: h_t = f(0, u_t), and f(h0, u_0) at t = 0
    guess = cell.step(torch.zeros(2, 200, cell.state_size, 4, dtype=u.dtype), u, p)
    guess[:, 0] = cell.step(h0[:, None], u[:, :1], p)[:, 0]
    previous = torch.cat([h0[:, None], guess[:, :-1]], dim=1)
    first = ((cell.step(previous, u, p) - guess).abs() / (1 + guess.abs())).max().item()
    assert stats.residuals[0] == pytest.approx(first, rel=1e-12)
    for capped in range(stats.iterations + 1):  # a solve stopped after `capped` updates reports that residual
        at_cap = NewtonStats()
        parallel_rnn(cell, u, p, h0, mode="newton_torch", stats=at_cap,
                     newton=NewtonConfig(max_iters=capped, on_failure="fallback"))
        assert at_cap.residual == stats.residuals[capped] and at_cap.residuals == stats.residuals[:capped + 1]
    assert stats.residuals[-1] <= 1e-12 < stats.residuals[0]
    assert all(b < a for a, b in zip(stats.residuals, stats.residuals[1:]))  # Newton: every update helps here
