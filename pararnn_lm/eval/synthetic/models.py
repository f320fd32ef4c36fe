"""The ONE place the synthetic trainer gets its single-layer models from.

Contract: ``build_model(arch, vocab_size, bare_mixer=..., d_model=64, num_heads=4)`` returns an
``nn.Module`` with ``model(input_ids) -> logits`` (B, L, vocab_size) - a tensor, or an object with a
``.logits`` attribute (HF ``CausalLMOutput``); :func:`logits_of` unwraps either.

Resolution order for an architecture name:
1. a factory registered with :func:`register_arch` (tests register a tiny ``torch.nn.GRU`` this way);
2. the project's HF model (``models/``: one config + causal LM class for mixers ``paragru``,
   ``paralstm``, ``mamba2``, ``attention``), built with one layer via :func:`_from_project_models`;
3. for ``paragru`` / ``paralstm`` only, a minimal fallback around ``kernels.ParaRNNLayer``
   (embedding -> cell -> head) so the trainer runs before ``models/`` exists.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

ARCHS = ("transformer", "mamba2", "paragru", "paralstm")
# Table-6 architecture name -> mixer name in the project's model registry.
MIXER_OF = {"transformer": "attention", "attention": "attention", "mamba2": "mamba2",
            "paragru": "paragru", "paralstm": "paralstm"}

Factory = Callable[..., nn.Module]
_FACTORIES: dict[str, Factory] = {}

# The gate that decides how much of h_{t-1} a cell keeps, as (pre-activation row, sign of "keep more"):
# ParaGRU keeps 1 - z (z = sigmoid(.) weighs the candidate), ParaLSTM keeps f * c_{t-1}.
RETAIN_GATE: dict[str, tuple[int, float]] = {"ParaGRU": (0, -1.0), "ParaLSTM": (0, 1.0)}
RNN_ARCHS = ("paragru", "paralstm")  # the Table-6 architectures built on those cells


def register_arch(name: str, factory: Factory) -> None:
    """Register ``factory(vocab_size=, bare_mixer=, d_model=, num_heads=) -> nn.Module`` under ``name``."""
    _FACTORIES[name] = factory


def unregister_arch(name: str) -> None:
    _FACTORIES.pop(name, None)


def registered_archs() -> dict[str, Factory]:
    """The factories registered so far (a copy): worker processes re-register them (their registry starts empty)."""
    return dict(_FACTORIES)


def logits_of(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def build_model(arch: str, vocab_size: int, *, bare_mixer: bool, d_model: int = 64, num_heads: int = 4,
                retain_gate_bias: float = 0.0, **extra: Any) -> nn.Module:
    """``retain_gate_bias``: initial bias of every cell's retention gate (:func:`init_retain_gate`);
    0 is the paper's init (all biases zero)."""
    kw = dict(vocab_size=vocab_size, bare_mixer=bare_mixer, d_model=d_model, num_heads=num_heads, **extra)
    if arch in _FACTORIES:
        model = _FACTORIES[arch](**kw)
    else:
        try:
            model = _from_project_models(arch, **kw)
        except ImportError as err:  # models/ not there yet (or incomplete)
            if arch not in RNN_ARCHS:
                raise
            log.warning("models/ unavailable (%s); using the kernels-only fallback for %s", err, arch)
            model = _KernelsRNNLM(arch, vocab_size, d_model, num_heads, extra.get("gain_bound", 0.9))
    if retain_gate_bias:
        init_retain_gate(model, retain_gate_bias)
    return model


