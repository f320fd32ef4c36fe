"""The one-layer models of the synthetic tasks (paper Table 6) are built from their per-(arch, task) spec: the
paper's embedding -> RMSNorm -> mixer -> RMSNorm -> head, the bare or full block, a fixed sinusoidal position
encoding where the paper has one, the gain bound and MLP of each cell. Checked against references written
here from the paper's description."""
from __future__ import annotations

import math

import pytest
import torch

from pararnn_lm.eval.paper import TABLE6_MODELS
from pararnn_lm.eval.synthetic.models import ARCHS, ModelSpec, build_model, model_spec
from pararnn_lm.eval.synthetic.tasks import TASKS
from pararnn_lm.models import ParaRNNLMConfig, build_synthetic_model
from pararnn_lm.models.decode import StaticDecoder
from pararnn_lm.models.modeling import sinusoidal_position_encoding
from pararnn_lm.models.packing import SequenceInfo

CELLS = [(a, t) for a in ARCHS for t in TASKS]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def sinusoid_reference(T: int, dim: int) -> torch.Tensor:
    """Vaswani et al.'s table, entry by entry: sin(t / 10000^(2i/dim)) in channel i, cos in channel dim/2 + i."""
    table = torch.zeros(T, dim, dtype=torch.float64)
    for t in range(T):
        for i in range(dim // 2):
            angle = t / 10000 ** (2 * i / dim)
            table[t, i], table[t, dim // 2 + i] = math.sin(angle), math.cos(angle)
    return table


def _small(arch: str, task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"rnn_mode": "newton_torch"} if arch in ("paragru", "paralstm") else {}
    return build_model(arch, task, d_model=16, num_heads=2, **kw).double().eval()


def test_the_spec_table_covers_every_cell_with_the_papers_facts():
    assert set(TABLE6_MODELS) == set(CELLS)
    for (arch, task), spec in TABLE6_MODELS.items():
        rnn = arch in ("paragru", "paralstm")
        bare = task in ("keep_nth", "parity") and arch != "transformer"
        assert spec["block"] == ("bare" if bare else "full"), (arch, task)
        with_pe = arch == "transformer" or task == "keep_nth"
        assert spec["position_encoding"] == ("sinusoidal" if with_pe else None), (arch, task)
        assert spec["gain_bound"] == (0.9 if rnn and task != "parity" else None), (arch, task)
        assert (spec["mlp_width"] > 0) == (arch == "transformer"), (arch, task)


@pytest.mark.parametrize("arch,task", CELLS)
def test_each_cell_is_embedding_norm_mixer_norm_head(arch, task):
    """The forward equals head(norm(mixer(norm(embedding + position table)))) with the block's residual and MLP
    only where the spec has them; the mixer is bare (no conv, inner norm or gate) where the spec says so."""
    model = _small(arch, task)
    spec = model_spec(arch, task)
    cfg, block = model.config, model.model.layers[0]
    assert cfg.num_hidden_layers == 1 and cfg.hidden_size == 16 and cfg.vocab_size == TASKS[task].vocab_size
    names = [n for n, _ in model.named_parameters()]
    inner = [n for n in names if ".mixer.conv." in n or ".mixer.norm." in n]
    assert (not inner) == (spec.block == "bare" or arch == "transformer"), names
    assert (block.mlp is not None) == (spec.mlp_width > 0)
    if arch in ("paragru", "paralstm"):
        assert block.mixer.cell.gain_bound == spec.gain_bound
    ids = TASKS[task].generate(3, 12, seed=1).input_ids
    T = ids.shape[1]
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        if spec.position_encoding == "sinusoidal":
            std = 1.0 if spec.block == "bare" else 16 ** -0.5  # the embedding's init std (the table's scale)
            x = x + std * sinusoid_reference(T, 16)
        seq = SequenceInfo.one_document_per_row(torch.arange(T).expand(3, T))
        mixed = block.mixer(rms_norm(x, block.mixer_norm.weight), seq)
        h = mixed if spec.block == "bare" else x + mixed
        if block.mlp is not None:
            h = h + block.mlp(rms_norm(h, block.mlp_norm.weight))
        want = model.lm_head(rms_norm(h, model.model.norm.weight))
        # fp64 throughout, but the model's RMSNorm and position table compute in fp32: 1e-5, not 1e-12
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_position_table_matches_the_formula_and_adds_no_parameters():
    positions = torch.arange(40).expand(2, 40)
    table = sinusoidal_position_encoding(positions, 16)
    torch.testing.assert_close(table[1].double(), sinusoid_reference(40, 16), rtol=0, atol=1e-5)
    with_pe = build_model("paragru", "keep_nth")
    without = build_model("paragru", "keep_nth", position_encoding=None)
    assert sum(p.numel() for p in with_pe.parameters()) == sum(p.numel() for p in without.parameters())
    with pytest.raises(ValueError, match="position_encoding"):
        ParaRNNLMConfig(position_encoding="learned")


def test_positions_restart_per_document_and_continue_through_the_cache():
    """Packed documents see their own positions (the same logits as each alone), and a forward continued from
    a cache adds the positions after the prefix (the same logits as one full forward)."""
    model = _small("transformer", "keep_nth")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 128, (1, 7), generator=g), torch.randint(0, 128, (1, 5), generator=g)
    packed = torch.cat((a, b), dim=1)
    position_ids = torch.cat((torch.arange(7), torch.arange(5)))[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids).logits
        torch.testing.assert_close(logits[:, :7], model(a).logits)
        torch.testing.assert_close(logits[:, 7:], model(b).logits)
        full = model(packed).logits
        prefix = model(packed[:, :8], use_cache=True)
        rest = model(packed[:, 8:], cache=prefix.state, use_cache=True).logits
        torch.testing.assert_close(torch.cat((prefix.logits, rest), dim=1), full)
        assert (full - model(packed, position_ids=position_ids).logits).abs().max() > 1e-6  # positions matter


def test_overrides_reach_the_model_and_unknown_cells_fail():
    spec = model_spec("mamba2", "mqar", position_encoding="sinusoidal", mamba_d_state=16)
    assert spec == ModelSpec(block="full", position_encoding="sinusoidal",
                             mixer={"mamba_expand": 1, "mamba_headdim": 16, "mamba_d_state": 16})
    model = build_model("mamba2", "mqar", position_encoding="sinusoidal", mamba_d_state=16)
    assert model.config.mamba_d_state == 16 and model.config.position_encoding == "sinusoidal"
    assert model.config.mamba_num_heads == 4  # the paper's 4 heads: expand 1, head dim 16 at d = 64
    old_bare = build_model("paragru", "parity", bare_mixer_norms=False)  # the bare model without its norms
    assert old_bare.model.layers[0].mixer_norm is None and isinstance(old_bare.model.norm, torch.nn.Identity)
    assert build_model("paragru", "mqar", gain_bound=None).model.layers[0].mixer.cell.gain_bound is None
    with pytest.raises(ValueError, match="no Table-6 model"):
        model_spec("rwkv", "parity")
    with pytest.raises(ValueError, match="block"):
        model_spec("paragru", "parity", block="half")
    with pytest.raises(ValueError, match="bare_mixer_norms needs bare_mixer"):
        build_model("paragru", "mqar", bare_mixer_norms=True)


def test_static_decoder_refuses_a_position_table():
    model = build_synthetic_model("attention", vocab_size=10, bare_mixer=False, position_encoding="sinusoidal")
    with pytest.raises(NotImplementedError, match="position_encoding"):
        StaticDecoder(model)


@pytest.mark.parametrize("arch,task", [("paragru", "keep_nth"), ("mamba2", "keep_nth"), ("transformer", "mqar")])
def test_training_step_of_a_spec_model_has_no_host_sync(arch, task, monkeypatch):
    """The trainer captures whole steps as CUDA graphs: the position table and the norms around a bare mixer
    read nothing back to the host (the fused RNN kernels run in Triton's CPU interpreter here)."""
    kw = {"rnn_mode": "fused"} if arch == "paragru" else {}
    model = build_model(arch, task, d_model=16, num_heads=2, **kw)
    ids = TASKS[task].generate(2, 12, seed=0).input_ids

    def sync(*_args, **_kwargs):
        raise AssertionError("a tensor value was read on the host during the step")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    model(ids).logits.float().pow(2).mean().backward()
