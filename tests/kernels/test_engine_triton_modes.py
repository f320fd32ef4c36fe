"""The Triton modes through the public parallel_rnn API (Triton's CPU interpreter; tiny shapes)."""
import pytest
import torch
from cells_for_tests import CELLS, make_inputs

from pararnn_lm.kernels import NewtonStats, parallel_rnn


@pytest.mark.parametrize("mode", ["newton_triton", "fused"])
@pytest.mark.parametrize("cell_name", ["paragru", "paralstm"])
def test_triton_modes_equal_the_fp64_reference(mode, cell_name):
    cell = CELLS[cell_name]()
    cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
    u, p, _ = make_inputs(cell, 1, 20, 5, seed=21, with_h0=False)
    h0 = (torch.randn(3, cell.state_size, 5, dtype=torch.float64) * 0.5).requires_grad_()
    y_ref, h_ref = parallel_rnn(cell, u, p, h0, cu_seqlens=cu, mode="sequential")
    args = [x.detach().float().requires_grad_() for x in (u, p, h0)]
    stats = NewtonStats()
    y, h_last = parallel_rnn(cell, *args, cu_seqlens=cu, mode=mode, stats=stats)
    assert stats.mode == mode and stats.converged
    assert (y.double() - y_ref).abs().max() < 1e-4 and (h_last.double() - h_ref).abs().max() < 1e-4
    w = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad((y_ref * w).sum() + h_ref.sum(), (u, p, h0))
    grads = torch.autograd.grad((y.double() * w).sum() + h_last.double().sum(), args)
    for g, g_ref in zip(grads, grads_ref):
        assert (g.double() - g_ref).abs().max() < 1e-4 * max(1.0, g_ref.abs().max().item())


def test_newton_triton_serves_any_cell_with_small_K():
    cell = CELLS["elman"]()  # defined only in the tests: no kernel knows it
    u, p, h0 = make_inputs(cell, 2, 9, 3, seed=2, requires_grad=False)
    y_ref, _ = parallel_rnn(cell, u, p, h0, mode="sequential")
    y, _ = parallel_rnn(cell, u.float(), p.float(), h0.float(), mode="newton_triton")
    assert (y.double() - y_ref).abs().max() < 1e-5


def test_triton_modes_refuse_what_they_cannot_run():
    u, p, _ = make_inputs(CELLS["dense3"](), 1, 4, 2, requires_grad=False)
    with pytest.raises(ValueError, match="mode 'newton_triton' cannot run Dense3Cell"):
        parallel_rnn(CELLS["dense3"](), u, p, mode="newton_triton")
    u, p, _ = make_inputs(CELLS["elman"](), 1, 4, 2, requires_grad=False)
    with pytest.raises(ValueError, match="mode 'fused' cannot run ElmanCell"):
        parallel_rnn(CELLS["elman"](), u, p, mode="fused")


def test_fused_takes_bf16_inputs_without_an_fp32_copy():
    cell = CELLS["paragru"]()
    u, p, h0 = make_inputs(cell, 2, 6, 4, dtype=torch.float32, requires_grad=False)
    y, h_last = parallel_rnn(cell, u.bfloat16(), p, h0, mode="fused")
    y_ref, _ = parallel_rnn(cell, u.bfloat16().double(), p.double(), h0.double(), mode="sequential")
    assert y.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    assert (y.double() - y_ref).abs().max() < 1e-2
