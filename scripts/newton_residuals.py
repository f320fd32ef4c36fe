"""Newton's convergence inside a trained ParaRNN model (the question of the paper's Fig. 4, arXiv 2510.21450):
the scaled residual max_t |f(h_{t-1}, u_t) - h_t| / (1 + |h_t|) of every ParaGRU / ParaLSTM layer against
the Newton iteration, for several sequence lengths, on real text.

    python scripts/newton_residuals.py runs/offline_25m_paragru/export --corpus runs/offline_corpus \\
        --seq-lens 256 512 1024 2048 --out runs/newton_residuals

Each layer runs Newton over all T states (mode ``newton_torch``) on the inputs the trained model gives it,
from the initial guess h_t = f(0, u_t); fp64 by default, so the residual can fall to the 1e-12 tolerance and
the quadratic phase shows. Sequences are the first ``--batch-size`` x T tokens of the corpus's validation
split (documents packed; every layer restarts its state at a document start, as in training).

Writes OUT/newton_residuals.json (per layer and T: the residual before each update and after the last),
OUT/newton_residuals.md (iterations to the tolerance) and OUT/newton_residuals.png (one panel per layer).

    python scripts/newton_residuals.py --combine gru/newton_residuals.json lstm/newton_residuals.json --out OUT

draws several models' results in one figure, OUT/newton_residuals.png: a row per model, a panel per sequence
length, one curve per layer (darker: shallower).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from pararnn_lm.data.offline import unpack_offline_corpus
from pararnn_lm.data.prepare import TokenShards
from pararnn_lm.data.tokenizer import load_tokenizer
from pararnn_lm.eval.perplexity import position_ids_from_eos
from pararnn_lm.eval.plotting import save_figure
from pararnn_lm.kernels import NewtonConfig, ParaRNNLayer

logger = logging.getLogger("newton_residuals")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


@torch.no_grad()
def residual_histories(model: torch.nn.Module, tokens: torch.Tensor, seq_lens: Sequence[int], batch_size: int,
                       newton: NewtonConfig, eos_token_id: Optional[int] = None) -> dict[int, list[list[float]]]:
    """{T: [residual history of layer 0, layer 1, ...]} of one forward per T over ``batch_size`` rows."""
    layers = [m for m in model.modules() if isinstance(m, ParaRNNLayer)]
    if not layers:
        raise ValueError("the model has no ParaGRU / ParaLSTM layer")
    for layer in layers:
        layer.mode, layer.newton = "newton_torch", newton
    device = next(model.parameters()).device
    out = {}
    for seq_len in seq_lens:
        if tokens.numel() < batch_size * seq_len:
            raise ValueError(f"T={seq_len}: {batch_size} x {seq_len} tokens needed, the text has {tokens.numel()}")
        ids = tokens[: batch_size * seq_len].view(batch_size, seq_len).to(device)
        model(input_ids=ids, position_ids=position_ids_from_eos(ids, eos_token_id))
        out[seq_len] = [list(layer.last_stats.residuals) for layer in layers]
    return out


def markdown_table(histories: dict[int, list[list[float]]], tol: float) -> str:
    lengths = sorted(histories)
    lines = [f"Newton updates to reach the tolerance {tol:g} (initial residual in brackets)", "",
             "| layer | " + " | ".join(f"T={t}" for t in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for layer in range(len(histories[lengths[0]])):
        cells = []
        for t in lengths:
            history = histories[t][layer]
            reached = next((i for i, r in enumerate(history) if r <= tol), None)
            cells.append(f"{'-' if reached is None else reached} ({history[0]:.1e})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(histories: dict[int, list[list[float]]], tol: float, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(histories)
    n_layers = len(histories[lengths[0]])
    cols = min(n_layers, 5)
    rows = -(-n_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharey=True)
    floor = tol / 100  # an exact zero residual is drawn at the bottom of the axis
    for layer, ax in enumerate(axes.flat):
        if layer >= n_layers:
            ax.set_visible(False)
            continue
        for index, seq_len in enumerate(lengths):
            history = [max(r, floor) for r in histories[seq_len][layer]]
            ax.semilogy(range(len(history)), history, marker="o", markersize=3, color=f"C{index}", label=f"T={seq_len}")
        ax.axhline(tol, color="0.5", linestyle=":", linewidth=1)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("Newton iteration")
        if layer % cols == 0:
            ax.set_ylabel("scaled max residual")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def model_name(model: Path) -> str:
    """A model's name in titles: its run folder for an export (``runs/NAME/export``), else the folder's own."""
    return model.parent.name or model.name


def plot_models(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """One figure of several models' ``newton_residuals.json`` contents: rows = models, columns = T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({int(t) for result in results.values() for t in result["histories"]})
    fig, axes = plt.subplots(len(results), len(lengths), figsize=(3.2 * len(lengths), 2.8 * len(results)),
                             squeeze=False, sharey=True)
    for row, (name, result) in zip(axes, results.items()):
        tol = result["tolerance"]
        for ax, seq_len in zip(row, lengths):
            layers = result["histories"].get(str(seq_len), [])
            for layer, history in enumerate(layers):
                ax.semilogy(range(len(history)), [max(r, tol / 100) for r in history], marker="o", markersize=2,
                            color=plt.cm.viridis(layer / max(len(layers) - 1, 1)), linewidth=1)
            ax.axhline(tol, color="0.5", linestyle=":", linewidth=1)
            ax.set_title(f"{name}, T={seq_len}", fontsize=9)
            ax.set_xlabel("Newton iteration")
        row[0].set_ylabel("scaled max residual")
    fig.suptitle("Newton residual per layer (darker: shallower, yellow: deepest) against the iteration", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def combine(paths: Sequence[Path], out: Path) -> Path:
    results = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        name = model_name(Path(result["model"]))
        results[name if name not in results else f"{name} ({path})"] = result  # never drop a file
    out.mkdir(parents=True, exist_ok=True)
    return plot_models(results, out / "newton_residuals.png")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, nargs="?", help="an export of a ParaGRU / ParaLSTM model (config.json + weights)")
    parser.add_argument("--corpus", type=Path, help="the offline corpus (its validation split is read)")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="newton_residuals.json files of earlier runs: draw them in one figure, compute nothing")
    parser.add_argument("--cache-dir", default="~/.cache/pararnn_lm/data", help="where the corpus is unpacked")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp64")
    parser.add_argument("--max-iters", type=int, default=30, help="Newton updates at most (then the exact fallback)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.combine:
        path = combine(args.combine, args.out)
        logger.info("wrote %s", path)
        return {"out": args.out}
    if args.model is None or args.corpus is None:
        parser.error("a model export and --corpus are needed (or --combine with result files)")

    from pararnn_lm.models import ParaRNNLMForCausalLM

    prepared = unpack_offline_corpus(args.corpus, args.cache_dir)
    tokenizer = load_tokenizer(str(prepared / "tokenizer"))
    shards = TokenShards(prepared / "validation", tokenizer=tokenizer)
    tokens = torch.from_numpy(shards.read(0, min(shards.num_tokens, args.batch_size * max(args.seq_lens)))).long()
    dtype = DTYPES[args.dtype]
    model = ParaRNNLMForCausalLM.from_pretrained(str(args.model), dtype=dtype).to(args.device).eval()
    newton = NewtonConfig(max_iters=args.max_iters, on_failure="fallback")
    tol = newton.tolerance_for(dtype)
    histories = residual_histories(model, tokens, args.seq_lens, args.batch_size, newton, tokenizer.eos_token_id)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "newton_residuals.json").write_text(json.dumps(
        {"model": str(args.model), "dtype": args.dtype, "tolerance": tol, "batch_size": args.batch_size,
         "histories": {str(t): h for t, h in histories.items()}}, indent=1))
    (args.out / "newton_residuals.md").write_text(markdown_table(histories, tol))
    plot(histories, tol, f"Newton residual per layer, {model_name(args.model)} ({args.dtype})",
         args.out / "newton_residuals.png")
    logger.info("wrote %s\n%s", args.out, (args.out / "newton_residuals.md").read_text())
    return {"histories": histories, "tolerance": tol, "out": args.out}


if __name__ == "__main__":
    main()
