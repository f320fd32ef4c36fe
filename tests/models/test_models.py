"""models/: the causal LM for every architecture (debug presets, CPU).

References are independent of the code path under test: padded rows vs packed documents, a full
forward vs token-by-token decoding, a plain no-cache greedy loop vs generate(), plain CE vs chunked.
"""
from __future__ import annotations

import math

import pytest
import torch

from pararnn_lm.models import (
    ParaRNNLMConfig,
    ParaRNNLMForCausalLM,
    build_synthetic_model,
    check_tokenizer,
    config_for,
)
from pararnn_lm.models.loss import lm_loss_chunked, lm_loss_from_logits
from pararnn_lm.models.packing import SequenceInfo

ARCHS = ("paragru", "paralstm", "mamba2", "attention")
HYBRID = dict(layer_pattern=["paragru", "attention", "mamba2", "paralstm"], num_hidden_layers=4)


def make(arch: str, dtype=torch.float32, seed: int = 0, **overrides) -> ParaRNNLMForCausalLM:
    torch.manual_seed(seed)
    cfg = config_for(arch, "debug", rnn_mode="newton_torch", **overrides)
    return ParaRNNLMForCausalLM(cfg).to(dtype).eval()


def hybrid(dtype=torch.float32, seed: int = 0) -> ParaRNNLMForCausalLM:
    return make("paragru", dtype, seed, mamba_headdim=16, mamba_d_state=8, mamba_chunk_size=8,
                num_attention_heads=4, rnn_num_heads=2, **HYBRID)


MODELS = {**{a: (lambda a=a, **kw: make(a, **kw)) for a in ARCHS}, "hybrid": hybrid}


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward_shapes(name):
    model = MODELS[name]().train()
    ids = torch.randint(0, 128, (3, 13))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 13, 128)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    # an untrained LM predicts roughly uniformly
    assert abs(out.ce_loss.item() - math.log(128)) < 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_decreases(arch):
    model = MODELS[arch]().train()
    torch.manual_seed(1)
    ids = torch.arange(24).repeat(4, 1) % 7 + torch.randint(0, 3, (4, 1))  # learnable periodic batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _docs(seed=0, lengths=(5, 9, 1, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("name", list(MODELS))
def test_padded_equals_packed(name):
    """Documents in padded rows (each from its start) == the same documents packed in one row."""
    model = MODELS[name](dtype=torch.float64)
    docs = _docs()
    T = max(len(d) for d in docs)
    padded = torch.zeros(len(docs), T, dtype=torch.long)
    for i, d in enumerate(docs):
        padded[i, : len(d)] = d
    packed = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32)
    with torch.no_grad():
        ref = model(padded, use_cache=False).logits
        by_pos = model(packed, position_ids=pos, use_cache=False).logits[0]
        by_cu = model(packed, cu_seqlens=cu, use_cache=False).logits[0]
        # two rows of packed documents (each row start is a boundary as well)
        two_rows = torch.cat((packed, packed.flip(1)), 0)
        two_pos = torch.cat((pos, torch.cat([torch.arange(len(d)) for d in docs[::-1]]).unsqueeze(0)), 0)
        rows_out = model(torch.cat((packed, torch.cat(docs[::-1]).unsqueeze(0)), 0), position_ids=two_pos,
                         use_cache=False).logits
    del two_rows
    start = 0
    for i, d in enumerate(docs):
        n = len(d)
        torch.testing.assert_close(by_pos[start : start + n], ref[i, :n], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(by_cu[start : start + n], ref[i, :n], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(rows_out[0, start : start + n], ref[i, :n], atol=1e-9, rtol=1e-9)
        start += n
    start = 0
    for i, d in reversed(list(enumerate(docs))):
        torch.testing.assert_close(rows_out[1, start : start + len(d)], ref[i, : len(d)], atol=1e-9, rtol=1e-9)
        start += len(d)


@pytest.mark.parametrize("name", list(MODELS))
def test_decode_token_by_token_matches_full_forward(name):
    model = MODELS[name]()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5], use_cache=True)  # prefill: parallel path
        cache, pieces = out.state, [out.logits]
        for t in range(5, 12):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
        chunk = model(ids[:, :3], use_cache=True)  # multi-token continuation from a cache
        chunk2 = model(ids[:, 3:], cache=chunk.state, use_cache=True)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat((chunk.logits, chunk2.logits), 1), full, atol=1e-4, rtol=1e-4)
    # recurrent layers keep O(1) state: nothing grows with the sequence
    for layer, mixer in zip(cache.layers, model.config.mixers):
        if mixer != "attention":
            conv, state = layer.get_state()
            assert state.shape[0] == 2 and (conv is None or conv.shape[1] == model.config.conv_kernel - 1)
        else:
            assert layer.keys.shape[2] == 12


