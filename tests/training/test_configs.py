"""Every shipped config composes into the typed schema; experiments carry the paper's recipes."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pararnn_lm.training.config import TrainConfig, register_configs, reject_unknown_keys, validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GROUPS = ["model", "size", "data", "optim", "deepspeed", "cluster", "logging", "eval", "experiment"]
register_configs()


def _compose(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        node = compose("train", overrides=overrides)
    reject_unknown_keys(node)
    cfg = OmegaConf.to_object(node)
    validate(cfg)
    return cfg


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "local"):
        overrides.append("data.path=corpus/*.jsonl")  # the one mandatory value
    cfg = _compose(overrides)
    assert isinstance(cfg, TrainConfig)


def test_default_is_the_tiny_paragru_on_the_bundled_corpus():
    cfg = _compose([])
    assert (cfg.model.arch, cfg.model.size, cfg.data.source) == ("paragru", "tiny", "bundled")
    assert not cfg.deepspeed.enabled and cfg.resume == "auto"


# (size, arch): LR, weight decay, tokens, sequences per step of the paper (arXiv 2510.21450, Tables 3 and 4).
PAPER = {
    ("400m", "paragru"): (5e-3, 1e-3, 10.5e9, 256), ("400m", "paralstm"): (3e-3, 1e-3, 10.5e9, 256),
    ("400m", "mamba2"): (5e-3, 1e-3, 10.5e9, 256), ("400m", "attention"): (3e-3, 1e-3, 10.5e9, 256),
    ("1b", "paragru"): (3e-3, 1e-4, 28.8e9, 256), ("1b", "paralstm"): (3e-3, 1e-4, 28.8e9, 256),
    ("1b", "mamba2"): (5e-3, 1e-4, 28.8e9, 256), ("1b", "attention"): (2e-3, 1e-4, 28.8e9, 256),
    ("2.9b", "paragru"): (2e-3, 1e-4, 57.7e9, 512), ("2.9b", "paralstm"): (2e-3, 1e-4, 57.7e9, 512),
    ("2.9b", "mamba2"): (3e-3, 1e-4, 57.7e9, 512), ("2.9b", "attention"): (3e-3, 1e-4, 57.7e9, 512),
    ("7b", "paragru"): (3e-3, 1e-4, 138.4e9, 2048), ("7b", "paralstm"): (3e-3, 1e-4, 138.4e9, 2048),
    ("7b", "mamba2"): (3e-3, 1e-4, 138.4e9, 2048), ("7b", "attention"): (3e-3, 1e-4, 138.4e9, 2048),
}


@pytest.mark.parametrize("size, arch", sorted(PAPER))
def test_paper_experiments_match_the_paper(size, arch):
    lr, wd, tokens, batch = PAPER[(size, arch)]
    cfg = _compose([f"experiment=paper_{size}_{arch}"])
    assert (cfg.model.arch, cfg.model.size) == (arch, size)
    assert cfg.optim.lr == pytest.approx(lr) and cfg.optim.weight_decay == pytest.approx(wd)
    assert cfg.optim.warmup_fraction == 0.1 and cfg.optim.min_lr_ratio == 0.0
    assert cfg.optim.z_loss == pytest.approx(5e-6 if size == "7b" else 1e-4)
    assert cfg.train.global_batch_size == batch and cfg.data.seq_len == 2048
    assert cfg.train.steps * batch * 2048 == pytest.approx(tokens, rel=1e-3)
    assert cfg.deepspeed.enabled and cfg.train.precision == "bf16"


def test_run_folder_and_export_settings_compose():
    cfg = _compose([])
    assert not cfg.run.overwrite and cfg.run.allow_changes == [] and cfg.export.dtype == "fp32"
    cfg = _compose(["run.overwrite=true", "run.allow_changes=[optim.lr,train.steps]", "export.dtype=bf16"])
    assert cfg.run.overwrite and cfg.run.allow_changes == ["optim.lr", "train.steps"] and cfg.export.dtype == "bf16"
    with pytest.raises(ValueError, match="export.dtype='fp16' is not one of fp32, bf16"):
        _compose(["export.dtype=fp16"])
    with pytest.raises(ValueError, match="unknown architecture 'gru'"):
        _compose(["model.arch=gru"])


def test_unknown_keys_and_wrong_types_are_refused():
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        _compose(["+optim.lrr=1"])
    with pytest.raises(Exception, match="train.steps"):
        _compose(["train.steps=abc"])
