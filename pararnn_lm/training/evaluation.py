"""Validation loss during training: the same definition as ``python -m pararnn_lm.eval.perplexity``."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from .backends import uses_bf16
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_mean


def validation_loss(model: nn.Module, validation, cfg: TrainConfig, info: DistInfo) -> float:
    """Token-weighted validation NLL over ``eval.max_batches`` batches per rank, averaged over ranks.

    Packed documents: a document's first token, which nothing in that document predicts, is not scored.
    """
    from pararnn_lm.eval.perplexity import evaluate_batches

    with torch.no_grad(), torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, info)):
        acc = evaluate_batches(model, itertools.islice(validation, cfg.eval.max_batches), info.device)
    sums = torch.tensor([acc.total_nll, float(acc.total_tokens)], dtype=torch.float64, device=info.device)
    sums = all_reduce_mean(sums, info)
    if sums[1] == 0:
        raise RuntimeError("the validation split produced no tokens; check the data.validation_* settings")
    return float(sums[0] / sums[1])
