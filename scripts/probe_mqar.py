"""Diagnostic: does a one-layer model (full block, d=64) learn MQAR at all, and how fast?

Table 6 (README) has both RNN columns at chance on MQAR (8 pairs) after 207 epochs at the paper's
learning rate, while Mamba2 - the same block with a linear diagonal recurrence - reached 98.6% in one
seed of three. This probe shrinks the problem (fewer pairs, shorter sequences, CPU-sized) and reports
test accuracy next to training accuracy, so that "cannot represent it", "learns slowly" and "memorises
the training set" can be told apart. Cosine learning-rate decay over ``--steps`` from ``--lr``, AdamW,
batch 16, the paper's 10k training sequences by default.

    python scripts/probe_mqar.py --arch paragru --pairs 2 --seq-len 24 --steps 15000 --lr 3e-3
    python scripts/probe_mqar.py --arch mamba2 --pairs 2 --seq-len 24 --steps 15000 --lr 3e-3
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval.synthetic.models import ARCHS, build_model  # noqa: E402
from eval.synthetic.tasks import SyntheticBatch, make_splits  # noqa: E402
from eval.synthetic.train import evaluate, masked_loss  # noqa: E402

log = logging.getLogger("probe_mqar")


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="paragru", choices=list(ARCHS))
    p.add_argument("--pairs", type=int, default=2, help="key-value pairs per sequence (Table 6: 8)")
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--steps", type=int, default=15000)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (Table 6: 5e-4)")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--gain-bound", type=float, default=0.9, help="recurrent-gain bound (paper: 0.9)")
    p.add_argument("--evals", type=int, default=6, help="evaluations over the run")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(a.seed)
    splits = make_splits("mqar", seed=a.seed, seq_len=a.seq_len, n_train=a.n_train, n_test=2_000,
                         num_pairs=a.pairs)
    train = splits["train"]
    seen = train[torch.arange(min(2_000, len(train)))]  # training accuracy on sequences it trains on
    model = build_model(a.arch, 128, bare_mixer=False, gain_bound=a.gain_bound)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-6)
    g = torch.Generator().manual_seed(a.seed)
    t0, every = time.time(), max(a.steps // a.evals, 1)
    out: dict[str, float] = {}
    for step in range(1, a.steps + 1):
        batch: SyntheticBatch = train[torch.randint(0, len(train), (16,), generator=g)]
        loss = masked_loss(model(input_ids=batch.input_ids).logits, batch.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        if step % every == 0 or step == a.steps:
            model.eval()
            out = {"step": step, "loss": loss.item(), "train_acc": evaluate(model, seen),
                   "test_acc": evaluate(model, splits["test"])}
            model.train()
            log.info("%s pairs=%d L=%d step %d loss %.3f train accuracy %.3f test accuracy %.3f "
                     "(chance %.3f; %.0f s)", a.arch, a.pairs, a.seq_len, step, out["loss"], out["train_acc"],
                     out["test_acc"], 1 / 64, time.time() - t0)
    return out


if __name__ == "__main__":
    main()
