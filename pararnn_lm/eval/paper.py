"""The ParaRNN paper's published numbers, in one place, with their source.

Source: F. Danieli, P. Rodriguez, M. Sarabia, X. Suau, L. Zappella, "ParaRNN: Unlocking Parallel Training
of Nonlinear RNNs for Large Language Models", arXiv:2510.21450 (ICLR 2026) - Table 5 (language models),
Table 6 (synthetic tasks) and the appendices giving their setups. Only numbers read from the paper are
listed; anything else is ``None`` (unknown), never guessed.
"""
from __future__ import annotations

from typing import Any

from ..provenance import config_file

SOURCE = "Danieli et al., ParaRNN, arXiv:2510.21450 (ICLR 2026)"

# Architecture display names (rows) in the paper's order.
ARCH_NAMES = {"transformer": "Transformer", "mamba2": "Mamba2", "paragru": "ParaGRU", "paralstm": "ParaLSTM"}

# Table 6: test accuracy (%) of single-layer models, best of 3 seeds.
TABLE6: dict[str, dict[str, float]] = {
    "transformer": {"keep_nth": 100, "parity": 53, "mqar": 100, "hop1": 82, "hop2": 78},
    "mamba2": {"keep_nth": 1, "parity": 52, "mqar": 100, "hop1": 100, "hop2": 98},
    "paragru": {"keep_nth": 100, "parity": 100, "mqar": 100, "hop1": 100, "hop2": 100},
    "paralstm": {"keep_nth": 100, "parity": 100, "mqar": 100, "hop1": 100, "hop2": 100},
}

# Table 6's recipe where a run could differ (the paper's appendix on the synthetic tasks; retain_gate_bias 0 =
# the paper's zero biases): a result trained otherwise is flagged beside the paper's number (eval.tables.render_table6).
# The trainer's defaults and configs/synthetic/table6.yaml hold the same values (tests/test_eval_tables.py).
TABLE6_RECIPE: dict[str, float] = {"seq_len": 100, "n_train": 10_000, "batch_size": 16, "lr": 5e-4,
                                   "weight_decay": 1e-6, "d_model": 64, "num_heads": 4, "retain_gate_bias": 0.0}

# Table 5: SlimPajama test perplexity by size and architecture (lm-eval accuracies not transcribed).
TABLE5_PPL: dict[str, dict[str, float | None]] = {
    "400m": {"paragru": 18.56, "paralstm": 18.40, "mamba2": 16.49, "transformer": 17.00},
    "1b": {"paragru": None, "paralstm": None, "mamba2": None, "transformer": None},
    "2.9b": {"paragru": None, "paralstm": None, "mamba2": None, "transformer": None},
    "7b": {"paragru": 9.19, "paralstm": 9.16, "mamba2": 8.62, "transformer": 9.55},
}
TABLE5_ACC: dict[str, dict[str, dict[str, float]]] = {}  # size -> arch -> task -> accuracy %; not transcribed

# Parameter counts of the paper's language models (its model-size table) for plotting perplexity against size.
PARAMS: dict[str, dict[str, float]] = {
    "400m": {"paragru": 406e6, "paralstm": 406e6, "mamba2": 409e6, "transformer": 412e6},
    "1b": {"paragru": 1.42e9, "paralstm": 1.42e9, "mamba2": 1.43e9, "transformer": 1.44e9},
    "2.9b": {"paragru": 2.90e9, "paralstm": 2.90e9, "mamba2": 2.83e9, "transformer": 2.80e9},
    "7b": {"paragru": 6.76e9, "paralstm": 6.76e9, "mamba2": 6.96e9, "transformer": 6.89e9},
}

SYNTHETIC_TASK_TITLES = {"keep_nth": "keep-nth (n=5, |V|=128)", "parity": "parity (|V|=2)", "mqar": "MQAR (|V|=128)",
                         "hop1": "1-hop (|V|=10)", "hop2": "2-hop (|V|=5)"}

LM_EVAL_CONFIG = config_file("lm_eval", "paper.yaml")


def lm_eval_suite(name: str | None = None) -> dict[str, dict[str, Any]]:
    """task -> {num_fewshot, metric} for the paper's downstream suite (configs/lm_eval/paper.yaml)."""
    import yaml

    cfg = yaml.safe_load(LM_EVAL_CONFIG.read_text())
    return dict(cfg["suites"][name or cfg["default_suite"]])
