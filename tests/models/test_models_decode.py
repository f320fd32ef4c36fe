"""StaticDecoder (models/decode.py): the static-buffer single-token path reproduces the model, for the
built-in mixers and for a mixer registered from outside the package; ``model.generate(cache_implementation=
"static")`` decodes through it.

CPU, fp32, debug presets: greedy tokens equal ``model.generate(do_sample=False)`` exactly and the eager
reference loop (a full no-cache forward over the growing sequence per token), and teacher-forced step
logits equal the full (parallel, no-cache) forward logits to 1e-4. The CUDA-graph capture is checked
against the eager step on a GPU (skipped here).
"""
import copy

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from pararnn_lm.models import MIXERS, ParaRNNLMForCausalLM, RecurrentState, StaticDecoder, config_for, register_mixer

ARCHS = ["paragru", "paralstm", "mamba2", "attention"]


def _model(arch, seed=0, **kw):
    torch.manual_seed(seed)
    return ParaRNNLMForCausalLM(config_for(arch, "debug", rnn_mode="sequential", **kw)).eval()


def _eager_greedy(model, prompt, new_tokens, eos=None, pad=0):
    """The reference: one full forward (no cache, parallel path) over the whole sequence per new token,
    argmax of the last position; with ``eos``, HF's rule (a finished row emits ``pad``; stop when all
    rows have finished)."""
    ids, finished = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1)
            if eos is not None:
                nxt = torch.where(finished, torch.tensor(pad), nxt)
                finished |= torch.isin(nxt, torch.tensor(eos))
            ids = torch.cat((ids, nxt[:, None]), dim=1)
            if eos is not None and finished.all():
                break
    return ids


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


