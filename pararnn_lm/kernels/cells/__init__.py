"""The paper's cells, one folder each: ``cell.py`` (the step, what every mode runs) and ``fused.py`` (the
``fused`` mode's ops for that cell, on the shared kernels of kernels/shooting.py)."""
from .paragru import ParaGRU
from .paralstm import ParaLSTM

__all__ = ["ParaGRU", "ParaLSTM"]
