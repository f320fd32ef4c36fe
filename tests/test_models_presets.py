"""Size presets reproduce the paper's parameter counts (arXiv 2510.21450, Tables 3-4: the language-model
configurations) within 2%, counted on meta."""
from __future__ import annotations

import pytest

from pararnn_lm.models import ParaRNNLMConfig, config_for, count_parameters
from pararnn_lm.models.presets import PRESET_SIZES, preset_fields

ARCHS = ("paragru", "paralstm", "mamba2", "attention")
PAPER = {  # the paper's table, typed in independently of the YAML files
    "400m": {"paragru": 406e6, "paralstm": 406e6, "mamba2": 409e6, "attention": 412e6},
    "1b": {"paragru": 1.42e9, "paralstm": 1.42e9, "mamba2": 1.43e9, "attention": 1.44e9},
    "2.9b": {"paragru": 2.90e9, "paralstm": 2.90e9, "mamba2": 2.83e9, "attention": 2.80e9},
    "7b": {"paragru": 6.76e9, "paralstm": 6.76e9, "mamba2": 6.96e9, "attention": 6.89e9},
}
LAYERS_HEADS = {  # (layers, heads) from the same table
    "400m": {"paragru": (24, 4), "mamba2": (48, 32), "attention": (24, 8)},
    "1b": {"paragru": (24, 4), "mamba2": (48, 64), "attention": (24, 16)},
    "2.9b": {"paragru": (32, 2), "mamba2": (64, 80), "attention": (32, 32)},
    "7b": {"paragru": (32, 4), "mamba2": (64, 128), "attention": (32, 32)},
}


def test_paper_parameter_counts_within_2_percent(capsys):
    rows, failures = [], []
    for size, targets in PAPER.items():
        for arch in ARCHS:
            cfg = config_for(arch, size)
            n = count_parameters(cfg)
            dev = n / targets[arch] - 1
            heads = cfg.mamba_num_heads if arch == "mamba2" else cfg.num_attention_heads
            lh = LAYERS_HEADS[size]["paragru" if arch == "paralstm" else arch]
            rows.append(f"| {size} | {arch} | {cfg.hidden_size} | {cfg.num_hidden_layers} | {heads} | "
                        f"{n / 1e6:,.1f}M | {targets[arch] / 1e6:,.0f}M | {100 * dev:+.2f}% |")
            if abs(dev) > 0.02:
                failures.append(rows[-1])
            if (cfg.num_hidden_layers, heads) != lh:
                failures.append(f"{size}/{arch}: layers/heads {(cfg.num_hidden_layers, heads)} != paper {lh}")
            _, paper_in_yaml = preset_fields(arch, size)
            assert paper_in_yaml == pytest.approx(targets[arch])
    with capsys.disabled():
        print("\n| size | arch | d_model | layers | heads | ours | paper | dev |\n|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    assert not failures, failures


@pytest.mark.parametrize("size", PRESET_SIZES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_preset_builds_a_valid_config(arch, size):
    cfg = config_for(arch, size)
    assert cfg.mixer == arch and cfg.vocab_size > 0
    assert count_parameters(cfg) > 0


def test_overrides_and_alias():
    cfg = config_for("transformer", "tiny", vocab_size=1000, num_hidden_layers=2)
    assert cfg.mixer == "attention" and cfg.vocab_size == 1000 and cfg.num_hidden_layers == 2


def test_paper_presets_pad_the_vocabulary_for_aligned_gemms(tmp_path):
    cfg = config_for("paragru", "400m")
    assert (cfg.vocab_size, cfg.pad_vocab_size_multiple) == (50304, 64)  # GPT-NeoX's 50,277 rounded up
    tok = config_for("paragru", "400m", vocab_size=50277, tokenizer_vocab_size=50277)
    assert tok.vocab_size == 50304 and tok.tokenizer_vocab_size == 50277
    cfg.save_pretrained(tmp_path)
    assert ParaRNNLMConfig.from_pretrained(tmp_path).vocab_size == 50304  # padding is idempotent
    assert ParaRNNLMConfig(vocab_size=10).vocab_size == 10  # off by default (small task vocabularies)
    with pytest.raises(ValueError, match="pad_vocab_size_multiple"):
        ParaRNNLMConfig(vocab_size=10, pad_vocab_size_multiple=0)
