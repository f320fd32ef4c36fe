"""Token-weighted perplexity over a held-out token stream, correct across packed documents.

Conventions
* A *stream* is a 1-D token tensor in which every document ends with ``eos_token_id`` (the usual packing).
* The stream is cut into windows of ``seq_len`` tokens. Inside a window, ``position_ids`` restart at 0 at
  the window start and right after every EOS; a model that honours ``position_ids`` (our models reset
  their state / attention at position 0, transformers' packed-sequence masks do the same) therefore sees
  each document on its own.
* Token t+1 is predicted from the logits at t. A prediction is scored iff its label is not
  ``IGNORE_INDEX`` and the predicted token does NOT start a new document (its position id is not 0):
  the first token of a document has no in-document context, and is not scored in an unpacked evaluation
  either. Hence packed == unpacked (tested).
* Perplexity = exp(sum NLL / number of scored tokens): token-weighted over the whole stream, not an average
  of per-window perplexities.
* Loss by position: mean NLL of the tokens predicted with ``p`` tokens of in-document context (p = the
  predicted token's position id), for p = 1 .. seq_len-1. Evaluating with ``seq_len`` beyond the
  training length shows whether the model extrapolates (the curve keeps falling or stays flat) or breaks.

Library API (also for the training loop): :func:`token_nll`, :class:`NLLAccumulator`,
:func:`evaluate_batches`, :func:`evaluate_stream`, :func:`plot_loss_by_position`.
CLI on an exported HF directory:
    python -m pararnn_lm.eval.perplexity --model DIR --data held_out.jsonl --seq-len 4096 --train-len 2048 \
        --out ppl.json --plot ppl.png
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .plotting import save_figure

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def position_ids_from_eos(input_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """(B, T) position ids restarting at 0 at column 0 and after every EOS token."""
    B, T = input_ids.shape
    ar = torch.arange(T, device=input_ids.device).expand(B, T)
    if eos_token_id is None:
        return ar.clone()
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_token_id
    # index of the latest document start at or before t, then the offset from it
    last_start = torch.where(starts, ar, torch.zeros_like(ar)).cummax(dim=1).values
    return ar - last_start


@torch.no_grad()
def token_nll(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-prediction NLL (B, T-1), its scored mask (B, T-1) and its context length (B, T-1).

    ``labels`` default to ``input_ids`` (unshifted, HF convention; IGNORE_INDEX marks unscored tokens).
    """
    kwargs: dict[str, Any] = {}
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False  # no cache to build; transformers also only detects packing without one
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    logits = _logits(model(input_ids=input_ids, **kwargs))[:, :-1].float()
    target = (input_ids if labels is None else labels)[:, 1:]
    mask = target != IGNORE_INDEX
    if attention_mask is not None:
        mask &= attention_mask[:, 1:].bool()
    if position_ids is not None:
        ctx = position_ids[:, 1:]
        mask &= ctx != 0  # the next token opens a new document: nothing in its document predicts it
    else:
        ctx = torch.arange(1, input_ids.shape[1], device=input_ids.device).expand_as(target)
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    return nll.masked_fill(~mask, 0.0), mask, ctx


