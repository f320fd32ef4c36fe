"""The single-layer models of the synthetic tasks (paper Table 6), built once, from the project's models.

``build_model(arch, vocab_size, bare_mixer=..., d_model=64, num_heads=4)`` returns the project's causal LM
with one layer (:func:`pararnn_lm.models.build_synthetic_model`) for ``transformer``, ``mamba2``,
``paragru`` and ``paralstm``, or what a factory registered under the name with :func:`register_arch`
builds (any ``nn.Module`` with ``model(input_ids) -> logits``, a tensor or an output with ``.logits``;
:func:`logits_of` unwraps either).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from pararnn_lm.models import build_synthetic_model

ARCHS = ("transformer", "mamba2", "paragru", "paralstm")
# Table-6 architecture name -> mixer name in the project's model registry, where they differ.
MIXER_OF = {"transformer": "attention"}

Factory = Callable[..., nn.Module]
_FACTORIES: dict[str, Factory] = {}

# The gate that decides how much of h_{t-1} a cell keeps, as (pre-activation row, sign of "keep more"):
# ParaGRU keeps 1 - z (z = sigmoid(.) weighs the candidate), ParaLSTM keeps f * c_{t-1}.
RETAIN_GATE: dict[str, tuple[int, float]] = {"ParaGRU": (0, -1.0), "ParaLSTM": (0, 1.0)}
RNN_ARCHS = ("paragru", "paralstm")  # the Table-6 architectures built on those cells


def register_arch(name: str, factory: Factory) -> None:
    """Train ``factory(vocab_size=, bare_mixer=, d_model=, num_heads=, gain_bound=, **model_kwargs) -> nn.Module``
    under the architecture name ``name`` (e.g. a model of your own on the Table-6 tasks)."""
    _FACTORIES[name] = factory


def unregister_arch(name: str) -> None:
    _FACTORIES.pop(name, None)


def registered_archs() -> dict[str, Factory]:
    """The factories registered so far (a copy): worker processes re-register them (their registry starts empty)."""
    return dict(_FACTORIES)


def logits_of(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def build_model(arch: str, vocab_size: int, *, bare_mixer: bool, d_model: int = 64, num_heads: int = 4,
                gain_bound: float | None = 0.9, retain_gate_bias: float = 0.0, **extra: Any) -> nn.Module:
    """One-layer model of ``arch`` for a task of ``vocab_size`` tokens.

    ``bare_mixer``: embedding -> mixer -> head (keep-nth, parity), else the full block with its MLP;
    ``gain_bound``: the recurrent-gain bound of the RNN cells (the paper's 0.9; None for parity);
    ``retain_gate_bias``: initial bias of every cell's retention gate (:func:`init_retain_gate`), 0 being
    the paper's init (all biases zero); ``extra``: further fields of the model config."""
    kw = dict(vocab_size=vocab_size, bare_mixer=bare_mixer, d_model=d_model, num_heads=num_heads)
    if arch in _FACTORIES:
        model = _FACTORIES[arch](gain_bound=gain_bound, **kw, **extra)
    else:
        model = build_synthetic_model(MIXER_OF.get(arch, arch), rnn_gain_bound=gain_bound, **kw, **extra)
    if retain_gate_bias:
        init_retain_gate(model, retain_gate_bias)
    return model


@torch.no_grad()
def init_retain_gate(model: nn.Module, bias: float) -> int:
    """Set the input bias of each recurrent cell's retention gate so it starts keeping its state.

    ``bias`` > 0 starts every channel keeping sigmoid(bias) of h_{t-1} per step (ParaGRU: z bias
    -bias; ParaLSTM: forget bias +bias). With the paper's zero biases a channel keeps ~1/2 per step, so on
    keep-nth (L = 100) the last position's gradient reaching token 5 is ~1e-22 of that at the last token at
    init; bias 3 / 4 raise it to ~7e-3 / ~0.14. Returns the number of cell layers changed; a model with
    none (a Transformer, Mamba2) raises, so a diagnostic setting never silently does nothing.
    """
    changed = 0
    for module in model.modules():
        cell, b = getattr(module, "cell", None), getattr(module, "bias", None)
        gate = RETAIN_GATE.get(type(cell).__name__) if cell is not None else None
        if gate is None or not isinstance(b, nn.Parameter):
            continue
        row, sign = gate
        b[row].fill_(sign * bias)
        changed += 1
    if not changed:
        raise ValueError(f"retain_gate_bias={bias}: {type(model).__name__} has no ParaGRU/ParaLSTM cell with a "
                         f"bias (cells with a retention gate: {sorted(RETAIN_GATE)})")
    return changed
