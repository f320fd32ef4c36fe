"""StaticDecoder (models/decode.py): the static-buffer single-token path reproduces the model.

CPU, fp32, debug presets: greedy tokens equal ``model.generate(do_sample=False)`` exactly, and teacher-
forced step logits equal the full (parallel, no-cache) forward logits to 1e-4. The CUDA-graph capture is
checked against the eager step on a GPU (skipped here).
"""
import pytest
import torch

from pararnn_lm.models import ParaRNNLMForCausalLM, StaticDecoder, config_for

ARCHS = ["paragru", "paralstm", "mamba2", "attention"]


def _model(arch, seed=0, **kw):
    torch.manual_seed(seed)
    return ParaRNNLMForCausalLM(config_for(arch, "debug", rnn_mode="sequential", **kw)).eval()


def _hybrid():
    torch.manual_seed(1)
    cfg = config_for("paragru", "debug", rnn_mode="sequential", num_hidden_layers=4,
                     layer_pattern=["paragru", "attention", "mamba2", "paralstm"], mamba_headdim=16, mamba_d_state=8,
                     mamba_chunk_size=8)
    return ParaRNNLMForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ARCHS + ["hybrid"])
def test_greedy_tokens_match_generate(arch):
    model = _hybrid() if arch == "hybrid" else _model(arch)
    prompt = torch.randint(1, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    dec = StaticDecoder(model, batch_size=2, max_length=64)
    out = dec.generate(prompt, max_new_tokens=12)
    assert torch.equal(out, ref), (out, ref)
    # a second call on the same decoder (buffers reloaded by prefill) gives the same tokens
    assert torch.equal(dec.generate(prompt, max_new_tokens=12), ref)


@pytest.mark.parametrize("arch", ARCHS + ["hybrid"])
def test_step_logits_match_full_forward(arch):
    model = _hybrid() if arch == "hybrid" else _model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    dec = StaticDecoder(model, batch_size=2, max_length=32, max_new_tokens=1)  # 15 steps wrap the token ring
    P = 5
    got = [dec.prefill(ids[:, :P]).clone()]
    for t in range(P, ids.shape[1]):
        got.append(dec.step(ids[:, t]).clone())
    got = torch.stack(got, dim=1)
    torch.testing.assert_close(got, full[:, P - 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["paragru", "mamba2", "attention"])
def test_left_padded_prompt_matches_generate(arch):
    model = _model(arch)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, model.config.vocab_size, (2, 6), generator=g)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    prompt[0, :2] = 0
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = StaticDecoder(model, batch_size=2, max_length=32).generate(prompt, max_new_tokens=6, attention_mask=mask)
    assert torch.equal(out, ref)


def test_prompt_shorter_than_conv_window():
    model = _model("paragru")
    prompt = torch.tensor([[5]])
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(StaticDecoder(model, batch_size=1).generate(prompt, max_new_tokens=8), ref)


def test_generated_buffer_grows():
    model = _model("paralstm")
    prompt = torch.randint(1, 128, (1, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    dec = StaticDecoder(model, batch_size=1, max_new_tokens=4)
    assert torch.equal(dec.generate(prompt, max_new_tokens=20), ref)


def test_errors():
    model = _model("attention")
    dec = StaticDecoder(model, batch_size=1, max_length=8)
    with pytest.raises(ValueError, match="batch_size"):
        dec.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length"):
        dec.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=8)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, cuda_graph=True)
    bare = ParaRNNLMForCausalLM(config_for("paragru", "debug", bare_mixer=True, intermediate_size=0))
    with pytest.raises(NotImplementedError, match="bare_mixer"):
        StaticDecoder(bare)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_matches_eager(arch):
    model = _model(arch).cuda()
    model.config.rnn_mode = "auto"
    prompt = torch.randint(1, 128, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    eager = StaticDecoder(model, batch_size=2, max_length=64, cuda_graph=False).generate(prompt, 16)
    graph = StaticDecoder(model, batch_size=2, max_length=64, cuda_graph=True)
    assert torch.equal(graph.generate(prompt, 16), eager)
    assert torch.equal(graph.generate(prompt, 16), eager)  # replay after re-prefill
    assert torch.equal(eager, ref)
    compiled = StaticDecoder(model, batch_size=2, max_length=64, cuda_graph=True, compile=True).generate(prompt, 16)
    assert (compiled == eager).float().mean() > 0.9  # fused fp32 arithmetic: last-bit differences may flip a tie


@pytest.mark.slow
def test_compiled_block_matches_eager():
    """compile='block': one torch.compile'd graph serves every layer (CPU inductor here, GPU in the bench)."""
    from torch._dynamo.utils import counters

    model = _model("paragru", num_hidden_layers=3)
    prompt = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(8))
    ref = StaticDecoder(model, batch_size=2).generate(prompt, 6)
    torch._dynamo.reset()
    counters.clear()
    out = StaticDecoder(model, batch_size=2, compile=True).generate(prompt, 6)
    assert torch.equal(out, ref)
    assert counters["stats"]["unique_graphs"] == 1
