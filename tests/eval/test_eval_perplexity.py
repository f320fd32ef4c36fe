"""Perplexity: exp(mean NLL) computed independently; packed documents == documents evaluated alone."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pararnn_lm.eval.perplexity import (IGNORE_INDEX, evaluate_batches, evaluate_stream, main as ppl_main,
                                        plot_loss_by_position, position_ids_from_eos, split_documents)
from pararnn_lm.models import ParaRNNLMConfig, ParaRNNLMForCausalLM

EOS = 1


def tiny_llama(vocab: int = 50, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=EOS, bos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


class ResetGRU(nn.Module):
    """A recurrent LM that restarts its state wherever position_ids == 0 (like our packed RNN models)."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.cell, self.head = nn.Embedding(vocab, 16), nn.GRUCell(16, 16), nn.Linear(16, vocab)

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        B, T = input_ids.shape
        h, outs = input_ids.new_zeros(B, 16, dtype=torch.float), []
        x = self.emb(input_ids)
        for t in range(T):
            if position_ids is not None:
                h = h * (position_ids[:, t] != 0).float()[:, None]
            h = self.cell(x[:, t], h)
            outs.append(h)
        return self.head(torch.stack(outs, 1))


def make_stream(n_docs: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.randint(3, 50, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g),
                       torch.tensor([EOS])]) for _ in range(n_docs)]
    return torch.cat(docs)


def independent_nll(model, docs, seq_len):
    """Loop over documents one at a time, batch 1, log_softmax by hand."""
    total, count, by_pos = 0.0, 0, {}
    for d in docs:
        for s in range(0, len(d), seq_len):
            piece = d[s : s + seq_len]
            if len(piece) < 2:
                continue
            out = model(input_ids=piece[None])
            logits = out if isinstance(out, torch.Tensor) else out.logits
            logp = torch.log_softmax(logits[0].double(), -1)
            for t in range(len(piece) - 1):
                v = -float(logp[t, piece[t + 1]].detach())
                total, count = total + v, count + 1
                by_pos.setdefault(t + 1, []).append(v)
    return total, count, by_pos


def test_position_ids_from_eos():
    x = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8]])
    assert position_ids_from_eos(x, EOS).tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    assert position_ids_from_eos(x, None).tolist() == [list(range(7))]


@pytest.mark.parametrize("model_fn", [tiny_llama, ResetGRU], ids=["llama-sdpa", "reset-gru"])
def test_packed_equals_unpacked_equals_independent(model_fn):
    model = model_fn()
    stream = make_stream()
    docs = split_documents(stream, EOS)
    seq_len = 64  # longer than most documents -> windows pack several; some docs straddle windows
    with torch.no_grad():
        ref_total, ref_count, ref_pos = independent_nll(model, _window_docs(stream, seq_len), seq_len)
        packed = evaluate_stream(model, stream, seq_len=seq_len, batch_size=3, eos_token_id=EOS, packed=True)
        unpacked = evaluate_stream(model, stream, seq_len=seq_len, batch_size=4, eos_token_id=EOS, packed=False)
    assert packed.total_tokens == ref_count
    assert packed.perplexity == pytest.approx(math.exp(ref_total / ref_count), rel=1e-5)
    for p, vals in ref_pos.items():
        assert packed.loss_by_position()[p] == pytest.approx(sum(vals) / len(vals), rel=1e-4, abs=1e-5)
    # unpacked chunks documents at seq_len from the document start (not the window), so compare it to its
    # own independent reference; with every doc shorter than seq_len the two agree exactly.
    u_total, u_count, _ = independent_nll(model, docs, seq_len)
    assert unpacked.total_tokens == u_count
    assert unpacked.perplexity == pytest.approx(math.exp(u_total / u_count), rel=1e-5)


@pytest.mark.parametrize("tail", [0, 1, 2, 17])
def test_packed_batches_share_one_shape_and_score_every_real_token(tail):
    """Ragged tails and a short last batch are padded to (batch_size, seq_len) - one compiled shape on the
    GPU - without scoring a padding token or dropping a real one (a 1-token tail has nothing to predict)."""
    from pararnn_lm.eval import perplexity

    model, seq_len, batch_size = ResetGRU(), 16, 3
    stream = make_stream(n_docs=12)[: 4 * seq_len + tail]
    shapes = []
    real_windows = perplexity._windows
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(perplexity, "_windows", lambda *a: (shapes.append(b["input_ids"].shape) or b for b in real_windows(*a)))
        with torch.no_grad():
            acc = evaluate_stream(model, stream, seq_len=seq_len, batch_size=batch_size, eos_token_id=EOS)
            ref_total, ref_count, _ = independent_nll(model, _window_docs(stream, seq_len), seq_len)
    assert set(shapes) == {torch.Size([batch_size, seq_len])}
    assert len(shapes) == 2  # 4 full windows (+ a tail) in batches of 3
    assert acc.total_tokens == ref_count
    assert acc.total_nll == pytest.approx(ref_total, rel=1e-5)


