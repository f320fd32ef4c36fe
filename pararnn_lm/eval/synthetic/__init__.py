"""The ParaRNN paper's synthetic tasks (Table 6): generators (``tasks``), one-layer models (``models``) and the
names of result files (``results``); the trainer is the app :mod:`pararnn_lm.synthetic`."""
from .tasks import IGNORE_INDEX, TASKS, SyntheticBatch, TaskSpec, k_hop, keep_nth, make_splits, mqar, parity

__all__ = ["IGNORE_INDEX", "TASKS", "SyntheticBatch", "TaskSpec", "k_hop", "keep_nth", "make_splits", "mqar", "parity"]
