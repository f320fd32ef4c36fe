from .cell import ParaGRU

__all__ = ["ParaGRU"]
