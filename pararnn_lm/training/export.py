"""The trained model as a Hugging Face directory: at the end of a run, and snapshots during it."""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import TrainConfig
from .distributed import DistInfo

logger = logging.getLogger(__name__)


def main_rank_model(backend, cfg: TrainConfig, info: DistInfo) -> nn.Module | None:
    """The full model on rank 0, None on the others. Every rank must call it: under ZeRO-3 the live
    module only holds shards, and gathering the weights (into a new CPU model on rank 0) is a collective."""
    if not cfg.deepspeed.zero3:
        return backend.module if info.is_main else None
    state = backend.consolidated_state_dict()
    return _model_from_state(backend.module.config, state) if info.is_main else None


def _model_from_state(config, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A CPU model holding copies of ``state`` and of ``config`` (the export writes into its config), built on
    the meta device: no initialisation pass."""
    from pararnn_lm.models import ParaRNNLMForCausalLM

    with torch.device("meta"):
        model = ParaRNNLMForCausalLM(copy.deepcopy(config))
    model.load_state_dict({k: v.detach().to("cpu", copy=True) for k, v in state.items()}, assign=True)
    model.tie_weights()
    return model


def hub_id_of(init_from: str | None) -> str | None:
    """The hub repository of the model a run starts from (``init_from``): the one its export's model card
    names (``--push-to-hub``); None for a checkpoint, a run folder, or an export never pushed."""
    card = Path(init_from) / "README.md" if init_from else None
    if card is None or not card.is_file():
        return None
    from huggingface_hub import ModelCard

    name = ModelCard.load(card).data.model_name
    return name if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def _export(model: nn.Module, out: Path, tokenizer: Any, cfg: TrainConfig, tokens: int,
            results: Mapping[str, Any] | None) -> Path:
    from pararnn_lm.models.export import export_model

    out = export_model(model, out, tokenizer, data=cfg.data.path or f"{cfg.data.source} corpus",
                       datasets=[cfg.data.path] if cfg.data.source == "hf" and cfg.data.path else [],
                       tokens=float(tokens), results=results, base_model=hub_id_of(cfg.init_from),
                       init_from=cfg.init_from, dtype=cfg.export.dtype)
    logger.info("exported the model to %s", out)
    return out


def export_trained_model(backend, data, cfg: TrainConfig, run_dir: Path, info: DistInfo, tokens: int,
                         results: Mapping[str, Any] | None = None) -> str | None:
    """Write ``run_dir/export`` (weights in ``export.dtype``, config, tokenizer, self-contained code, model
    card with ``results``) on rank 0, from the fp32 master weights (both backends train fp32 parameters).
    The live model is cast to ``export.dtype``: the run is over. Every rank must call it."""
    model = main_rank_model(backend, cfg, info)
    if model is None:
        return None
    return str(_export(model, run_dir / "export", data.tokenizer, cfg, tokens, results))


def export_snapshot(backend, tokenizer: Any, cfg: TrainConfig, out: Path, info: DistInfo, tokens: int) -> Path | None:
    """An export of the model as it is now (rank 0; None elsewhere), from a CPU copy: training goes on
    with the live model untouched. Every rank must call it."""
    model = main_rank_model(backend, cfg, info)
    if model is None:
        return None
    if model is backend.module:
        model = _model_from_state(model.config, model.state_dict())
    return _export(model, out, tokenizer, cfg, tokens, None)