def _window_docs(stream, seq_len):
    """What a model evaluating packed windows sees: documents cut at window boundaries."""
    out = []
    for s in range(0, len(stream), seq_len):
        out += split_documents(stream[s : s + seq_len], EOS)
    return out


def test_packed_equals_unpacked_when_docs_fit():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    stream = torch.cat([torch.cat([torch.randint(3, 50, (n,), generator=g), torch.tensor([EOS])]) for n in (5, 9, 3, 12)])
    with torch.no_grad():
        # one window holds all documents: packed (position_ids) must equal each document alone
        a = evaluate_stream(model, stream, seq_len=len(stream), eos_token_id=EOS, packed=True)
        b = evaluate_stream(model, stream, seq_len=len(stream), eos_token_id=EOS, packed=False, batch_size=2)
    assert a.total_tokens == b.total_tokens == len(stream) - 4
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)
    for x, y in zip(a.loss_by_position(), b.loss_by_position()):
        assert (x is None and y is None) or x == pytest.approx(y, rel=1e-4, abs=1e-5)


def test_ignore_index_and_token_weighting_across_batches():
    """Perplexity is exp(total NLL / total scored tokens) over every batch and row, not an average of
    per-batch (or per-row) means; IGNORE_INDEX labels are not scored."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(2)
    ids_a = torch.randint(3, 50, (2, 10), generator=g)
    labels_a = ids_a.clone()
    labels_a[0, 4:] = IGNORE_INDEX  # row 0 scores 3 tokens, row 1 scores 9
    ids_b = torch.randint(3, 50, (1, 6), generator=g)  # a second batch of 5 scored tokens
    batches = [{"input_ids": ids_a, "labels": labels_a}, {"input_ids": ids_b}]
    per_batch = []  # each batch's token NLLs, one row at a time at batch size 1
    with torch.no_grad():
        for b in batches:
            nlls = []
            for ids, labels in zip(b["input_ids"], b.get("labels", b["input_ids"])):
                logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
                nlls += [-float(logp[t, labels[t + 1]]) for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]
            per_batch.append(nlls)
    tokens = [v for nlls in per_batch for v in nlls]
    expect = math.exp(sum(tokens) / len(tokens))
    # the test can tell the weightings apart: the mean of per-batch means is a different perplexity
    batch_weighted = math.exp(sum(sum(n) / len(n) for n in per_batch) / len(per_batch))
    assert abs(batch_weighted / expect - 1) > 1e-3
    acc = evaluate_batches(model, batches)
    assert acc.total_tokens == len(tokens) == 3 + 9 + 5
    assert acc.perplexity == pytest.approx(expect, rel=1e-5)
    assert acc.mean_nll == pytest.approx(sum(tokens) / len(tokens), rel=1e-5)


def test_plot_and_cli(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{w: i + 3 for i, w in enumerate("the a cat dog sat ran on mat log".split())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", bos_token="<s>", pad_token="<pad>")
    model_dir = tmp_path / "model"
    tiny_llama(vocab=50).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "held.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["the cat sat on the mat", "a dog ran", "the dog sat on a log"]))
    out, png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    res = ppl_main(["--model", str(model_dir), "--data", str(data), "--seq-len", "8", "--train-len", "4",
                    "--out", str(out), "--plot", str(png), "--arch", "llama", "--size", "tiny", "--device", "cpu"])
    saved = json.loads(out.read_text())
    assert saved["kind"] == "perplexity" and saved["tokens"] == res["tokens"] > 0 and math.isfinite(saved["perplexity"])
    assert png.stat().st_size > 1000
    plot_loss_by_position({"x": [None, 2.0, 1.5, 1.2]}, tmp_path / "p2.png", train_len=2)


def _project_model(mixer: str):
    torch.manual_seed(0)
    cfg = ParaRNNLMConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                          num_attention_heads=4, mixer=mixer, eos_token_id=EOS, pad_token_id=0,
                          mamba_headdim=16, mamba_d_state=16, mamba_chunk_size=16)
    return ParaRNNLMForCausalLM(cfg).eval()


@pytest.mark.parametrize("mixer", ["paragru", "paralstm", "mamba2", "attention"])
def test_project_models_packed_equals_unpacked(mixer):
    model = _project_model(mixer)
    stream = make_stream(n_docs=5, seed=3)
    with torch.no_grad():
        ref_total, ref_count, _ = independent_nll(model, _window_docs(stream, 48), 48)
        packed = evaluate_stream(model, stream, seq_len=48, batch_size=2, eos_token_id=EOS, packed=True)
    assert packed.total_tokens == ref_count
    assert packed.perplexity == pytest.approx(math.exp(ref_total / ref_count), rel=1e-4)
