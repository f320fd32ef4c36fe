"""Fault injection for the crash-safety tests, driven by ``PARARNN_TEST_FAULT=<kind>@<step>``.

Kinds: ``sigkill`` (a hard crash after step N), ``sigterm`` (a preemption after step N), ``sigterm_group`` (a
preemption that reaches every process of the group, data workers included, as ``timeout``, a terminal or a
scheduler signalling a whole job does), ``sigint`` (Ctrl-C after step N), ``nan`` (step N's loss is NaN).
Without the variable every function here does nothing.
"""
from __future__ import annotations

import os
import signal

FAULT_VARIABLE = "PARARNN_TEST_FAULT"


def _fault_step(kind: str) -> int | None:
    """The step of a ``<kind>@<step>`` injection, if that kind is set."""
    name, _, at = os.environ.get(FAULT_VARIABLE, "").partition("@")
    return int(at) if name == kind else None


def inject_fault(step: int) -> None:
    """Deliver SIGKILL (``sigkill@N``), SIGTERM (``sigterm@N``) or SIGINT (``sigint@N``) to this process after step
    N; ``sigterm_group@N``: SIGTERM to its whole process group."""
    for kind, sig in (("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        if _fault_step(kind) == step:
            os.kill(os.getpid(), sig)
    if _fault_step("sigterm_group") == step:
        # sent from another process, as by `timeout` or a scheduler: PyTorch's DataLoader workers exit quietly
        # on a SIGTERM from their parent but die of one from anyone else
        sender = os.fork()
        if sender == 0:
            os.killpg(os.getpgid(0), signal.SIGTERM)
            os._exit(0)
        os.waitpid(sender, 0)


def poison_loss(step: int) -> bool:
    """Whether step N's loss is to be made NaN (``nan@N``)."""
    return _fault_step("nan") == step