@torch.no_grad()
def init_retain_gate(model: nn.Module, bias: float) -> int:
    """Set the input bias of each recurrent cell's retention gate so it starts keeping its state.

    ``bias`` > 0 starts every channel keeping sigmoid(bias) of h_{t-1} per step (ParaGRU: z bias
    -bias; ParaLSTM: forget bias +bias). With the paper's zero biases a channel keeps ~1/2 per step, so
    the gradient from the last position back to token 5 of a 100-token sequence scales like 2^-95 at
    init (keep-nth; ``scripts/probe_keep_nth.py``). Returns the number of cell layers changed; a model
    with none (a Transformer, Mamba2) raises, so a diagnostic flag never silently does nothing.
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


def _from_project_models(arch: str, *, vocab_size: int, bare_mixer: bool, d_model: int, num_heads: int,
                         **extra: Any) -> nn.Module:
    """One-layer model from ``models/`` (HF config + causal LM). Raises ImportError if unavailable."""
    mod = importlib.import_module("models")
    builder = getattr(mod, "build_synthetic_model", None)
    mixer = MIXER_OF.get(arch, arch)
    if builder is not None:  # preferred: models/ knows best how to make its 1-layer / bare variants
        if "gain_bound" in extra:  # our task-level name -> the config field
            extra["rnn_gain_bound"] = extra.pop("gain_bound")
        return builder(mixer, vocab_size=vocab_size, bare_mixer=bare_mixer, d_model=d_model,
                       num_heads=num_heads, **extra)
    cfg_cls = _first_attr(mod, ("ParaRNNLMConfig",))
    lm_cls = _first_attr(mod, ("ParaRNNLMForCausalLM",))
    gain_bound = extra.pop("gain_bound", 0.9)
    wanted = dict(
        vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=1, num_attention_heads=num_heads,
        mixer=mixer, bare_mixer=bare_mixer,
        # bare = the mixer alone (keep-nth, parity); full block = mixer + SwiGLU MLP (MQAR, k-hop)
        intermediate_size=0 if bare_mixer else 3 * d_model,
        rnn_gain_bound=gain_bound,
        # Mamba2 inner width 2*d split into `num_heads` heads (the paper's "4 heads")
        mamba_headdim=max(2 * d_model // num_heads, 1),
        max_position_embeddings=max(int(extra.pop("max_position_embeddings", 0)), 2048),
        use_cache=False, **extra,
    )
    params = inspect.signature(cfg_cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    cfg = cfg_cls(**{k: v for k, v in wanted.items() if k in params or accepts_any})
    return lm_cls(cfg)


def _first_attr(mod: Any, names: tuple[str, ...]) -> Any:
    for n in names:
        if hasattr(mod, n):
            return getattr(mod, n)
    for n in dir(mod):  # any class whose name ends like one of the wanted suffixes
        if any(n.endswith(s) for s in names):
            return getattr(mod, n)
    raise ImportError(f"models/ exports none of {names}")


class DenseGRULM(nn.Module):
    """Control: embedding -> ``torch.nn.GRU`` (a DENSE recurrent matrix, unlike the paper's diagonal
    cells) -> head. Not in Table 6; register it with :func:`register_arch` to train it like the others
    (``scripts/probe_keep_nth.py``, the trainer's tests)."""

    def __init__(self, vocab_size: int, d_model: int, **_: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.rnn = nn.GRU(d_model, d_model, batch_first=True)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(input_ids))[0])


class _KernelsRNNLM(nn.Module):
    """Fallback bare-mixer LM: embedding -> ParaGRU/ParaLSTM layer -> linear head (no norm, no MLP)."""

    def __init__(self, arch: str, vocab_size: int, d_model: int, num_heads: int, gain_bound: float | None = 0.9) -> None:
        super().__init__()
        from pararnn_lm.kernels import ParaGRULayer, ParaLSTMLayer

        layer_cls = ParaGRULayer if arch == "paragru" else ParaLSTMLayer
        self.embed = nn.Embedding(vocab_size, d_model)
        # Paper: recurrent-gain norm clip 0.9 for synthetic tasks, none for parity (TaskSpec.gain_bound).
        self.mixer = layer_cls(d_model, num_heads, gain_bound=gain_bound)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        y, _ = self.mixer(self.embed(input_ids))
        return self.head(y)
