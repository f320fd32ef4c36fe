"""Training support for ``train.py``: typed configs, distributed setup, optimiser and schedule,
atomic checkpoints with exact resume, metrics logging and preemption signals.

``train.py`` at the repository root is the readable loop; the pieces it composes live here.
"""
