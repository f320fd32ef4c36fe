"""The paper's cells, one folder each (the cell's step function; fused kernels join them later)."""
from .paragru import ParaGRU
from .paralstm import ParaLSTM

__all__ = ["ParaGRU", "ParaLSTM"]
