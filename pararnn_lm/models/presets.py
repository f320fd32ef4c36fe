"""Size presets (configs/model/presets/<size>.yaml) -> ParaRNNLMConfig, and parameter counting.

Hydra selects ``model.arch`` (configs/model/<arch>.yaml) and ``model.size`` (configs/size/<size>.yaml);
the training run (pararnn_lm/training/build.py) then calls ``config_for(arch, size, vocab_size=..., **overrides)``. The numbers
live in one YAML per size so the table, its derivation and the paper targets sit side by side.
"""
from __future__ import annotations

from typing import Any

import torch
import yaml

from ..provenance import config_dir
from .configuration import KNOWN_MIXERS, ParaRNNLMConfig

PRESET_DIR = config_dir() / "model" / "presets"
PRESET_SIZES = ("debug", "tiny", "25m", "400m", "1b", "2.9b", "7b")
ARCH_ALIASES = {"transformer": "attention"}


def load_preset(size: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{size}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"unknown size preset {size!r}; known: {', '.join(known)}")
    return yaml.safe_load(path.read_text())


def preset_fields(arch: str, size: str) -> tuple[dict[str, Any], float | None]:
    """Config fields of ``arch`` at ``size`` and the paper's parameter count (None for debug/tiny)."""
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in KNOWN_MIXERS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(KNOWN_MIXERS)} (or 'transformer')")
    table = load_preset(size)
    fields = {"vocab_size": table["vocab_size"], **table.get("common", {}), **table[arch], "mixer": arch}
    if "pad_vocab_size_multiple" in table:
        fields["pad_vocab_size_multiple"] = table["pad_vocab_size_multiple"]
    paper = fields.pop("paper_params", None)
    return fields, paper


def config_for(arch: str, size: str, **overrides: Any) -> ParaRNNLMConfig:
    """The preset config; ``overrides`` (e.g. vocab_size=len(tokenizer), rnn_mode=...) win."""
    fields, _ = preset_fields(arch, size)
    fields.update(overrides)
    config = ParaRNNLMConfig(**fields)
    if config.mixer == "mamba2" and "num_attention_heads" in fields and fields["num_attention_heads"] != config.mamba_num_heads:
        raise ValueError(f"preset {size}/{arch}: num_attention_heads={fields['num_attention_heads']} (paper heads) "
                         f"!= Mamba2 heads {config.mamba_num_heads} (= mamba_expand * hidden_size / mamba_headdim)")
    return config


def count_parameters(config: ParaRNNLMConfig) -> int:
    """Parameters of the causal LM, counted on the meta device (nothing is allocated)."""
    from .modeling import ParaRNNLMForCausalLM

    with torch.device("meta"):
        model = ParaRNNLMForCausalLM(config)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied weights counted once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
