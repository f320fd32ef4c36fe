"""lm-eval on local offline tasks: live model in-process, exported dir via the `hf` model, batch == batch-1."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from pararnn_lm.eval.lm_eval_tasks import evaluate, loglikelihoods, paper_tasks, rolling_loglikelihoods, wrap_live_model  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (FIXTURES / "tiny_rolling.jsonl").read_text().splitlines() if line]
    texts += [q["question"] + " " + " ".join(q["choices"]) for q in json.loads((FIXTURES / "tiny_mc.json").read_text())["test"]]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<s>", "<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", bos_token="<s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


PAIRS = [("Question: What color is the cat?\nAnswer:", " red"),
         ("The quick brown fox", " jumps over the lazy dog near the river bank."),
         ("A", " short line."),
         ("In the beginning there was a small village with a mill", " and a well."),
         ("Numbers like 42 and 3.14 appear here, with punctuation: commas", ", colons; and dashes - too!")]


def test_paper_suite_config():
    few, low = paper_tasks("fewshot"), paper_tasks("lowshot")
    assert {t: v["num_fewshot"] for t, v in few.items()} == {
        "arc_challenge": 25, "hellaswag": 10, "openbookqa": 10, "winogrande": 5, "piqa": 0, "mmlu": 0}
    assert {t: v["num_fewshot"] for t, v in low.items()} == {
        "arc_challenge": 3, "hellaswag": 0, "openbookqa": 0, "winogrande": 0, "piqa": 0, "mmlu": 0}


def test_batched_equals_batch1_loglikelihoods(model, tokenizer):
    one = loglikelihoods(wrap_live_model(model, tokenizer, batch_size=1), PAIRS)
    many = loglikelihoods(wrap_live_model(model, tokenizer, batch_size=4), PAIRS)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # and both equal an independent computation with the model itself
    for (ctx, cont), (lp, _) in zip(PAIRS, one):
        c_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        x_ids = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"][len(c_ids):]
        ids = torch.tensor([c_ids + x_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        ref = sum(float(logp[len(c_ids) - 1 + i, t]) for i, t in enumerate(x_ids))
        assert lp == pytest.approx(ref, abs=1e-3)


def test_batched_equals_batch1_rolling(model, tokenizer):
    texts = [json.loads(line)["text"] for line in (FIXTURES / "tiny_rolling.jsonl").read_text().splitlines() if line]
    a = rolling_loglikelihoods(wrap_live_model(model, tokenizer, batch_size=1, max_length=32), texts)
    b = rolling_loglikelihoods(wrap_live_model(model, tokenizer, batch_size=4, max_length=32), texts)
    assert a == pytest.approx(b, abs=1e-3)


def test_live_model_local_tasks(model, tokenizer):
    res = evaluate(model, {"pararnn_tiny_mc": 2, "pararnn_tiny_rolling": 0}, tokenizer=tokenizer,
                   include_path=FIXTURES, batch_size=4, device="cpu", meta={"arch": "llama", "size": "tiny"})
    mc, roll = res["results"]["pararnn_tiny_mc"], res["results"]["pararnn_tiny_rolling"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0
    assert math.isfinite(roll["word_perplexity,none"]) and roll["byte_perplexity,none"] > 1.0
    assert res["n-shot"] == {"pararnn_tiny_mc": 2, "pararnn_tiny_rolling": 0}
    assert res["pararnn_meta"]["arch"] == "llama"
    json.dumps(res)  # serialisable as written by the CLI


def test_exported_dir_through_hf_model(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "export")
    tokenizer.save_pretrained(tmp_path / "export")
    res = evaluate(tmp_path / "export", {"pararnn_tiny_mc": 0}, include_path=FIXTURES, batch_size=2, device="cpu")
    live = evaluate(model, {"pararnn_tiny_mc": 0}, tokenizer=tokenizer, include_path=FIXTURES, batch_size=2, device="cpu")
    assert res["results"]["pararnn_tiny_mc"]["acc,none"] == live["results"]["pararnn_tiny_mc"]["acc,none"]


@pytest.mark.parametrize("mixer", ["paragru", "mamba2"])
def test_project_model_batched_equals_batch1(tokenizer, mixer):
    try:
        from pararnn_lm.models import ParaRNNLMConfig, ParaRNNLMForCausalLM
    except Exception:
        pytest.skip("models/ not available yet")
    torch.manual_seed(0)
    cfg = ParaRNNLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                          num_attention_heads=4, mixer=mixer, mamba_headdim=16, mamba_d_state=16, mamba_chunk_size=16,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    m = ParaRNNLMForCausalLM(cfg).eval()
    one = loglikelihoods(wrap_live_model(m, tokenizer, batch_size=1), PAIRS)
    many = loglikelihoods(wrap_live_model(m, tokenizer, batch_size=4), PAIRS)
    for (a, _), (b, _) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-3)
