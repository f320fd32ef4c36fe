"""Builds a run from its typed config: the rank's data, the model, and how the model executes
(activation checkpointing, compiled blocks, gradient accumulation).

Kept apart from ``pararnn_lm/train.py`` so the loop reads as the algorithm, and apart from
``pararnn_lm.models`` and ``pararnn_lm.data`` so those packages know nothing about training configs.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .distributed import DistInfo

logger = logging.getLogger(__name__)


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimiser step on each rank, so that all ranks together see the global batch."""
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) x ranks ({world_size})"
        )
    return cfg.train.global_batch_size // per_step


def build_data(cfg: TrainConfig, info: DistInfo):
    """The data bundle of this rank: endless resumable train loader, validation loader, tokenizer."""
    from pararnn_lm.data import build_datasets

    if cfg.data.label_mode != "unshifted":
        # The HF-style model shifts labels itself (token t predicts labels[t + 1]).
        raise ValueError("data.label_mode must be 'unshifted' for the models of this project (they shift labels)")
    # Rank 0 prepares tokenizer and token shards first; the others then reuse them from the cache.
    if not info.is_main:
        info.barrier()
    bundle = build_datasets(cfg.data, info.rank, info.world_size, batch_size=cfg.train.micro_batch_size)
    if info.is_main:
        info.barrier()
    return bundle


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The preset of ``model.arch`` at ``model.size``, sized to the tokenizer, with the run's settings."""
    from pararnn_lm.models import ParaRNNLMForCausalLM, config_for

    fields: dict[str, Any] = {
        "vocab_size": vocab_size, "tokenizer_vocab_size": vocab_size, "z_loss": cfg.optim.z_loss,
        "rnn_mode": cfg.model.rnn_mode, "max_position_embeddings": max(cfg.data.seq_len, 2048),
    }
    fields.update(cfg.model.overrides)
    config = config_for(cfg.model.arch, cfg.model.size, **fields)
    model = ParaRNNLMForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    logger.info("model %s/%s: %.2fM parameters (vocab %d)", cfg.model.arch, cfg.model.size, n / 1e6, config.vocab_size)
    for name, module in model.named_modules():  # Newton errors and warnings name the layer
        if hasattr(module, "last_stats") and hasattr(module, "name"):
            module.name = name
    return model


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Recompute each decoder block in the backward (HF gradient checkpointing, non-reentrant: works
    with compiled blocks, DeepSpeed ZeRO-3 and the Triton cell ops)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    logger.info("activation checkpointing: %d decoder blocks recompute in the backward", len(model.model.layers))
    return model


def compile_blocks(model: nn.Module, *, zero3: bool = False) -> nn.Module:
    """torch.compile each decoder block in place (torchtitan style): the norms, gates, conv, RoPE and
    SwiGLU elementwise work fuses; the Triton cell kernels are torch.library ops with fake kernels,
    so they stay single graph nodes. Embedding, head and loss stay eager.

    ``zero3``: DeepSpeed ZeRO-3 gathers parameters in forward hooks on every submodule, which dynamo
    cannot trace. Each block becomes a ZeRO-3 leaf module instead (one hook pair on the block gathers
    all its parameters before its forward and releases them after), and only the block's ``forward``
    is compiled, so the hooks run eagerly around the compiled code. Call before ``deepspeed.initialize``.
    """
    blocks = list(model.model.layers)
    if zero3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [type(blocks[0])])
        for block in blocks:
            block.forward = torch.compile(block.forward)
    else:
        for block in blocks:
            block.compile()
    logger.info("torch.compile: %d decoder blocks%s", len(blocks), " (ZeRO-3 leaf modules)" if zero3 else "")
    return model
