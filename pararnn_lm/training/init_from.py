"""Continued pretraining: ``init_from=PATH`` starts a new run from the weights of an earlier model.

PATH is one of

* a checkpoint directory of a run (``runs/X/checkpoints/step_N``), of either backend;
* a run folder (``runs/X``): its newest checkpoint that verifies, as ``resume=auto`` would pick it;
* a Hugging Face export of this project (``model.safetensors``, or shards with their index, and
  ``config.json``), as ``export.at_end`` and ``scripts/export_hf.py`` write it.

Only the weights are taken: optimiser, schedule, step, data position and RNG state start fresh. A
checkpoint is verified against its manifest (sizes and sha256) before it is read, and every file is
read with ``torch.load(weights_only=True)`` or safetensors: nothing is unpickled. The source must have
this run's architecture: the configuration fields that decide what the weights are (mixers, widths,
layers, vocabulary, heads, ...) and the name and shape of every weight; otherwise the error lists
every difference. A run that has checkpoints of its own resumes from them and does not read PATH again.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import MANIFEST, CheckpointError, CheckpointManager, load_tensors

logger = logging.getLogger(__name__)

# ParaRNNLMConfig fields that decide which weights a model has and what they mean. Left out: how the
# model executes (rnn_mode, attention_impl, ssd_backend, fused loss), the loss (z_loss), initialisation
# (init_std, mamba_dt_*), and the context (rope_theta, max_position_embeddings), which continued
# pretraining may change.
ARCHITECTURE_FIELDS = (
    "mixers", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "rnn_heads", "rnn_expand", "rnn_gain_bound", "rnn_gain_norm", "rnn_bias",
    "conv_kernel", "mamba_expand", "mamba_headdim", "mamba_d_state", "mamba_ngroups", "attention_bias",
    "mlp_bias", "bare_mixer", "bare_mixer_norms", "position_encoding", "tie_word_embeddings",
)
EXPORT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
LISTED = 20  # differences shown in the error; the rest are counted


class InitFromError(ValueError):
    """``init_from`` cannot be used: missing, not a model of this project, or another architecture."""


@dataclass(frozen=True)
class InitSource:
    """Where ``init_from`` points: a ``checkpoint`` directory, a ``run`` folder or an HF ``export``."""

    kind: str
    path: Path


def locate(init_from: str) -> InitSource:
    """What ``init_from`` names; reads only (the run calls it before writing anything)."""
    path = Path(init_from)
    if not path.exists():
        raise InitFromError(f"init_from={init_from}: no such file or directory")
    if (path / MANIFEST).is_file():
        return InitSource("checkpoint", path)
    if (path / "checkpoints").is_dir():
        return InitSource("run", path)
    if (path / "config.json").is_file() and any((path / name).is_file() for name in EXPORT_WEIGHTS):
        return InitSource("export", path)
    if (path / "config.json").is_file() and (path / "pytorch_model.bin").is_file():
        raise InitFromError(f"init_from={init_from} holds pickled weights (pytorch_model.bin), which are not "
                            "loaded (unpickling could run code); export them as safetensors")
    raise InitFromError(
        f"init_from={init_from} is neither a checkpoint (a step_* directory with its {MANIFEST} manifest), a run "
        "folder (with checkpoints/) nor an HF export (config.json and model.safetensors)")


def verified(source: InitSource, like: CheckpointManager) -> Path:
    """The checkpoint or export to read, checked against its manifest where it has one. Collective: the
    ranks verify shares of the files, as ``like`` (the run's own checkpoint manager) does."""
    if source.kind == "export":
        return source.path

    def manager(root: Path) -> CheckpointManager:
        return CheckpointManager(root, like.keep_last, like.rank, like.barrier, like.world_size, like.any_rank)

    if source.kind == "run":
        checkpoint = manager(source.path / "checkpoints").verified("auto")
        if checkpoint is None:
            raise InitFromError(f"init_from={source.path}: the run folder holds no complete checkpoint")
    else:
        checkpoint = manager(source.path.parent).verified(str(source.path))
    config = CheckpointManager.read_manifest(checkpoint).get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise InitFromError(f"init_from={checkpoint}: its manifest records no run configuration; it was not "
                            "written by train.py")
    return checkpoint


def load_initial_weights(model: nn.Module, source: Path) -> None:
    """Copy the weights of ``source`` (a verified checkpoint or an export) into ``model``, after checking
    that they are weights of this architecture."""
    weights, source_config = _read(source, model)
    tied = model.config.tie_word_embeddings
    if tied and "lm_head.weight" not in weights and _embedding_key(model) in weights:
        weights["lm_head.weight"] = weights[_embedding_key(model)]  # exports store a tied head once
    differences = _differences(model, weights, source_config)
    if differences:
        shown = differences[:LISTED] + ([f"... and {len(differences) - LISTED} more"] if len(differences) > LISTED else [])
        raise InitFromError(
            f"init_from={source} holds another architecture than this run's model:\n  " + "\n  ".join(shown) +
            "\nSet model.arch / model.size / model.overrides to the source's, or start from a source of this "
            "architecture.")
    model.load_state_dict(weights)  # cast to the model's dtype (fp32 masters) where the export is bf16
    logger.info("init_from: %d weights from %s (fresh optimiser, schedule and step)", len(weights), source)


def _embedding_key(model: nn.Module) -> str:
    embedding = model.get_input_embeddings().weight
    return next(name for name, p in model.named_parameters() if p is embedding)


def _read(source: Path, model: nn.Module):
    """(state dict, model config) of a checkpoint or export, read without unpickling."""
    from pararnn_lm.models import ParaRNNLMConfig, config_for

    if not (source / MANIFEST).is_file():  # an HF export
        if (source / "model.safetensors.index.json").is_file():
            shards = sorted(set(json.loads((source / "model.safetensors.index.json").read_text())["weight_map"].values()))
        else:
            shards = ["model.safetensors"]
        from safetensors.torch import load_file

        weights = {}
        for shard in shards:
            weights.update(load_file(source / shard))
        return weights, ParaRNNLMConfig.from_pretrained(source)
    if (source / "state.pt").is_file():
        state = load_tensors(source / "state.pt")
        weights = state["model"]
    elif (source / "deepspeed").is_dir():
        from pararnn_lm.models.export import _zero_state_dict  # the fp32 masters, consolidated from the shards

        weights = _zero_state_dict(source / "deepspeed")
    else:
        raise CheckpointError(f"{source} holds neither state.pt nor a deepspeed/ directory")
    # The source's model config, built as the run that wrote it built it (build.build_model), with the
    # vocabulary its embedding has.
    recorded = CheckpointManager.read_manifest(source)["config"]["model"]
    embedding = weights.get(_embedding_key(model))
    fields = {} if embedding is None else {"vocab_size": embedding.shape[0]}
    fields.update(recorded.get("overrides") or {})
    return weights, config_for(recorded["arch"], recorded["size"], **fields)


def _differences(model: nn.Module, weights: dict[str, torch.Tensor], source_config) -> list[str]:
    """Every way the source differs from ``model``: architecture fields, weights only one of them has,
    then weights of other shapes."""
    out = []
    for field in ARCHITECTURE_FIELDS:
        theirs, ours = getattr(source_config, field, None), getattr(model.config, field, None)
        if theirs != ours:
            out.append(f"{field}: source {theirs!r}, this run {ours!r}")
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    out += [f"{name}: only in this run's model {shape}" for name, shape in expected.items() if name not in found]
    out += [f"{name}: only in the source {shape}" for name, shape in found.items() if name not in expected]
    out += [f"{name}: source {found[name]}, this run {shape}" for name, shape in expected.items()
            if name in found and found[name] != shape]
    return out
