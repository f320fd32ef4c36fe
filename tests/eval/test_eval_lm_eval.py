"""lm-eval on the project's models: every loglikelihood lm-eval's HFLM returns for our models (padded batches,
rolling windows) equals an independent batch-1 computation, and task metrics equal values recomputed from it.

The reference (``reference_*`` below) runs one unpadded forward per scored window and sums float64
log-softmax over the continuation tokens; it follows lm-eval's documented request conventions (the
continuation's tokens are those of ``encode(context + continuation)`` after ``len(encode(context))``; an empty
context is the prefix token, BOS; rolling windows predict ``max_length`` tokens each, the last one with a full
window of context), not its code.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from pararnn_lm.data.tokenizer import train_tokenizer
from pararnn_lm.eval.lm_eval_tasks import evaluate, loglikelihoods, paper_tasks, rolling_loglikelihoods, wrap_live_model
from pararnn_lm.models import ParaRNNLMForCausalLM, config_for
from pararnn_lm.models.export import export_model

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
ARCHS = ("paragru", "paralstm", "mamba2", "attention")
ROLLING_WINDOW = 32  # max_length of the rolling test: the long fixture text spans many windows
ATOL = 1e-4  # fp32 forward vs float64 log-softmax of the same logits, per scored window

PAIRS = [("Question: What color is the cat?\nAnswer:", " red"),
         ("The quick brown fox", " jumps over the lazy dog near the river bank."),
         ("A", " short line."),
         ("", "A short line."),  # empty context: scored after the prefix token
         ("In the beginning there was a small village with a mill", " and a well."),
         ("Numbers like 42 and 3.14 appear here, with punctuation: commas", ", colons; and dashes - too!")]


def _rolling_texts() -> list[str]:
    return [json.loads(line)["text"] for line in (FIXTURES / "tiny_rolling.jsonl").read_text().splitlines() if line]


def _mc_data() -> dict[str, list[dict]]:
    return json.loads((FIXTURES / "tiny_mc.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    texts = _rolling_texts() + [q["question"] + " " + " ".join(q["choices"]) for split in _mc_data().values() for q in split]
    return train_tokenizer(texts, vocab_size=320, min_frequency=1)


def build_model(arch: str, tokenizer) -> ParaRNNLMForCausalLM:
    torch.manual_seed(0)
    cfg = config_for(arch, "debug", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return ParaRNNLMForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tokenizer):
    return build_model(request.param, tokenizer)


# --------------------------------------------------------------------------------- independent reference

def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) float64 log-probabilities of the next token, one unpadded batch-1 forward."""
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), -1)


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    assert context == context.rstrip(), "lm-eval moves a context's trailing spaces into the continuation"
    if context:
        ctx = _encode(tokenizer, context)
        cont = _encode(tokenizer, context + continuation)[len(ctx):]
    else:
        ctx, cont = [tokenizer.bos_token_id], _encode(tokenizer, continuation)
    logp = _logprobs(model, ctx + cont)[len(ctx) - 1 : -1]  # row i predicts cont[i]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def reference_rolling(model, tokenizer, text: str, window: int) -> tuple[float, int]:
    """Sum of log p over every token of ``text`` (after BOS) in windows of ``window`` predictions; each
    window's input is the ``window`` tokens of [BOS] + text ending just before its last predicted token.
    Returns (loglikelihood, number of windows)."""
    ids = [tokenizer.bos_token_id] + _encode(tokenizer, text)
    n = len(ids) - 1  # ids[j + 1] is the j-th predicted token
    total, windows = 0.0, 0
    for start in range(0, n, window):
        end = min(start + window, n)
        lo = max(0, end - window)
        logp = _logprobs(model, ids[lo:end])[start - lo :]  # rows predicting ids[start + 1 : end + 1]
        total += float(logp.gather(1, torch.tensor(ids[start + 1 : end + 1])[:, None]).sum())
        windows += 1
    return total, windows


def greedy_pairs(model, tokenizer, limit: int = 3) -> list[tuple[str, str]]:
    """(context, continuation) pairs whose one-token continuation is the model's argmax after the context:
    their greedy flag must be True. Contexts are prefixes of the fixture texts where the text re-encodes
    to the same tokens (a random model's argmax is often a stray byte that does not)."""
    out = []
    for text in _rolling_texts():
        ids = _encode(tokenizer, text)
        best = _logprobs(model, ids).argmax(-1).tolist()  # best[p]: the argmax after ids[: p + 1]
        for p in range(len(ids)):
            ctx, cont = tokenizer.decode(ids[: p + 1]), tokenizer.decode([best[p]])
            if ctx == ctx.rstrip() and _encode(tokenizer, ctx + cont) == ids[: p + 1] + [best[p]]:
                out.append((ctx, cont))
                if len(out) == limit:
                    return out
    return out


# ------------------------------------------------------------------------------------------------- tests

