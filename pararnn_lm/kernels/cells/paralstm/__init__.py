from .cell import ParaLSTM

__all__ = ["ParaLSTM"]