@dataclass
class NLLAccumulator:
    """Token-weighted NLL sums (float64) plus sums by context length."""

    max_positions: int = 0
    total_nll: float = 0.0
    total_tokens: int = 0
    by_pos_nll: list[float] = field(default_factory=list)
    by_pos_count: list[int] = field(default_factory=list)

    def add(self, nll: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor) -> None:
        nll, mask, ctx = nll.double()[mask], mask[mask], ctx[mask].long()
        self.total_nll += float(nll.sum())
        self.total_tokens += int(mask.numel())
        if ctx.numel():
            n = max(int(ctx.max()) + 1, len(self.by_pos_nll))
            s = torch.zeros(n, dtype=torch.float64).index_add_(0, ctx.cpu(), nll.cpu())
            c = torch.zeros(n, dtype=torch.long).index_add_(0, ctx.cpu(), torch.ones_like(ctx.cpu()))
            s[: len(self.by_pos_nll)] += torch.tensor(self.by_pos_nll, dtype=torch.float64)
            c[: len(self.by_pos_count)] += torch.tensor(self.by_pos_count, dtype=torch.long)
            self.by_pos_nll, self.by_pos_count = s.tolist(), c.tolist()

    @property
    def mean_nll(self) -> float:
        return self.total_nll / max(self.total_tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.total_tokens else float("nan")

    def loss_by_position(self) -> list[float | None]:
        return [s / c if c else None for s, c in zip(self.by_pos_nll, self.by_pos_count)]

    def result(self, **meta: Any) -> dict[str, Any]:
        return {"kind": "perplexity", "perplexity": self.perplexity, "nll": self.mean_nll, "tokens": self.total_tokens,
                "loss_by_position": self.loss_by_position(), "count_by_position": self.by_pos_count,
                "meta": meta}


def evaluate_batches(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                     device: torch.device | str | None = None) -> NLLAccumulator:
    """Accumulate over batches of ``{"input_ids", ["labels"], ["position_ids"], ["attention_mask"]}``
    (e.g. the training loop's validation loader)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    acc = NLLAccumulator()
    for b in batches:
        b = {k: v.to(device) for k, v in b.items() if v is not None}
        acc.add(*token_nll(model, b["input_ids"], b.get("labels"), b.get("position_ids"), b.get("attention_mask")))
    model.train(was_training)
    return acc


def _windows(stream: torch.Tensor, seq_len: int, batch_size: int, pad_id: int,
             eos_token_id: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """Non-overlapping packed windows in batches of one shape, (batch_size, seq_len): the tail window is
    right-padded and the last batch filled with padding rows, their labels IGNORE_INDEX. One shape means
    one compilation / autotuning pass for the whole stream instead of one per ragged batch; right padding
    never changes an earlier position of a causal model."""
    n = stream.numel()
    n_windows = n // seq_len + (n % seq_len > 1)  # a 1-token tail predicts nothing
    for first in range(0, n_windows, batch_size):
        ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
        for row, w in enumerate(range(first, min(first + batch_size, n_windows))):
            piece = stream[w * seq_len : (w + 1) * seq_len]
            ids[row, : piece.numel()] = piece
            labels[row, : piece.numel()] = piece
        yield {"input_ids": ids, "labels": labels, "position_ids": position_ids_from_eos(ids, eos_token_id)}


def split_documents(stream: torch.Tensor, eos_token_id: int | None) -> list[torch.Tensor]:
    """Documents of a stream, each keeping its trailing EOS."""
    if eos_token_id is None:
        return [stream]
    ends = (stream == eos_token_id).nonzero().flatten().tolist()
    docs, start = [], 0
    for e in ends:
        docs.append(stream[start : e + 1])
        start = e + 1
    if start < stream.numel():
        docs.append(stream[start:])
    return [d for d in docs if d.numel()]


def _per_document_batches(stream: torch.Tensor, seq_len: int, batch_size: int, eos_token_id: int | None,
                          pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Unpacked reference: each document alone (chunked at seq_len), right-padded, no position ids."""
    pieces = [d[i : i + seq_len] for d in split_documents(stream, eos_token_id) for i in range(0, d.numel(), seq_len)]
    pieces = [p for p in pieces if p.numel() > 1]
    for i in range(0, len(pieces), batch_size):
        group = pieces[i : i + batch_size]
        T = max(p.numel() for p in group)
        ids = torch.full((len(group), T), pad_id, dtype=torch.long)
        labels = torch.full((len(group), T), IGNORE_INDEX, dtype=torch.long)
        for r, p in enumerate(group):
            ids[r, : p.numel()] = p
            labels[r, : p.numel()] = p
        # Right padding never affects earlier positions of a causal model; padded labels are ignored.
        yield {"input_ids": ids, "labels": labels}


def evaluate_stream(model: nn.Module, stream: torch.Tensor, *, seq_len: int, batch_size: int = 8,
                    eos_token_id: int | None = None, packed: bool = True, pad_id: int = 0,
                    max_tokens: int | None = None, device: torch.device | str | None = None,
                    progress: bool = False) -> NLLAccumulator:
    """Perplexity of ``model`` on ``stream`` (see module doc). ``packed=False`` evaluates each document
    separately - slower, but correct for models that ignore ``position_ids``."""
    stream = stream.flatten().long()
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if packed:
        batches: Iterable[dict[str, torch.Tensor]] = _windows(stream, seq_len, batch_size, pad_id, eos_token_id)
    else:
        batches = _per_document_batches(stream, seq_len, batch_size, eos_token_id, pad_id)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    return evaluate_batches(model, batches, device)


def plot_loss_by_position(curves: dict[str, Sequence[float | None]], path: str | Path,
                          train_len: int | None = None, bins: int = 64) -> Path:
    """Mean NLL vs context length (log-spaced bins), one curve per model; a line marks the training length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in curves.items():
        pts = [(p, v) for p, v in enumerate(curve) if v is not None and p > 0]
        if not pts:
            continue
        edges = sorted({int(round(x)) for x in torch.logspace(0, math.log10(pts[-1][0] + 1), bins).tolist()})
        xs, ys = [], []
        for lo, hi in zip(edges[:-1], edges[1:] + [pts[-1][0] + 1]):
            vals = [v for p, v in pts if lo <= p < hi]
            if vals:
                xs.append((lo + hi - 1) / 2)
                ys.append(sum(vals) / len(vals))
        ax.plot(xs, ys, label=name)
    if train_len:
        ax.axvline(train_len, color="k", linestyle="--", linewidth=1, label=f"training length {train_len}")
    ax.set_xscale("log")
    ax.set_xlabel("context length (tokens of the same document before the predicted one)")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title("Loss by position")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ CLI

def load_stream(path: str | Path, tokenizer: Any = None, text_field: str = "text", eos_token_id: int | None = None,
                max_docs: int | None = None) -> torch.Tensor:
    """Token stream from .npy / .bin (uint16 tokens, already packed with EOS), .jsonl (``text_field`` per
    line), or .txt (documents separated by blank lines); text is tokenized and EOS-terminated."""
    import numpy as np

    path = Path(path)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path).astype("int64"))
    if path.suffix == ".bin":
        return torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype("int64"))
    if tokenizer is None:
        raise ValueError("text data needs a tokenizer")
    if path.suffix == ".jsonl":
        docs = [json.loads(line)[text_field] for line in path.read_text().splitlines() if line.strip()]
    else:
        docs = [d.strip() for d in path.read_text().split("\n\n") if d.strip()]
    docs = docs[:max_docs] if max_docs else docs
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
    return torch.tensor(ids, dtype=torch.long)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported HF directory (trust_remote_code)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model)")
    p.add_argument("--data", required=True, help=".jsonl / .txt / .npy / .bin held-out data")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=2048, help="evaluation window (set > train length to test extrapolation)")
    p.add_argument("--train-len", type=int, default=None, help="training sequence length (marked on the plot)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--unpacked", action="store_true", help="evaluate each document separately")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--arch", default=None, help="recorded in the result (for eval.tables)")
    p.add_argument("--size", default=None, help="recorded in the result (for eval.tables)")
    p.add_argument("--out", default=None, help="result JSON")
    p.add_argument("--plot", default=None, help="loss-by-position PNG")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer or a.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(a.model, trust_remote_code=True, dtype=getattr(torch, a.dtype))
    model.to(a.device).eval()
    stream = load_stream(a.data, tok, a.text_field, max_docs=a.max_docs)
    acc = evaluate_stream(model, stream, seq_len=a.seq_len, batch_size=a.batch_size, eos_token_id=tok.eos_token_id,
                          packed=not a.unpacked, pad_id=tok.pad_token_id or 0, max_tokens=a.max_tokens,
                          device=a.device, progress=True)
    n_params = sum(p.numel() for p in model.parameters())
    res = acc.result(model=str(a.model), data=str(a.data), seq_len=a.seq_len, train_len=a.train_len,
                     packed=not a.unpacked, arch=a.arch, size=a.size, n_params=n_params)
    print(json.dumps({k: res[k] for k in ("perplexity", "nll", "tokens")}))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    if a.plot:
        plot_loss_by_position({a.arch or Path(a.model).name: res["loss_by_position"]}, a.plot, a.train_len)
    return res


if __name__ == "__main__":
    main()
