"""The ParaRNN paper's synthetic tasks (Table 6): generators and a single-layer trainer."""
from .tasks import IGNORE_INDEX, TASKS, SyntheticBatch, TaskSpec, k_hop, keep_nth, make_splits, mqar, parity

__all__ = ["IGNORE_INDEX", "TASKS", "SyntheticBatch", "TaskSpec", "k_hop", "keep_nth", "make_splits", "mqar", "parity"]
