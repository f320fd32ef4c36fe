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


# Table 6 of the paper: one-layer models on the synthetic tasks, parameter counts typed in independently of
# pararnn_lm.eval.paper (keep-nth, parity, MQAR, 1-hop, 2-hop).
TABLE6_COUNTS = {
    "transformer": (48.1e3, 31.8e3, 48.1e3, 32.8e3, 32.2e3),
    "mamba2": (30.1e3, 14.1e3, 38.4e3, 23.3e3, 22.7e3),
    "paragru": (19.8e3, 3.8e3, 32.7e3, 17.6e3, 17.0e3),
    "paralstm": (20.0e3, 4.0e3, 32.8e3, 17.7e3, 17.1e3),
}
SYNTHETIC_TASKS = ("keep_nth", "parity", "mqar", "hop1", "hop2")
# The bare Mamba2 of keep-nth / parity has no reading that gives the paper's count. The paper's cells leave
# 13.7-13.8k parameters beside the embedding and head (30.1k - 128 x 128, 14.1k - 2 x 128). Ours: in_proj to
# x, B, C, dt (64 x 196 = 12,544) + out_proj (4,096) + dt/A/D (12) + two norms (128) = 16,780, with the layer
# shape (expand 1, 4 heads of 16, state 64) whose full-block cells match to 0.7 %. Dropping out_proj as well
# (or the x projection) gives 12,684: -3.4 % / -8.2 %. Only a state size of 40 fits these two cells
# (30,092 / 13,964), and it takes the full-block cells to -8.9 % (34,972 against 38.4k on MQAR).
MAMBA2_BARE = pytest.mark.xfail(strict=True, reason="the bare Mamba2 is 33,164 / 17,036 against the paper's 30.1k / "
                                "14.1k (+10.2 % / +20.8 %): see MAMBA2_BARE's comment")


TABLE6_CELLS = [pytest.param(a, t, marks=MAMBA2_BARE) if (a, t) in {("mamba2", "keep_nth"), ("mamba2", "parity")}
                else (a, t) for a in TABLE6_COUNTS for t in SYNTHETIC_TASKS]


@pytest.mark.parametrize("arch,task", TABLE6_CELLS)
def test_table6_parameter_counts_within_3_percent(arch, task):
    """The model the synthetic trainer builds for a Table-6 cell (its spec, d = 64, 4 heads) has the paper's size."""
    from pararnn_lm.eval.paper import TABLE6_PARAMS
    from pararnn_lm.eval.synthetic.models import build_model

    paper = TABLE6_COUNTS[arch][SYNTHETIC_TASKS.index(task)]
    assert TABLE6_PARAMS[arch][task] == paper
    n = sum(p.numel() for p in build_model(arch, task).parameters())
    assert abs(n / paper - 1) <= 0.03, f"{arch}/{task}: {n:,} parameters, paper {paper:,.0f} ({100 * (n / paper - 1):+.1f} %)"


def test_25m_preset_keeps_the_paper_ratios_at_20_to_30m_parameters():
    """The offline quality runs' size: 20-30M parameters with the 8,192-token offline vocabulary, and the
    paper's ratios (Tables 3-4): equal depth for ParaRNN and Transformer, Mamba2 twice the layers and no
    MLP, 4 ParaRNN heads, 128-wide attention heads, 64-wide Mamba2 heads."""
    cfgs = {arch: config_for(arch, "25m", vocab_size=8192) for arch in ARCHS}
    counts = {arch: count_parameters(cfg) for arch, cfg in cfgs.items()}
    assert all(20e6 <= n <= 30e6 for n in counts.values()), counts
    assert max(counts.values()) / min(counts.values()) < 1.1, counts  # comparable sizes, as in the paper's rows
    layers = cfgs["paragru"].num_hidden_layers
    assert cfgs["paralstm"].num_hidden_layers == cfgs["attention"].num_hidden_layers == layers
    assert cfgs["mamba2"].num_hidden_layers == 2 * layers and cfgs["mamba2"].intermediate_size == 0
    assert cfgs["paragru"].num_attention_heads == cfgs["paralstm"].num_attention_heads == 4
    d = cfgs["paragru"].hidden_size
    assert d // cfgs["attention"].num_attention_heads == 128
    assert cfgs["mamba2"].mamba_num_heads * 64 == 2 * d
    assert len({cfg.hidden_size for cfg in cfgs.values()}) == 1
