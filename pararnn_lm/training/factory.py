"""Glue between the typed config and the project's packages: builds data, model and exports.

Kept apart from ``train.py`` so the loop reads as the algorithm, and apart from ``models/`` and
``data/`` so those packages know nothing about training configs.
"""
from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointManager
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_max, all_reduce_mean

logger = logging.getLogger(__name__)


def setup_logging(rank: int) -> None:
    """INFO on the main rank, warnings only elsewhere (Hydra configures handlers for the main process)."""
    logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) x ranks ({world_size})"
        )
    return cfg.train.global_batch_size // per_step


def resume_path(cfg: TrainConfig, checkpoints: CheckpointManager) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return checkpoints.latest()
    path = Path(cfg.resume)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r} is not a complete checkpoint directory (no COMPLETE marker)")
    return path


def _fault(kind: str) -> int | None:
    """The step of a ``PARARNN_TEST_FAULT=<kind>@<step>`` injection, if that kind is set."""
    name, _, at = os.environ.get("PARARNN_TEST_FAULT", "").partition("@")
    return int(at) if name == kind else None


def inject_fault(step: int) -> None:
    """Crash-safety tests: ``PARARNN_TEST_FAULT=sigkill@N`` (a hard crash) or ``sigterm@N`` (a
    preemption) delivered to this process after step N. Does nothing unless the variable is set."""
    for kind, sig in (("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM)):
        if _fault(kind) == step:
            os.kill(os.getpid(), sig)


def poison_loss(step: int) -> bool:
    """Non-finite-loss tests: ``PARARNN_TEST_FAULT=nan@N`` makes step N's loss NaN."""
    return _fault("nan") == step


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def memory_stats(info: DistInfo) -> dict[str, float]:
    """Peak GPU memory allocated so far, the largest over the ranks (one all-reduce at a log step)."""
    if info.device.type != "cuda":
        return {}
    peak = torch.tensor(torch.cuda.max_memory_allocated(info.device) / 2**30, device=info.device)
    return {"mem_peak_gib": float(all_reduce_max(peak, info))}


def newton_stats(model: nn.Module) -> dict[str, Any]:
    """Newton iterations and final residual of every parallel-RNN layer's last forward."""
    from pararnn_lm.kernels import ParaRNNLayer

    out: dict[str, Any] = {}
    for index, layer in enumerate(m for m in model.modules() if isinstance(m, ParaRNNLayer)):
        out[f"newton/iters/{index}"] = layer.last_stats.iterations
        out[f"newton/residual/{index}"] = layer.last_stats.residual
    return out


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


def _full_numel(param: torch.Tensor) -> int:
    # ZeRO-3 leaves each rank an empty placeholder (numel 0); DeepSpeed keeps the full size in ds_numel.
    return int(getattr(param, "ds_numel", param.numel()))


def flops_terms(model: nn.Module) -> tuple[int, int, int]:
    """(non-embedding parameters, attention layers, hidden size) for the FLOPs-per-token estimate."""
    config = model.config
    embedding = _full_numel(model.get_input_embeddings().weight)
    non_embedding = sum(_full_numel(p) for p in model.parameters()) - embedding
    return non_embedding, sum(m == "attention" for m in config.mixers), config.hidden_size


def export(backend, data, cfg: TrainConfig, run_dir: Path, info: DistInfo, tokens: int) -> str | None:
    """Write the HF directory (weights, config, tokenizer, self-contained code, card) on rank 0."""
    state = backend.consolidated_state_dict()  # collective under ZeRO-3
    if not info.is_main:
        return None
    from pararnn_lm.models import ParaRNNLMForCausalLM
    from pararnn_lm.models.export import export_model

    model = backend.module
    if cfg.deepspeed.zero3:  # the live module only holds shards
        model = ParaRNNLMForCausalLM(model.config)
        model.load_state_dict(state)
    source = cfg.data.path or f"{cfg.data.source} corpus"
    out = export_model(model, run_dir / "export", data.tokenizer, data=source, tokens=float(tokens))
    logger.info("exported the model to %s", out)
    return str(out)


def validation_loss(model: nn.Module, validation, cfg: TrainConfig, info: DistInfo) -> float:
    """Token-weighted validation NLL over ``eval.max_batches`` batches per rank, averaged over ranks.

    The same definition as the standalone ``python -m pararnn_lm.eval.perplexity`` (packed documents: a
    document's first token, which nothing in that document predicts, is not scored).
    """
    from pararnn_lm.eval.perplexity import evaluate_batches

    from .backends import _use_bf16

    with torch.no_grad(), torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=_use_bf16(cfg, info)):
        acc = evaluate_batches(model, itertools.islice(validation, cfg.eval.max_batches), info.device)
    sums = torch.tensor([acc.total_nll, float(acc.total_tokens)], dtype=torch.float64, device=info.device)
    sums = all_reduce_mean(sums, info)
    if sums[1] == 0:
        raise RuntimeError("the validation split produced no tokens; check the data.validation_* settings")
    return float(sums[0] / sums[1])
