"""The parallel-RNN engine: write a channelwise cell's step, get it applied in parallel over time.

    from pararnn_lm.kernels import Cell, NewtonConfig, parallel_rnn
    y, h_last = parallel_rnn(cell, u, p, h0=None, cu_seqlens=None, mode="auto", newton=NewtonConfig())
"""
from .api import parallel_rnn
from .cell import Cell
from .cells import ParaGRU, ParaLSTM
from .config import NewtonConfig, NewtonConvergenceError, NewtonStats
from .layers import CellLayerBase, ParaGRULayer, ParaLSTMLayer, ParaRNNLayer
from .modes import MODES, register_mode

__all__ = [
    "Cell", "NewtonConfig", "NewtonStats", "NewtonConvergenceError", "parallel_rnn",
    "ParaGRU", "ParaLSTM", "CellLayerBase", "ParaRNNLayer", "ParaGRULayer", "ParaLSTMLayer", "MODES", "register_mode",
]
