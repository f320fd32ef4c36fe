"""The FlexAttention path of the attention mixer (models/attention.py) against the SDPA dense-mask path.

On CPU torch runs flex_attention's forward only (it refuses the backward there), so the CPU tests
compare logits (eager and inside a torch.compile'd block, the way training runs it); gradients and a
realistic bf16 shape are GPU tests. Spies check that the path under test really ran.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import pararnn_lm.models.attention as attention
import pararnn_lm.models.mixers as mixers
from pararnn_lm.models import ParaRNNLMConfig, ParaRNNLMForCausalLM
from pararnn_lm.models.attention import document_block_mask, use_flex
from pararnn_lm.models.packing import SequenceInfo

# torch >= 2.11 (a requirement) always has FlexAttention: no skip guard, a broken import must fail.
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

ROWS = [(4, 1, 1, 7, 3, 5), (9, 7, 5), (21,)]  # several documents, adjacent starts, one unpacked row
T = 21


def _config(impl: str, **kw) -> ParaRNNLMConfig:
    base = dict(mixer="attention", vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, attention_impl=impl)
    base.update(kw)
    return ParaRNNLMConfig(**base)


def _pair(dtype=torch.float32, device="cpu", **kw):
    torch.manual_seed(0)
    sdpa = ParaRNNLMForCausalLM(_config("sdpa", **kw)).to(device=device, dtype=dtype)
    flex = ParaRNNLMForCausalLM(_config("flex", **kw)).to(device=device, dtype=dtype)
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def _batch(rows=ROWS, vocab=64, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (len(rows), sum(rows[0])), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    return ids.to(device), pos.to(device)


@pytest.fixture
def flex_calls(monkeypatch):
    calls = []
    real = attention.flex_attention

    def spy(q, k, v, block_mask, enable_gqa):
        calls.append((tuple(q.shape), tuple(k.shape), enable_gqa))
        return real(q, k, v, block_mask, enable_gqa)

    monkeypatch.setattr(mixers, "flex_attention", spy)  # the name the attention mixer calls
    return calls


# --------------------------------------------------------------------------------------------- config
def test_attention_impl_is_validated_and_round_trips(tmp_path):
    assert ParaRNNLMConfig().attention_impl == "auto"
    with pytest.raises(ValueError, match="attention_impl must be one of auto\\|sdpa\\|flex, got 'flash'"):
        ParaRNNLMConfig(mixer="attention", attention_impl="flash")
    model = ParaRNNLMForCausalLM(_config("flex"))
    model.save_pretrained(tmp_path)
    assert ParaRNNLMConfig.from_pretrained(tmp_path).attention_impl == "flex"
    reloaded = ParaRNNLMForCausalLM.from_pretrained(tmp_path, attention_impl="sdpa")
    assert reloaded.config.attention_impl == "sdpa"
    old = _config("auto").to_dict()
    del old["attention_impl"]  # configs saved before the field existed
    assert ParaRNNLMConfig.from_dict(old).attention_impl == "auto"


def test_auto_takes_flex_only_for_packed_cuda_forwards_without_a_cache():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    kw = dict(dtype=torch.bfloat16, head_dim=64, has_cache=False, one_document_per_row=False)
    assert use_flex("auto", device=cuda, **kw)
    assert not use_flex("auto", device=cpu, **kw)
    assert not use_flex("auto", device=cuda, **{**kw, "one_document_per_row": True})  # SDPA is_causal flash
    assert not use_flex("auto", device=cuda, **{**kw, "has_cache": True})
    assert not use_flex("auto", device=cuda, **{**kw, "head_dim": 24})
    assert not use_flex("auto", device=cuda, **{**kw, "dtype": torch.float64})
    assert not use_flex("sdpa", device=cuda, **kw)
    assert use_flex("flex", device=cpu, **{**kw, "one_document_per_row": True})
    assert not use_flex("flex", device=cpu, **{**kw, "has_cache": True})


# ------------------------------------------------------------------------------------------ the mask
def test_block_mask_is_the_dense_causal_same_document_mask():
    # 3 x 128-token blocks: documents cross block edges, so there are full, partial and empty blocks
    lengths = [(100, 60, 1, 1, 150, 72), (384,)]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    seq = SequenceInfo(pos)
    model = ParaRNNLMForCausalLM(_config("sdpa")).model
    dense, doc = model._attention_mask(seq, None, torch.empty(2, 384, 8))
    assert dense.shape == (2, 1, 384, 384)
    bm = document_block_mask(doc)
    q, kv = torch.meshgrid(torch.arange(384), torch.arange(384), indexing="ij")
    for b in range(2):
        allowed = bm.mask_mod(torch.tensor(b), torch.tensor(0), q, kv)
        assert torch.equal(allowed, dense[b, 0])
    blocks = dense.view(2, 1, 3, 128, 3, 128).any(-1).any(-2)  # (2, 1, 3, 3): a block with any allowed pair
    assert torch.equal(bm.to_dense().bool(), blocks)
    assert not blocks[0, 0, 2, 0]  # the last 2 documents of row 0 never see the first block: skipped


def test_flex_model_builds_one_block_mask_per_forward_without_host_sync(monkeypatch, flex_calls):
    import pararnn_lm.models.modeling as modeling

    built = []
    real = modeling.document_block_mask
    monkeypatch.setattr(modeling, "document_block_mask", lambda d: built.append(1) or real(d))
    _, flex = _pair(num_hidden_layers=3)
    ids, pos = _batch()

    def sync(*_a, **_k):
        raise AssertionError("a tensor value was read on the host during the forward")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "nonzero", sync)
    with torch.no_grad():
        flex(ids, position_ids=pos, use_cache=False)
    monkeypatch.undo()
    assert built == [1] and len(flex_calls) == 3


# ---------------------------------------------------------------------------------- numerics (CPU)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("layout", ["packed", "given_positions_without_resets", "no_positions"])
def test_flex_logits_equal_sdpa(kv_heads, layout, flex_calls):
    sdpa, flex = _pair(num_key_value_heads=kv_heads)
    ids, pos = _batch()
    if layout == "given_positions_without_resets":
        pos = torch.arange(T).expand(len(ROWS), T) + 3
    kwargs = {} if layout == "no_positions" else {"position_ids": pos}
    with torch.no_grad():
        ref = sdpa(ids, use_cache=False, **kwargs).logits
        got = flex(ids, use_cache=False, **kwargs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert len(flex_calls) == 2 and all(c[2] == (kv_heads != 4) for c in flex_calls)
    assert flex_calls[0][1][1] == kv_heads  # GQA: k/v reach flex_attention unexpanded


def test_flex_packed_rows_equal_separate_documents(flex_calls):
    _, flex = _pair(num_key_value_heads=2)
    flex.eval()
    ids, pos = _batch()
    with torch.no_grad():
        logits = flex(ids, position_ids=pos, use_cache=False).logits
        for b, row in enumerate(ROWS):
            t0 = 0
            for n in row:
                alone = flex(ids[b : b + 1, t0 : t0 + n], use_cache=False).logits[0]
                torch.testing.assert_close(logits[b, t0 : t0 + n], alone, atol=1e-5, rtol=1e-5)
                t0 += n
    assert len(flex_calls) == 2 * (1 + sum(len(r) for r in ROWS))


def test_decoding_keeps_sdpa_with_flex_forced(flex_calls):
    sdpa, flex = _pair()
    ids, pos = _batch()
    with torch.no_grad():
        ref = sdpa.generate(ids[:, :9], max_new_tokens=4, do_sample=False, pad_token_id=0)
        got = flex.generate(ids[:, :9], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref) and flex_calls == []


@pytest.mark.slow
def test_compiled_block_takes_the_block_mask_without_recompiling():
    """Training compiles each block (pararnn_lm/training/build.py): the BlockMask is a block input, a new packing
    (new document ids, same shapes) must not recompile, and the compiled flex == SDPA."""
    import torch._dynamo

    sdpa, flex = _pair(num_key_value_heads=2, num_hidden_layers=1)
    flex.model.layers[0].compile(backend="inductor")
    torch._dynamo.reset()
    other = [(2, 2, 9, 8), (20, 1), (5, 16)]
    with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(error_on_recompile=True):
        warnings.simplefilter("ignore")
        for rows in (ROWS, other):
            ids, pos = _batch(rows)
            ref = sdpa(ids, position_ids=pos, use_cache=False).logits
            got = flex(ids, position_ids=pos, use_cache=False).logits
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ GPU
def _grads_close(model_a, model_b, loss_a, loss_b, tol):
    pa = [p for p in model_a.parameters() if p.requires_grad]
    pb = [p for p in model_b.parameters() if p.requires_grad]
    ga, gb = torch.autograd.grad(loss_a, pa), torch.autograd.grad(loss_b, pb)
    names = [n for n, _ in model_a.named_parameters()]
    for name, a, b in zip(names, ga, gb):
        err, scale = (a.float() - b.float()).abs().max().item(), max(1.0, b.float().abs().max().item())
        assert err <= tol * scale, f"{name}: gradient error {err:.3e} (scale {scale:.2f})"


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_gpu_flex_equals_sdpa_with_gradients_fp32(kv_heads, flex_calls):
    sdpa, flex = _pair(device="cuda", num_key_value_heads=kv_heads)
    flex.config.attention_impl = "auto"  # auto: flex on CUDA for packed rows
    ids, pos = _batch(device="cuda")
    w = torch.randn(*ids.shape, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    ref = sdpa(ids, position_ids=pos, use_cache=False).logits
    got = flex(ids, position_ids=pos, use_cache=False).logits
    assert len(flex_calls) == 2
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    _grads_close(flex, sdpa, (got * w).sum(), (ref * w).sum(), 1e-5)


@pytest.mark.gpu
def test_gpu_flex_equals_sdpa_bf16_realistic_shape(flex_calls):
    rows = [(700, 1, 300, 1047), (2048,)]
    kw = dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=2, intermediate_size=2816,
              vocab_size=512, num_key_value_heads=16)
    sdpa, flex = _pair(dtype=torch.bfloat16, device="cuda", **kw)
    flex.config.attention_impl = "auto"
    ids, pos = _batch(rows, vocab=512, device="cuda")
    ref = sdpa(ids, position_ids=pos, use_cache=False).logits.float()
    got = flex(ids, position_ids=pos, use_cache=False).logits.float()
    assert len(flex_calls) == 2 and flex_calls[0][0] == (2, 16, 2048, 64)
    err = (got - ref).abs().max().item()
    assert err <= 5e-2 * max(1.0, ref.abs().max().item()), err
    w = torch.randn_like(ref)
    _grads_close(flex, sdpa, (got * w).sum(), (ref * w).sum(), 5e-2)


@pytest.mark.gpu
def test_gpu_flex_packed_rows_equal_separate_documents_with_gradients(flex_calls):
    _, flex = _pair(device="cuda", num_key_value_heads=2)
    flex.config.attention_impl = "auto"
    ids, pos = _batch(device="cuda")
    w = torch.randn(*ids.shape, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    params = [p for p in flex.parameters() if p.requires_grad]
    logits = flex(ids, position_ids=pos, use_cache=False).logits
    assert len(flex_calls) == 2
    grads = torch.autograd.grad((logits * w).sum(), params)
    ref_loss, ref_logits = 0, torch.empty_like(logits)
    for b, row in enumerate(ROWS):
        t0 = 0
        for n in row:
            out = flex(ids[b : b + 1, t0 : t0 + n], use_cache=False).logits[0]  # one document per row: SDPA
            ref_logits[b, t0 : t0 + n] = out.detach()
            ref_loss = ref_loss + (out * w[b, t0 : t0 + n]).sum()
            t0 += n
    ref_grads = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(logits.detach(), ref_logits, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max().item() <= 2e-5 * max(1.0, r.abs().max().item())
