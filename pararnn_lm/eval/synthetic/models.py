"""The single-layer models of the synthetic tasks (paper Table 6), built once, from the project's models.

Which model an (architecture, task) cell trains is data: :class:`ModelSpec`, read from the table
``pararnn_lm.eval.paper.TABLE6_MODELS`` (the paper's description, completed from its parameter counts) and
updated by a run's ``model_kwargs``; the trainer records the resolved spec in every result file.

``build_model(arch, task, d_model=64, num_heads=4)`` returns the project's causal LM with one layer
(:func:`pararnn_lm.models.build_synthetic_model`) for ``transformer``, ``mamba2``, ``paragru`` and
``paralstm``, or what a factory registered under the name with :func:`register_arch` builds (any
``nn.Module`` with ``model(input_ids) -> logits``, a tensor or an output with ``.logits``; :func:`logits_of`
unwraps either).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from pararnn_lm.models import build_synthetic_model

from ..paper import TABLE6_MODELS
from .tasks import TASKS

ARCHS = ("transformer", "mamba2", "paragru", "paralstm")
# Table-6 architecture name -> mixer name in the project's model registry, where they differ.
MIXER_OF = {"transformer": "attention"}
BLOCKS = ("bare", "full")

Factory = Callable[..., nn.Module]
_FACTORIES: dict[str, Factory] = {}

# The gate that decides how much of h_{t-1} a cell keeps, as (pre-activation row, sign of "keep more"):
# ParaGRU keeps 1 - z (z = sigmoid(.) weighs the candidate), ParaLSTM keeps f * c_{t-1}.
RETAIN_GATE: dict[str, tuple[int, float]] = {"ParaGRU": (0, -1.0), "ParaLSTM": (0, 1.0)}
RNN_ARCHS = ("paragru", "paralstm")  # the Table-6 architectures built on those cells


@dataclass(frozen=True)
class ModelSpec:
    """How one cell's one-layer model is built; every model is embedding -> RMSNorm -> mixer -> RMSNorm -> head.

    block: ``bare`` - the mixer without its conv, inner norm and gate, and without a residual (the cell layer
        of ParaGRU / ParaLSTM; in_proj -> SSD -> out_proj for Mamba2); ``full`` - the language model's block
        (pre-norm mixer with its residual; for the RNNs and Mamba2 in_proj, conv, cell, gated norm, out_proj).
    position_encoding: None | ``sinusoidal`` (a fixed table added to the embeddings; attention keeps RoPE).
    gain_bound: the RNN cells' recurrent-gain bound (None: unbounded; unused by Mamba2 and attention).
    mlp_width: hidden width of a SwiGLU after the mixer (pre-norm, residual); 0 = none.
    mixer: further ``ParaRNNLMConfig`` fields (Mamba2's layer shape, or any override of a run).
    """

    block: str
    position_encoding: str | None = None
    gain_bound: float | None = None
    mlp_width: int = 0
    mixer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"ModelSpec.block must be one of {'|'.join(BLOCKS)}, got {self.block!r}")

    def config_fields(self) -> dict[str, Any]:
        """The ``ParaRNNLMConfig`` fields this spec sets (beside vocabulary, width and heads)."""
        bare = self.block == "bare"
        return {"bare_mixer": bare, "bare_mixer_norms": bare, "position_encoding": self.position_encoding,
                "rnn_gain_bound": self.gain_bound, "intermediate_size": self.mlp_width, **self.mixer}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.name != "mixer")


def model_spec(arch: str, task: str, **overrides: Any) -> ModelSpec:
    """The Table-6 model of (``arch``, ``task``) with a run's ``model_kwargs`` applied: a :class:`ModelSpec`
    field replaces it (``position_encoding``, ``gain_bound``, ``mlp_width``, ``block``), any other key is a
    ``ParaRNNLMConfig`` field added to ``mixer`` (e.g. ``mamba_d_state``)."""
    try:
        paper = TABLE6_MODELS[(arch, task)]
    except KeyError:
        raise ValueError(f"no Table-6 model for ({arch!r}, {task!r}); architectures {ARCHS}, "
                         f"tasks {tuple(TASKS)}") from None
    spec_fields = {k: v for k, v in overrides.items() if k in SPEC_FIELDS}
    mixer = {**paper["mixer"], **{k: v for k, v in overrides.items() if k not in SPEC_FIELDS}}
    return ModelSpec(**{**paper, **spec_fields, "mixer": mixer})


def register_arch(name: str, factory: Factory) -> None:
    """Train ``factory(vocab_size=, task=, d_model=, num_heads=, **model_kwargs) -> nn.Module`` under the
    architecture name ``name`` (e.g. a model of your own on the Table-6 tasks)."""
    _FACTORIES[name] = factory


def unregister_arch(name: str) -> None:
    _FACTORIES.pop(name, None)


def registered_archs() -> dict[str, Factory]:
    """The factories registered so far (a copy): worker processes re-register them (their registry starts empty)."""
    return dict(_FACTORIES)


def resolved_spec(arch: str, task: str, **model_kwargs: Any) -> dict[str, Any] | None:
    """What a result file records of the model: the resolved :class:`ModelSpec`, or None for a registered
    architecture (its factory decides)."""
    return None if arch in _FACTORIES else model_spec(arch, task, **model_kwargs).as_dict()


def logits_of(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def build_model(arch: str, task: str, *, d_model: int = 64, num_heads: int = 4, retain_gate_bias: float = 0.0,
                **model_kwargs: Any) -> nn.Module:
    """One-layer model of ``arch`` for ``task`` (its vocabulary and :func:`model_spec`).

    ``retain_gate_bias``: initial bias of every cell's retention gate (:func:`init_retain_gate`), 0 being
    the paper's init (all biases zero); ``model_kwargs``: overrides of the spec (:func:`model_spec`)."""
    vocab_size = TASKS[task].vocab_size
    if arch in _FACTORIES:
        model = _FACTORIES[arch](vocab_size=vocab_size, task=task, d_model=d_model, num_heads=num_heads,
                                 **model_kwargs)
    else:
        spec = model_spec(arch, task, **model_kwargs)
        model = build_synthetic_model(MIXER_OF.get(arch, arch), vocab_size=vocab_size, d_model=d_model,
                                      num_heads=num_heads, **spec.config_fields())
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
