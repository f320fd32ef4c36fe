"""Documents packed inside batch rows (position_ids restarting at 0): the ParaRNN mixers hand the
document starts to the engine as ``resets`` (no packing into one row, no host sync).

References are independent of that path: every document run on its own (logits and parameter
gradients), and a prefill of only the last document of each row before decoding.
"""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.models import ParaRNNLMForCausalLM, config_for
from pararnn_lm.models.cache import ParaRNNCache

# Two rows of documents; row 0 also has a one-token document and two adjacent starts.
ROWS = [(4, 1, 1, 7, 3), (9, 7)]
HYBRID = dict(layer_pattern=["paragru", "attention", "mamba2", "paralstm"], num_hidden_layers=4, mamba_headdim=16,
              mamba_d_state=8, mamba_chunk_size=8, num_attention_heads=4)


def _model(arch: str, mode: str, dtype) -> ParaRNNLMForCausalLM:
    torch.manual_seed(0)
    extra = HYBRID if arch == "hybrid" else {}
    cfg = config_for("paragru" if arch == "hybrid" else arch, "debug", rnn_mode=mode, **extra)
    return ParaRNNLMForCausalLM(cfg).to(dtype)


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    T = sum(ROWS[0])
    assert all(sum(r) == T for r in ROWS)
    ids = torch.randint(0, vocab, (len(ROWS), T), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])
    return ids, pos


CASES = [("paragru", "fused", torch.float32), ("paralstm", "fused", torch.float32),
         ("paragru", "newton_torch", torch.float64), ("paralstm", "sequential", torch.float64),
         ("hybrid", "fused", torch.float32)]


@pytest.mark.parametrize("arch, mode, dtype", CASES)
def test_packed_rows_equal_separate_documents(arch, mode, dtype):
    """Logits and every parameter gradient of a packed batch == the sum over documents run alone."""
    model = _model(arch, mode, dtype).train()
    ids, pos = _batch(model.config.vocab_size)
    w = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(2), dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]

    logits = model(ids, position_ids=pos, use_cache=False).logits
    grads = torch.autograd.grad((logits * w).sum(), params)

    ref_logits = torch.empty_like(logits)
    ref_loss = 0
    for b, row in enumerate(ROWS):
        t0 = 0
        for n in row:
            out = model(ids[b : b + 1, t0 : t0 + n], use_cache=False).logits[0]
            ref_logits[b, t0 : t0 + n] = out.detach()
            ref_loss = ref_loss + (out * w[b, t0 : t0 + n]).sum()
            t0 += n
    ref_grads = torch.autograd.grad(ref_loss, params)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(logits.detach(), ref_logits, atol=tol, rtol=tol)
    # RMSNorm computes in fp32 even in an fp64 model: weight gradients summed over tokens in another
    # order differ at ~1e-7 relative; a state or gradient crossing a document start is ~1e-2.
    gtol = 1e-6 if dtype == torch.float64 else 2e-5
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, r in zip(names, grads, ref_grads):
        err, scale = (g - r).abs().max().item(), max(1.0, r.abs().max().item())
        assert err <= gtol * scale, f"{name}: gradient error {err:.3e} (scale {scale:.2f})"


@pytest.mark.parametrize("arch", ["paragru", "paralstm", "hybrid"])
def test_decoding_after_a_packed_prefill_continues_the_last_document(arch):
    """The cache after a packed prefill holds each row's last document only (h = last step's state)."""
    model = _model(arch, "fused", torch.float32).eval()
    ids, pos = _batch(model.config.vocab_size)
    nxt = torch.randint(0, model.config.vocab_size, (len(ROWS), 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = ParaRNNCache(model.config)  # filled in place
        steps = [model(ids, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]]
        for t in range(nxt.shape[1]):
            steps.append(model(nxt[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
        for b, row in enumerate(ROWS):
            last = ids[b : b + 1, sum(row) - row[-1] :]
            full = model(torch.cat((last, nxt[b : b + 1]), 1), use_cache=False).logits[0, last.shape[1] - 1 :]
            torch.testing.assert_close(torch.stack([s[b] for s in steps]), full, atol=1e-4, rtol=1e-4)
