"""Report of the offline quality runs (a reduced Table 5 of arXiv 2510.21450): perplexity on the validation
and test splits of the offline corpus, overall and per source, and one figure of the training curves.

    python scripts/offline_lm_report.py runs/offline_25m_* --out runs/offline_report

For every run folder: its exported model (``export/``, written when training ends) is evaluated on each
source's token range of the corpus it trained on (``data.path`` of its config.yaml, or ``--corpus``), in
windows of the run's ``data.seq_len`` with documents separated as in training. A split's overall perplexity
is token-weighted over its sources. ``metrics.jsonl`` gives the curves: training and validation loss, and
the Newton iterations of every ParaRNN layer (``newton/iters/<layer>``).

Writes OUT/report.md (the tables), OUT/report.json (the numbers) and OUT/curves.png. A run without an export
(stopped before its end) appears in the curves and in the table of validation losses by step only.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from pararnn_lm.data.offline import read_manifest, source_token_ranges, unpack_offline_corpus
from pararnn_lm.data.prepare import TokenShards
from pararnn_lm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from pararnn_lm.eval.perplexity import evaluate_stream
from pararnn_lm.eval.plotting import save_figure

logger = logging.getLogger("offline_lm_report")

EVAL_SPLITS = ("validation", "test")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def evaluate_run(run_dir: Path, corpus: Optional[Path], cache_dir: str, *, batch_size: int, device: str,
                 max_tokens: Optional[int]) -> dict[str, Any]:
    """Perplexities of one run's export on every evaluation split and source of its corpus."""
    from pararnn_lm.models import ParaRNNLMForCausalLM

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    corpus = Path(corpus or config["data"]["path"])
    prepared = unpack_offline_corpus(corpus, cache_dir)
    manifest = read_manifest(prepared)
    tokenizer = load_tokenizer(str(prepared / "tokenizer"))
    export = run_dir / "export"
    if tokenizer_fingerprint(load_tokenizer(str(export))) != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{run_dir} was not trained with the tokenizer of {corpus}: its perplexities are not comparable")
    model = ParaRNNLMForCausalLM.from_pretrained(str(export), dtype=torch.float32).to(device).eval()
    seq_len = int(config["data"]["seq_len"])
    result: dict[str, Any] = {
        "run": run_dir.name, "arch": config["model"]["arch"], "size": config["model"]["size"],
        "parameters": sum(p.numel() for p in model.parameters()), "seq_len": seq_len, "corpus": str(corpus),
        "splits": {},
    }
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    result["train_steps"] = steps[-1] if steps else 0
    result["train_tokens"] = result["train_steps"] * int(config["train"]["global_batch_size"]) * seq_len
    for split in EVAL_SPLITS:
        shards = TokenShards(prepared / split, tokenizer=tokenizer)
        per_source, total_nll, total_tokens = {}, 0.0, 0
        for name, (lo, hi) in source_token_ranges(manifest, split, np.asarray(shards.doc_offsets)).items():
            if hi <= lo:
                continue
            stream = torch.from_numpy(shards.read(lo, hi if max_tokens is None else min(hi, lo + max_tokens)))
            logger.info("%s: %s %s (%d tokens)", run_dir.name, split, name, len(stream))
            acc = evaluate_stream(model, stream, seq_len=seq_len, batch_size=batch_size,
                                  eos_token_id=tokenizer.eos_token_id, device=device)
            per_source[name] = {"perplexity": acc.perplexity, "nll": acc.mean_nll, "tokens": acc.total_tokens}
            total_nll += acc.total_nll
            total_tokens += acc.total_tokens
        result["splits"][split] = {"perplexity": math.exp(total_nll / total_tokens), "nll": total_nll / total_tokens,
                                   "tokens": total_tokens, "sources": per_source}
    return result


