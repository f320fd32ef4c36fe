"""ParaLSTM: a CIFG LSTM with peepholes and diagonal recurrent weights.

K = 2 states per channel, ordered [c; h]; 3 gates; 5 parameter rows.

    f   = sigmoid(a_f * h_{t-1} + u_f + c_f * c_{t-1})
    z   = tanh(a_z * h_{t-1} + u_z)
    c_t = f * c_{t-1} + (1 - f) * z
    o   = sigmoid(a_o * h_{t-1} + u_o + c_o * c_t)      (the output peephole sees the new c_t)
    h_t = o * tanh(c_t)
"""
from __future__ import annotations

import torch

from ...cell import Cell


class ParaLSTM(Cell):
    state_size = 2  # state rows: (c, h); the layer outputs h
    num_inputs = 3  # u rows: (f, z, o) pre-activations
    num_params = 5  # p rows: (a_f, a_z, a_o, c_f, c_o)
    param_names = ("a_f", "a_z", "a_o", "c_f", "c_o")

    def step(self, h_prev: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        c_prev, h = h_prev[..., 0, :], h_prev[..., 1, :]
        f = torch.sigmoid(p[0] * h + u[..., 0, :] + p[3] * c_prev)
        z = torch.tanh(p[1] * h + u[..., 1, :])
        c = f * c_prev + (1 - f) * z
        o = torch.sigmoid(p[2] * h + u[..., 2, :] + p[4] * c)
        return torch.stack((c, o * torch.tanh(c)), dim=-2)
