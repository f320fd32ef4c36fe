"""Cells defined only for the tests: the engine must handle any channelwise cell, not just ours."""
import torch

from pararnn_lm.kernels import Cell, ParaGRU, ParaLSTM


class ElmanCell(Cell):
    """K = 1: h_t = tanh(a * h_{t-1} + u_t)."""

    state_size, num_inputs, num_params = 1, 1, 1

    def step(self, h_prev, u, p):
        return torch.tanh(p[0] * h_prev + u)


class Dense3Cell(Cell):
    """K = 3 with a dense per-channel 3x3 Jacobian: h_t = tanh(M h_{t-1} + u_t) * s + (1 - s) * h_{t-1}.

    M is built from 9 parameter rows; s = sigmoid of the third pre-activation couples gates too.
    """

    state_size, num_inputs, num_params = 3, 3, 9

    def step(self, h_prev, u, p):
        M = p.unflatten(0, (3, 3))  # (3, 3, D)
        mixed = (M * h_prev.unsqueeze(-3)).sum(-2)  # (..., 3, D): sum_j M_ij h_j
        s = torch.sigmoid(u[..., 2:3, :])
        return s * torch.tanh(mixed + u) + (1 - s) * h_prev

    def output(self, h):
        return h.sum(-2)


CELLS = {
    "paragru": ParaGRU,
    "paralstm": ParaLSTM,
    "elman": ElmanCell,
    "dense3": Dense3Cell,
}


def make_inputs(cell, B, T, D, dtype=torch.float64, gain=0.5, seed=0, with_h0=True, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, cell.num_inputs, D, generator=g, dtype=dtype)
    # Rows of norm-ish `gain` per channel entry: contractive like the paper's bounded init.
    p = (torch.rand(cell.num_params, D, generator=g, dtype=dtype) * 2 - 1) * gain
    h0 = torch.randn(B, cell.state_size, D, generator=g, dtype=dtype) * 0.5 if with_h0 else None
    if requires_grad:
        u.requires_grad_()
        p.requires_grad_()
        if h0 is not None:
            h0.requires_grad_()
    return u, p, h0