@pytest.mark.parametrize("name", list(MODELS))
def test_generate_matches_greedy_without_cache(name):
    model = MODELS[name]()
    prompt = torch.randint(0, 128, (2, 6))
    seen_lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen_lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    hook.remove()
    assert seen_lengths[0] == 6 and all(n == 1 for n in seen_lengths[1:]), seen_lengths  # no prefix recompute
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, nxt), 1)
    assert torch.equal(gen, ids)


@pytest.mark.parametrize("name", ["paragru", "mamba2", "attention", "hybrid"])
def test_generate_left_padded_batch_matches_single(name):
    model = MODELS[name]()
    a, b = torch.randint(1, 128, (1, 7)), torch.randint(1, 128, (1, 4))
    batch = torch.cat((a, torch.cat((torch.zeros(1, 3, dtype=torch.long), b), 1)), 0)
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        only_b = model.generate(b, max_new_tokens=5, do_sample=False, pad_token_id=0)
        only_a = model.generate(a, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(both[1, 3:], only_b[0])
    assert torch.equal(both[0], only_a[0])


@pytest.mark.parametrize("name", list(MODELS))
def test_save_and_reload_identical(name, tmp_path):
    from transformers import AutoModelForCausalLM

    model = MODELS[name]()
    # move the parameters away from their init so a re-initialisation on load would show
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, 128, (2, 9))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is ParaRNNLMForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_tied_embeddings():
    model = make("paragru", tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = make("paragru")
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_chunked_cross_entropy_equals_plain():
    torch.manual_seed(0)
    hidden = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 11))
    labels[0, 4] = -100
    ce_ref, z_ref, n_ref = lm_loss_from_logits(hidden @ weight.t(), labels)
    g_ref = torch.autograd.grad(ce_ref + 0.1 * z_ref, (hidden, weight))
    ce, z, n = lm_loss_chunked(hidden, weight, labels, chunk_size=4)
    g = torch.autograd.grad(ce + 0.1 * z, (hidden, weight))
    # independent reference: torch's cross_entropy and an explicit logsumexp
    logits = (hidden @ weight.t())[:, :-1].reshape(-1, 50)
    tgt = labels[:, 1:].reshape(-1)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100))
    valid = tgt != -100
    torch.testing.assert_close(z, torch.logsumexp(logits, -1)[valid].pow(2).mean())
    assert n == n_ref == valid.sum()
    torch.testing.assert_close(ce, ce_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_fused_loss_in_model_and_z_loss_only_in_training():
    model = make("attention", z_loss=1e-2)
    ids = torch.randint(0, 128, (2, 9))
    fused = make("attention", z_loss=1e-2, fused_cross_entropy=True, ce_chunk_size=5)
    fused.load_state_dict(model.state_dict())
    eval_out = model(ids, labels=ids)
    torch.testing.assert_close(eval_out.loss, eval_out.ce_loss)  # eval: no z term
    model.train(), fused.train()
    a, b = model(ids, labels=ids), fused(ids, labels=ids)
    assert b.logits is None
    torch.testing.assert_close(a.loss, a.ce_loss + 1e-2 * a.z_loss_term)
    torch.testing.assert_close(b.loss, a.loss)


@pytest.mark.parametrize("mixer", ARCHS)
@pytest.mark.parametrize("bare", [True, False])
def test_synthetic_single_layer_models(mixer, bare):
    model = build_synthetic_model(mixer, vocab_size=10, bare_mixer=bare, d_model=32, num_heads=4,
                                  rnn_mode="newton_torch")
    assert model.config.num_hidden_layers == 1
    out = model(torch.randint(0, 10, (2, 20)))
    assert out.logits.shape == (2, 20, 10)
    names = [n for n, _ in model.named_parameters()]
    if bare:  # no conv / norm / gate inside the mixer, no MLP
        assert not any(".conv." in n or "mixer.norm" in n or ".mlp." in n for n in names), names


@pytest.mark.parametrize("mixer", ["paragru", "mamba2"])
def test_bare_mixer_is_embedding_mixer_head(mixer):
    """bare_mixer = the paper's keep-nth/parity model: no pre-norm, no residual, no final norm; the
    embedding (std 1) feeds the mixer directly. (A residual stream made 1-layer ParaGRU fail parity.)"""
    torch.manual_seed(0)
    model = build_synthetic_model(mixer, vocab_size=2, bare_mixer=True, rnn_gain_bound=None)
    block = model.model.layers[0]
    assert block.mixer_norm is None and block.mlp is None and isinstance(model.model.norm, torch.nn.Identity)
    assert not any("norm" in n for n, _ in model.named_parameters())
    assert model.model.embed_tokens.weight.std().item() > 0.5
    ids = torch.randint(0, 2, (3, 16))
    seq = SequenceInfo(torch.arange(16).expand(3, 16))
    with torch.no_grad():
        want = model.lm_head(block.mixer(model.model.embed_tokens(ids), seq))
        torch.testing.assert_close(model(ids).logits, want)
        if mixer == "paragru":  # the last logit depends on the first token (no state reset)
            flipped = ids.clone()
            flipped[:, 0] ^= 1
            assert (model(ids).logits[:, -1] - model(flipped).logits[:, -1]).abs().max() > 0
    full = build_synthetic_model(mixer, vocab_size=2, bare_mixer=False)  # the full block keeps the backbone
    assert full.model.layers[0].mixer_norm is not None and not isinstance(full.model.norm, torch.nn.Identity)


def test_dclm_init_scales():
    model = make("attention", num_hidden_layers=4)
    d = model.config.hidden_size
    q_std = model.model.layers[0].mixer.q_proj.weight.std().item()
    o0 = model.model.layers[0].mixer.o_proj.weight.std().item()
    o3 = model.model.layers[3].mixer.o_proj.weight.std().item()
    assert q_std == pytest.approx(1 / math.sqrt(d) * 0.986, rel=0.15)  # trunc-normal(3 std) shrinks std by ~1.4%
    assert o3 < o0 and o3 / o0 == pytest.approx(1 / 2, rel=0.2)  # / sqrt(2 (l + 1)): l=0 vs l=3
    assert torch.equal(model.model.norm.weight, torch.ones(d))


# ------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("kwargs, match", [
    (dict(mixer="lstm"), "unknown mixer 'lstm'"),
    (dict(mixer="attention", hidden_size=30, num_attention_heads=4), "does not divide hidden_size"),
    (dict(mixer="paragru", hidden_size=30, num_attention_heads=4), "does not divide the RNN width"),
    (dict(mixer="paragru", hidden_size=32, rnn_num_heads=3), r"rnn_num_heads=3 \(ParaRNN heads\)"),
    (dict(mixer="attention", num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(mixer="mamba2", hidden_size=40, mamba_headdim=64), "mamba_headdim=64 does not divide"),
    (dict(layer_pattern=["paragru", "gru"], num_hidden_layers=2), r"unknown mixer\(s\) \['gru'\]"),
    (dict(layer_pattern=["paragru"], num_hidden_layers=2), "layer_pattern has 1 entries"),
    (dict(vocab_size=100, tokenizer_vocab_size=101), "tokenizer has 101 tokens but vocab_size=100"),
    (dict(mixer="paragru", rnn_gain_norm="spectral"), "rnn_gain_norm must be 'channel' or 'row'"),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParaRNNLMConfig(**kwargs)


def test_tokenizer_vocab_mismatch_raises():
    class Tok:
        def __len__(self):
            return 200

    with pytest.raises(ValueError, match="tokenizer has 200 tokens"):
        check_tokenizer(ParaRNNLMConfig(vocab_size=128), Tok())
    check_tokenizer(ParaRNNLMConfig(vocab_size=200), Tok())


def test_unknown_preset_and_arch():
    with pytest.raises(ValueError, match="unknown size preset"):
        config_for("paragru", "3b")
    with pytest.raises(ValueError, match="unknown architecture"):
        config_for("rwkv", "debug")


@pytest.mark.parametrize("name", ["paragru", "mamba2", "hybrid"])
def test_gradient_checkpointing_same_gradients(name):
    model = MODELS[name]().train()
    ids = torch.randint(0, 128, (2, 10))
    model(ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a)