def test_paper_suite_config():
    few, low = paper_tasks("fewshot"), paper_tasks("lowshot")
    assert {t: v["num_fewshot"] for t, v in few.items()} == {
        "arc_challenge": 25, "hellaswag": 10, "openbookqa": 10, "winogrande": 5, "piqa": 0, "mmlu": 0}
    assert {t: v["num_fewshot"] for t, v in low.items()} == {
        "arc_challenge": 3, "hellaswag": 0, "openbookqa": 0, "winogrande": 0, "piqa": 0, "mmlu": 0}


def test_loglikelihood_equals_independent(model, tokenizer):
    pairs = PAIRS + greedy_pairs(model, tokenizer)
    expect = [reference_loglikelihood(model, tokenizer, c, x) for c, x in pairs]
    assert {g for _, g in expect} == {True, False}, "the greedy flag must be exercised both ways"
    for batch_size in (1, 4):  # 4: right-padded batches of different lengths
        got = loglikelihoods(wrap_live_model(model, tokenizer, batch_size=batch_size), pairs)
        for pair, (lp, greedy), (ref_lp, ref_greedy) in zip(pairs, got, expect, strict=True):
            assert lp == pytest.approx(ref_lp, abs=ATOL), (batch_size, pair)
            assert greedy == ref_greedy, (batch_size, pair)


def test_rolling_equals_independent(model, tokenizer):
    texts = _rolling_texts()
    expect = [reference_rolling(model, tokenizer, t, ROLLING_WINDOW) for t in texts]
    assert max(w for _, w in expect) >= 3  # several windows, the last one partial
    for batch_size in (1, 4):
        lm = wrap_live_model(model, tokenizer, batch_size=batch_size, max_length=ROLLING_WINDOW)
        assert rolling_loglikelihoods(lm, texts) == pytest.approx([ll for ll, _ in expect], abs=ATOL), batch_size


def reference_metrics(model, tokenizer, num_fewshot: int) -> dict[str, float]:
    """tiny_mc's acc / acc_norm with first-n few-shot prompts and tiny_rolling's perplexities, from the
    reference loglikelihoods (rolling windows of the model's max_position_embeddings, HFLM's max_length)."""
    data = _mc_data()
    shots = "".join(f"Question: {d['question']}\nAnswer: {d['choices'][d['answer']]}\n\n" for d in data["train"][:num_fewshot])
    acc = acc_norm = 0
    for d in data["test"]:
        prompt = shots + f"Question: {d['question']}\nAnswer:"
        lls = torch.tensor([reference_loglikelihood(model, tokenizer, prompt, " " + c)[0] for c in d["choices"]])
        acc += int(lls.argmax()) == d["answer"]
        acc_norm += int((lls / torch.tensor([float(len(c)) for c in d["choices"]])).argmax()) == d["answer"]
    texts = _rolling_texts()
    ll = sum(reference_rolling(model, tokenizer, t, model.config.max_position_embeddings)[0] for t in texts)
    n_words = sum(len(re.split(r"\s+", t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n = len(data["test"])
    return {"acc": acc / n, "acc_norm": acc_norm / n, "word_perplexity": math.exp(-ll / n_words),
            "byte_perplexity": math.exp(-ll / n_bytes), "bits_per_byte": -ll / n_bytes / math.log(2)}


def assert_metrics(res: dict, expect: dict[str, float]) -> None:
    mc, roll = res["results"]["pararnn_tiny_mc"], res["results"]["pararnn_tiny_rolling"]
    assert mc["acc,none"] == pytest.approx(expect["acc"], abs=1e-9)
    assert mc["acc_norm,none"] == pytest.approx(expect["acc_norm"], abs=1e-9)
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert roll[f"{key},none"] == pytest.approx(expect[key], rel=1e-5), key


def test_live_model_local_tasks(tokenizer):
    # attention: a random recurrent model forgets the few-shot examples before "Answer:", attention does not,
    # so its accuracy tells the 2-shot prompt from a 0-shot one (checked below)
    model = build_model("attention", tokenizer)
    tasks = {"pararnn_tiny_mc": 2, "pararnn_tiny_rolling": 0}
    res = evaluate(model, tasks, tokenizer=tokenizer, include_path=FIXTURES, batch_size=4, device="cpu",
                   meta={"arch": "attention", "size": "debug"})
    expect = reference_metrics(model, tokenizer, num_fewshot=2)
    assert expect["acc"] != reference_metrics(model, tokenizer, num_fewshot=0)["acc"]
    assert_metrics(res, expect)
    assert res["n-shot"] == tasks
    assert res["pararnn_meta"] == {"arch": "attention", "size": "debug"}
    json.dumps(res)  # serialisable as written by the CLI


def test_exported_dir_through_hf_model(tokenizer, tmp_path):
    """The export loads in lm-eval's own ``hf`` model (trust_remote_code) and scores like the live model."""
    model = build_model("paragru", tokenizer)
    out = export_model(model, tmp_path / "export", tokenizer)
    res = evaluate(out, {"pararnn_tiny_mc": 0, "pararnn_tiny_rolling": 0}, include_path=FIXTURES, batch_size=2,
                   device="cpu")
    assert_metrics(res, reference_metrics(model, tokenizer, num_fewshot=0))
