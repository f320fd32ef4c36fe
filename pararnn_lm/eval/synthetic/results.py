"""Names of the synthetic tasks' result files: the trainer (``python -m pararnn_lm.synthetic``) writes
them, :mod:`pararnn_lm.eval.tables` reads and labels them.

Layout of an output folder ``OUT``::

    OUT/ARCH__TASK.json                     one cell: best-of-seeds accuracy, every seed's result and curve
    OUT/table6.json, OUT/table6.md          the grid's cells, and Table 6 rendered beside the paper's numbers
    OUT/curves.png                          validation accuracy and training loss per step, a panel per task
    OUT/runs/ARCH__TASK__sSEED.result.json  a finished run (read back by --resume)
    OUT/runs/ARCH__TASK__sSEED.pt           a run stopped by its time budget (continued by --resume)

A sweep writes one such folder per setting, ``OUT/NAME/`` (``NAME`` = :func:`variant_name`), and beside
them ``sweep.json``, ``sweep.md``, ``sweep.png`` and ``sweep_curves.png``.
"""
from __future__ import annotations

from typing import Any

GRID_JSON, GRID_MD, CURVES_PNG = "table6.json", "table6.md", "curves.png"
RUNS_DIR = "runs"
SWEEP_JSON, SWEEP_MD, SWEEP_PNG, SWEEP_CURVES_PNG = "sweep.json", "sweep.md", "sweep.png", "sweep_curves.png"


def cell_file(arch: str, task: str) -> str:
    """The result file of one (architecture, task) cell."""
    return f"{arch}__{task}.json"


def run_key(arch: str, task: str, seed: int) -> str:
    """The name of one seed's saved state in ``OUT/runs`` (``KEY.pt``, ``KEY.result.json``)."""
    return f"{arch}__{task}__s{seed}"


def variant_name(overrides: dict[str, Any]) -> str:
    """The folder (and label) of one swept setting, e.g. ``lr=0.001,d_model=128``; ``base`` for none."""
    def fmt(v: Any) -> str:
        return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    return ",".join(f"{k}={fmt(v)}" for k, v in overrides.items()) or "base"
