"""Diagnostic: does a one-layer model (full block, d=64) learn MQAR at all, and how fast?

Table 6 (README) has both RNN columns at chance on MQAR (8 pairs) after 207 epochs at the paper's
learning rate, while Mamba2 - the same block with a linear diagonal recurrence - reached 98.6% in one
seed of three. This probe shrinks the problem (fewer pairs, shorter sequences, CPU-sized) and reports
test accuracy next to training accuracy, so that "cannot represent it", "learns slowly" and "memorises
the training set" can be told apart. Cosine learning-rate decay over ``--steps`` from ``--lr``, AdamW,
batch 16, the paper's 10k training sequences by default.

    python scripts/probe_mqar.py --arch paragru --pairs 2 --seq-len 24 --steps 15000 --lr 3e-3
    python scripts/probe_mqar.py --arch mamba2 --pairs 2 --seq-len 24 --steps 15000 --lr 3e-3

``--state OUT/runs/ARCH__mqar__sSEED.pt`` instead reads a Table-6 run that ``eval.synthetic.train`` stopped
at its time budget (a finished run keeps only its result JSON) and reports its test accuracy by the pair
index of the queried key: flat for a model that binds keys to values, falling with the index for one that
answers from the prefix's layout.

    python scripts/probe_mqar.py --state runs/t6full/transformer/runs/transformer__mqar__s2.pt
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import torch

from pararnn_lm.eval.synthetic.models import ARCHS, build_model, logits_of
from pararnn_lm.eval.synthetic.tasks import TASKS, SyntheticBatch, make_splits, mqar, mqar_pair_index
from pararnn_lm.eval.synthetic.train import SyntheticTrainConfig, build_run_model, evaluate, masked_loss

log = logging.getLogger("probe_mqar")


def accuracy_by_pair(model: torch.nn.Module, batch: SyntheticBatch, num_pairs: int,
                     chunk: int = 1000) -> list[float]:
    """Test accuracy of an MQAR batch split by the queried key's pair index in the prefix."""
    index = mqar_pair_index(batch.input_ids, num_pairs)
    correct, total = torch.zeros(num_pairs), torch.zeros(num_pairs)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(batch), chunk):
            b, idx = batch[i : i + chunk], index[i : i + chunk]
            pred = logits_of(model(b.input_ids)).argmax(-1)
            total += torch.bincount(idx[b.loss_mask], minlength=num_pairs)
            correct += torch.bincount(idx[b.loss_mask & (pred == b.targets)], minlength=num_pairs)
    return (correct / total.clamp(min=1)).tolist()


def load_saved_run(path: str) -> tuple[torch.nn.Module, SyntheticTrainConfig]:
    """The best-validation weights of a run saved by the trainer at its time budget, in the model it trained."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = SyntheticTrainConfig(**state["run_config"])
    model = build_run_model(cfg)
    model.load_state_dict(state["best_state"] or state["model"])
    log.info("%s: %s/%s, epoch %d, best validation accuracy %.4f", path, cfg.arch, cfg.task, state["epoch"],
             state["best_val"])
    return model, cfg


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
    p.add_argument("--state", help="a saved Table-6 MQAR run (OUT/runs/KEY.pt): accuracy by pair index")
    p.add_argument("--n-test", type=int, default=20_000, help="with --state: fresh test sequences")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.state:
        model, cfg = load_saved_run(a.state)
        if cfg.task != "mqar":
            p.error(f"--state {a.state} is a {cfg.task} run; accuracy by pair index needs an MQAR run")
        pairs = cfg.task_kwargs.get("num_pairs", 8)
        test = mqar(a.n_test, cfg.seq_len, TASKS["mqar"].vocab_size, pairs, seed=987_654_321 + a.seed)  # seeds no split uses
        by_pair = accuracy_by_pair(model, test, pairs)
        log.info("test accuracy by the queried key's pair index (pair m sits at positions 2m, 2m+1), %d "
                 "sequences: %s; all: %.4f", a.n_test, " ".join(f"{m}:{acc:.3f}" for m, acc in enumerate(by_pair)),
                 evaluate(model, test))
        return {f"pair_{m}": acc for m, acc in enumerate(by_pair)}
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
