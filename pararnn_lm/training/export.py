"""The trained model as a Hugging Face directory at the end of a run."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import TrainConfig
from .distributed import DistInfo

logger = logging.getLogger(__name__)


def export_trained_model(backend, data, cfg: TrainConfig, run_dir: Path, info: DistInfo, tokens: int) -> str | None:
    """Write ``run_dir/export`` (weights in ``export.dtype``, config, tokenizer, self-contained code, card)
    on rank 0, from the fp32 master weights (both backends train fp32 parameters).

    Every rank must call it: under ZeRO-3 gathering the weights is a collective.
    """
    state = backend.consolidated_state_dict()
    if not info.is_main:
        return None
    from pararnn_lm.models import ParaRNNLMForCausalLM
    from pararnn_lm.models.export import export_model

    model = backend.module
    if cfg.deepspeed.zero3:  # the live module only holds shards
        model = ParaRNNLMForCausalLM(model.config)
        model.load_state_dict(state)
    source = cfg.data.path or f"{cfg.data.source} corpus"
    out = export_model(model, run_dir / "export", data.tokenizer, data=source, tokens=float(tokens),
                       dtype=cfg.export.dtype)
    logger.info("exported the model to %s", out)
    return str(out)
