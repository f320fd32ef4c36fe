"""Causal-LM loss: cross-entropy (+ optional z-loss), plain or chunked over tokens.

The chunked ("fused linear") variant never materialises the (tokens, vocab) fp32 logits: each chunk
of hidden states is projected, reduced to (sum CE, sum lse^2) and dropped; its backward recomputes
the chunk's logits (activation checkpointing), so peak memory is O(chunk * vocab).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _ce_and_z(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over valid tokens of CE and logsumexp^2 (fp32, or fp64 for fp64 logits)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    valid = labels != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce = ((lse - target) * valid).sum()
    z = (lse.pow(2) * valid).sum()
    return ce, z


def _chunk_terms(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _ce_and_z(hidden @ weight.t(), labels)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the inputs: position t predicts labels[t+1]; last is ignored."""
    return torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)), dim=1)


def lm_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean CE, mean z term, number of valid targets) with HF's shift inside."""
    targets = shift_labels(labels)
    ce, z = _ce_and_z(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    n = (targets != IGNORE_INDEX).sum()
    denom = n.clamp_min(1)
    return ce / denom, z / denom, n


def lm_loss_chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same as :func:`lm_loss_from_logits` on ``hidden @ weight.T`` without materialising the logits."""
    targets = shift_labels(labels).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    ce_total = hidden.new_zeros((), dtype=acc)
    z_total = hidden.new_zeros((), dtype=acc)
    for start in range(0, h.shape[0], chunk_size):
        hs, ts = h[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (hs.requires_grad or weight.requires_grad):
            ce, z = checkpoint(_chunk_terms, hs, weight, ts, use_reentrant=False)
        else:
            ce, z = _chunk_terms(hs, weight, ts)
        ce_total, z_total = ce_total + ce, z_total + z
    n = (targets != IGNORE_INDEX).sum()
    denom = n.clamp_min(1)
    return ce_total / denom, z_total / denom, n