class DecayMixer(torch.nn.Module):
    """A mixer the decoder has never heard of: h_t = a * h_{t-1} + W_in x_t per channel (a = sigmoid of a
    parameter, h restarting at document starts), y_t = W_out h_t, with its own inference state and step."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.in_proj = torch.nn.Linear(d, d, bias=False)
        self.out_proj = torch.nn.Linear(d, d, bias=False)
        self.decay_logit = torch.nn.Parameter(torch.randn(d))

    def forward(self, x, seq, cache=None, attn_mask=None):  # a plain loop over time, reading/writing the cache
        layer = cache.recurrent_layer(self.layer_idx) if cache is not None else None
        _, h = layer.get_state() if layer is not None else (None, None)
        h = x.new_zeros(x.shape[0], x.shape[-1]) if h is None else h
        a, u, ys = torch.sigmoid(self.decay_logit), self.in_proj(x), []
        for t in range(x.shape[1]):
            h = a * (h * (~seq.resets[:, t, None]).to(h.dtype)) + u[:, t]
            ys.append(h)
        if layer is not None:
            layer.set_state(None, h)
        return self.out_proj(torch.stack(ys, 1))

    def allocate_inference_state(self, batch_size, max_length, dtype, device):
        return RecurrentState(None, torch.zeros(batch_size, self.in_proj.in_features, dtype=dtype, device=device))

    def step(self, x_t, state, position):
        h = torch.sigmoid(self.decay_logit) * position.carried(state.state) + self.in_proj(x_t)
        state.state.copy_(h)
        return self.out_proj(h)


@pytest.fixture
def decay_mixer():
    register_mixer("decay_test")(DecayMixer)
    yield "decay_test"
    MIXERS.pop("decay_test")


def test_registered_mixer_decodes_through_its_own_state_and_step(decay_mixer):
    """A mixer registered from outside the package decodes with StaticDecoder through its
    allocate_inference_state / step alone, beside built-in mixers: greedy tokens equal model.generate and
    teacher-forced logits equal the full forward (which runs the mixer's own loop, not its step)."""
    torch.manual_seed(2)
    cfg = config_for("paragru", "debug", rnn_mode="sequential", num_hidden_layers=3,
                     layer_pattern=[decay_mixer, "attention", "paragru"])
    model = ParaRNNLMForCausalLM(cfg).eval()
    prompt = torch.randint(1, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(StaticDecoder(model, batch_size=2, max_length=32).generate(prompt, max_new_tokens=8), ref)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    dec = StaticDecoder(model, batch_size=2, max_length=32)
    got = [dec.prefill(ids[:, :4]).clone()] + [dec.step(ids[:, t]).clone() for t in range(4, ids.shape[1])]
    torch.testing.assert_close(torch.stack(got, dim=1), full[:, 3:], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- generate(cache_implementation="static")
def _prompt(model, rows=2, length=7, seed=3):
    return torch.randint(1, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_static_matches_the_eager_loop_and_default_generate(arch):
    model = _model(arch)
    prompt = _prompt(model)
    with torch.no_grad():
        default = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        static = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0,
                                cache_implementation="static")
    assert torch.equal(static, _eager_greedy(model, prompt, 10))
    assert torch.equal(static, default)
    assert model.static_decoder_slot.decoder is not None  # it did run on the StaticDecoder


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_static_stops_rows_at_eos(arch):
    """Two EOS ids, each emitted by one row at a different step: the earlier row pads afterwards, decoding
    stops when the second finishes (before max_new_tokens), as HF's loop does."""
    model = _model(arch)
    prompt = _prompt(model)
    free = _eager_greedy(model, prompt, 12)[:, 7:]

    def finish_steps(eos):
        return [next((t for t in range(12) if int(free[r, t]) in eos), None) for r in range(2)]

    eos = next(e for i in range(12) for j in range(12) for e in [[int(free[0, i]), int(free[1, j])]]
               if None not in (steps := finish_steps(e)) and steps[0] != steps[1] and max(steps) < 11)
    ref = _eager_greedy(model, prompt, 12, eos=eos)
    assert ref.shape[1] < 7 + 12 and (ref[:, 7:] == 0).any()  # stops early, with padding: a real test
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    with torch.no_grad():
        default = model.generate(prompt, **kw)
        static = model.generate(prompt, cache_implementation="static", **kw)
    assert torch.equal(static, ref) and torch.equal(default, ref)
    # the decoder's own loop, checking for finished rows every 2 tokens: it stops early and trims the same
    dec = StaticDecoder(model, batch_size=2, max_length=32)
    assert torch.equal(dec.generate(prompt, 12, eos_token_id=eos, pad_token_id=0, check_every=2), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_static_with_left_padding(arch):
    """A left-padded batch gives each row the tokens of that row decoded alone without padding."""
    model = _model(arch)
    prompt = _prompt(model, rows=3, length=6, seed=5)
    mask = torch.ones_like(prompt)
    mask[0, :2] = mask[2, :1] = 0
    prompt[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        default = model.generate(prompt, **kw)
        static = model.generate(prompt, cache_implementation="static", **kw)
    assert torch.equal(static, default)
    for row in range(3):
        alone = prompt[row : row + 1, int((mask[row] == 0).sum()):]
        assert torch.equal(static[row, 6:], _eager_greedy(model, alone, 8)[0, alone.shape[1]:])


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_static_follows_new_weights(arch):
    """The decoder (kept by the model between calls) caches weight-derived constants (bounded gains,
    A = -exp(A_log), ...): loading other weights between two calls gives the new weights' tokens."""
    model, other = _model(arch, seed=0), _model(arch, seed=1)
    prompt = _prompt(model, rows=1)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        first = model.generate(prompt, **kw)
        decoder = model.static_decoder_slot.decoder
        model.load_state_dict(other.state_dict())
        second = model.generate(prompt, **kw)
    assert model.static_decoder_slot.decoder is decoder  # same buffers (and captured step), new constants
    assert torch.equal(first, _eager_greedy(_model(arch, seed=0), prompt, 8))
    assert torch.equal(second, _eager_greedy(other, prompt, 8))
    assert not torch.equal(first, second)


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append("end")


@pytest.mark.parametrize("arch", ["paragru", "attention"])
def test_generate_static_samples_and_streams_as_default_generate(arch):
    """Sampling (temperature, top-k, top-p warpers), a repetition penalty and a streamer run on the
    decoder's logits: same seed, same tokens and the same streamed chunks as the default path."""
    model = _model(arch)
    model.generation_config.cache_implementation = "static"  # the persistent way to ask for it
    prompt = _prompt(model, rows=1)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.95, repetition_penalty=1.2,
              pad_token_id=0)
    out = {}
    for impl in ("dynamic", "static"):
        streamer = _Collect()
        torch.manual_seed(11)
        with torch.no_grad():
            out[impl] = (model.generate(prompt, cache_implementation=impl, streamer=streamer, **kw), streamer.chunks)
    (default, default_chunks), (static, static_chunks) = out["dynamic"], out["static"]
    assert torch.equal(static, default)
    assert static_chunks[-1] == "end" and len(static_chunks) == len(default_chunks) == 12  # prompt, 10 tokens, end
    assert all(torch.equal(a, b) for a, b in zip(static_chunks[:-1], default_chunks[:-1]))


def test_generate_static_falls_back_where_unsupported(caplog):
    model = _model("paragru")
    prompt = _prompt(model, rows=1)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static",
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert "return_dict_in_generate is not supported" in caplog.text
    assert model.static_decoder_slot.decoder is None


def test_model_with_a_decoder_copies_and_pickles():
    """A model that decoded statically still deep-copies and pickles (its copy starts without a decoder)."""
    import pickle

    model = _model("mamba2")
    prompt = _prompt(model, rows=1)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.static_decoder_slot.decoder is None
        with torch.no_grad():
            got = clone.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                 cache_implementation="static")
        assert torch.equal(got, ref)