def markdown_tables(results: list[dict[str, Any]]) -> str:
    sources = list(dict.fromkeys(s for r in results for split in EVAL_SPLITS for s in r["splits"][split]["sources"]))
    lines = []
    for split in EVAL_SPLITS:
        lines += [f"### {split} perplexity", "",
                  "| run | arch | params | train tokens | overall | " + " | ".join(sources) + " |",
                  "|---|---|---|---|---|" + "---|" * len(sources)]
        for r in results:
            cells = [f"{r['splits'][split]['sources'][s]['perplexity']:.2f}" if s in r["splits"][split]["sources"] else "-"
                     for s in sources]
            lines.append(f"| {r['run']} | {r['arch']} | {r['parameters'] / 1e6:.1f}M | {r['train_tokens']:,} | "
                         f"{r['splits'][split]['perplexity']:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    for split in EVAL_SPLITS:
        tokens = {s: entry["tokens"] for s, entry in results[0]["splits"][split]["sources"].items()}
        lines.append(f"Scored {split} tokens per source: " + ", ".join(f"{s} {n:,}" for s, n in tokens.items()) + ".")
    return "\n".join(lines) + "\n"


def validation_by_step(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Validation loss (and perplexity) of every run at every evaluated step, from ``metrics.jsonl``: the runs
    compared at equal training tokens, including a run stopped before its end (no export to evaluate)."""
    val = {name: {r["step"]: r["val_loss"] for r in records if "val_loss" in r} for name, records in runs.items()}
    tokens = {r["step"]: r["tokens"] for records in runs.values() for r in records if "tokens" in r}
    steps = sorted({step for by_step in val.values() for step in by_step})
    lines = ["### validation loss during training (perplexity), from metrics.jsonl", "",
             "| step | train tokens | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for step in steps:
        cells = [f"{val[name][step]:.4f} ({math.exp(val[name][step]):.2f})" if step in val[name] else "-" for name in runs]
        lines.append(f"| {step} | {tokens.get(step, float('nan')):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One figure: training (solid) and validation (dashed) loss per run; Newton iterations per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_newton) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, records) in enumerate(runs.items()):
        color = colors[index % len(colors)]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            ax_loss.plot(*zip(*train), color=color, label=f"{name} train")
        if val:
            ax_loss.plot(*zip(*val), color=color, linestyle="--", marker="o", markersize=3, label=f"{name} validation")
        layers = sorted({int(k.rsplit("/", 1)[1]) for r in records for k in r if k.startswith("newton/iters/")})
        for layer in layers:
            points = [(r["step"], r[f"newton/iters/{layer}"]) for r in records if f"newton/iters/{layer}" in r]
            ax_newton.plot(*zip(*points), color=color, alpha=0.35 + 0.65 * (layer + 1) / len(layers),
                           label=f"{name}" if layer == layers[-1] else None)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend(fontsize=7)
    ax_newton.set(xlabel="step", ylabel="Newton iterations", title="Newton iterations per layer (darker: deeper)")
    if ax_newton.lines:
        ax_newton.legend(fontsize=7)
    else:
        ax_newton.text(0.5, 0.5, "no ParaRNN runs", ha="center", va="center", transform=ax_newton.transAxes)
    return save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with config.yaml, metrics.jsonl, export/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, default=None, help="the packed corpus (default: data.path of each run)")
    parser.add_argument("--cache-dir", default="~/.cache/pararnn_lm/data", help="where the corpus is unpacked")
    parser.add_argument("--batch-size", type=int, default=64, help="windows per forward pass")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens per source")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--evaluated", nargs="+", type=Path, default=[],
                        help="report.json files of earlier calls: their runs' perplexities are taken from there "
                             "instead of evaluating again (e.g. runs evaluated as each finished, rendered together)")
    args = parser.parse_args(argv)
    evaluated = {r["run"]: r for path in args.evaluated for r in json.loads(path.read_text())}
    finished = [run for run in args.runs if run.name in evaluated or (run / "export").is_dir()]
    for run in sorted(set(args.runs) - set(finished)):
        logger.warning("%s has no export (stopped before its end): only its curves and validation losses are shown", run)
    results = [evaluated.get(run.name) or evaluate_run(run, args.corpus, args.cache_dir, batch_size=args.batch_size,
                                                       device=args.device, max_tokens=args.max_tokens)
               for run in finished]
    curves = {run.name: read_metrics(run) for run in args.runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text((markdown_tables(results) + "\n" if results else "") + validation_by_step(curves))
    (args.out / "report.json").write_text(json.dumps(results, indent=1))
    plot_curves(curves, args.out / "curves.png")
    logger.info("wrote %s\n%s", args.out, (args.out / "report.md").read_text())
    return {"results": results, "out": args.out}


if __name__ == "__main__":
    main()
