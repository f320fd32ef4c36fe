#!/usr/bin/env python
"""Export a ParaRNN-LM model to a self-contained Hugging Face directory (and optionally push it).

    python scripts/export_hf.py SOURCE OUT [--tokenizer TOK] [--config config.json | --arch A --size S]
                                [--results results.json ...] [--data "SlimPajama ..."] [--tokens 10.5e9]
                                [--datasets cerebras/SlimPajama-627B] [--license apache-2.0] [--base-model user/repo]
                                [--dtype fp32|bf16]
                                [--push-to-hub user/repo [--private]] [--no-check] [--check-isolated]

SOURCE is an HF directory, a training checkpoint directory (``checkpoints/step_*``) or a DeepSpeed
checkpoint (ZeRO shards are consolidated). Weights are exported in fp32 (the training masters) unless
``--dtype bf16`` (half the size, for the hub). The export loads with
``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` with only torch + transformers
installed. Its README.md is a hub model card (``huggingface_hub.ModelCard``): license, datasets, base model,
the paper's arXiv id, and ``model-index`` evaluation results from ``--results`` files (``{metric: value}`` on
the validation split, and/or the JSON of ``python -m pararnn_lm.eval.lm_eval_tasks --out``). The library
behind it: ``pararnn_lm.models.export``.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from pararnn_lm.models import ParaRNNLMConfig, config_for, count_parameters
from pararnn_lm.models.export import (EXPORT_DTYPES, _probe_ids, export_model, load_in_isolated_process,
                                      load_source, push_to_hub)

log = logging.getLogger("export_hf")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="HF dir, training checkpoint dir (state.pt / deepspeed/), or DeepSpeed dir")
    ap.add_argument("out", help="export directory")
    ap.add_argument("--tokenizer", help="tokenizer name or directory (AutoTokenizer)")
    ap.add_argument("--config", help="config.json of the model (for raw checkpoints)")
    ap.add_argument("--arch", help="preset architecture (for raw checkpoints without --config)")
    ap.add_argument("--size", help="preset size (for raw checkpoints without --config)")
    ap.add_argument("--vocab-size", type=int, help="vocab size with --arch/--size")
    ap.add_argument("--results", action="append", default=[],
                    help="JSON file for the model card's evaluation results: {metric: value} (validation split) "
                         "or lm-eval results (python -m pararnn_lm.eval.lm_eval_tasks --out); repeatable")
    ap.add_argument("--data", help="training data description for the model card")
    ap.add_argument("--datasets", nargs="*", default=[], help="hub ids of the training datasets (model card)")
    ap.add_argument("--license", default="apache-2.0", help="license of the model (model card; default apache-2.0)")
    ap.add_argument("--base-model", help="hub id of the model training started from (model card)")
    ap.add_argument("--tokens", type=float, help="training tokens for the model card")
    ap.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="fp32",
                    help="dtype of the exported weights (default fp32; bf16 halves the size)")
    ap.add_argument("--push-to-hub", metavar="REPO", help="upload the export to this hub repository")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the reload-and-compare check")
    ap.add_argument("--check-isolated", action="store_true",
                    help="also load the export in a subprocess that cannot import pararnn_lm")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    config = None
    if args.config:
        config = ParaRNNLMConfig.from_json_file(args.config)
    elif args.arch and args.size:
        config = config_for(args.arch, args.size, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    model = load_source(args.source, config)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    results = {}
    for path in args.results:
        results.update(json.loads(Path(path).read_text()))
    out = export_model(model, args.out, tokenizer, data=args.data, datasets=args.datasets, tokens=args.tokens,
                       results=results, license=args.license, base_model=args.base_model,
                       repo_id=args.push_to_hub, check=not args.no_check, dtype=args.dtype)
    if args.check_isolated:
        ids = _probe_ids(model.config)
        got = load_in_isolated_process(out, ids, cwd=Path(out).resolve().parent)
        with torch.no_grad():
            diff = (torch.tensor(got["logits"]) - model(ids).logits.float()).abs().max().item()
        log.info("isolated load (engine=%s): max |logit diff| = %.2g", got["engine"], diff)
        if diff > 1e-4:
            raise SystemExit(f"isolated export differs: {diff}")
    log.info("exported %s (%s parameters)", out, f"{count_parameters(model.config):,}")
    if args.push_to_hub:
        push_to_hub(out, args.push_to_hub, private=args.private)


if __name__ == "__main__":
    main()
