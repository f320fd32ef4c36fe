"""ParaGRU: a GRU with diagonal recurrent weights (K = 1 state, 3 gates, 3 parameter rows).

    z   = sigmoid(a_z * h_{t-1} + u_z)
    r   = sigmoid(a_r * h_{t-1} + u_r)
    c   = tanh(a_c * (h_{t-1} * r) + u_c)
    h_t = (1 - z) * h_{t-1} + z * c
"""
from __future__ import annotations

import torch

from ...cell import Cell


class ParaGRU(Cell):
    state_size = 1
    num_inputs = 3  # u rows: (z, r, c) pre-activations
    num_params = 3  # p rows: (a_z, a_r, a_c)
    param_names = ("a_z", "a_r", "a_c")

    def step(self, h_prev: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        h = h_prev[..., 0, :]
        z = torch.sigmoid(p[0] * h + u[..., 0, :])
        r = torch.sigmoid(p[1] * h + u[..., 1, :])
        c = torch.tanh(p[2] * (h * r) + u[..., 2, :])
        return ((1 - z) * h + z * c).unsqueeze(-2)
