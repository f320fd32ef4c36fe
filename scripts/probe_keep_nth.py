"""Diagnostic: can a one-layer bare ParaGRU / ParaLSTM learn keep-nth at all, next to a dense GRU?

Table 6 (README) has our RNN columns at chance on keep-nth while the paper reports 100%. This probe
removes the budget question: a short sequence, a large training set, a higher learning rate, and a
``torch.nn.GRU`` (dense recurrent matrix, the same embedding -> RNN -> head shape) trained the same way.
The paper's cells have a DIAGONAL recurrence: with the bare mixer every channel is its own scalar
nonlinear system driven by the input, so holding the n-th token while ignoring the rest needs each
channel's gates to count and latch on their own. ``--gain-bound`` sets the recurrent-gain bound
(default: none; the paper's synthetic tasks use 0.9).

    python scripts/probe_keep_nth.py --arch paragru --seq-len 12 --steps 3000
    python scripts/probe_keep_nth.py --arch dense_gru --seq-len 12 --steps 3000
    python scripts/probe_keep_nth.py --arch paragru --train-size 0 --steps 6000   # fresh data every step
    python scripts/probe_keep_nth.py --arch paragru --seq-len 100 --train-size 0 --retain-gate-bias 3
    python scripts/probe_keep_nth.py --gradient-reach    # fp64, at init: how much gradient reaches token n
    python scripts/probe_keep_nth.py --train-size 0 --curriculum 12:20000 25:10000 50:8000 100:4000
    python scripts/probe_keep_nth.py --train-size 0 --curriculum 12:30000 100:10000 --schedule cosine \
        --device cuda --json curve.json     # on a GPU; every check (and the best) written as JSON
    python scripts/probe_keep_nth.py --plot curves.png a.json b.json   # accuracy at the final length vs step
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import torch
from torch import nn

from pararnn_lm.eval.synthetic.models import RNN_ARCHS, DenseGRULM, build_model, logits_of
from pararnn_lm.eval.synthetic.tasks import SyntheticBatch, keep_nth
from pararnn_lm.eval.synthetic.train import cosine_lr, masked_loss, parse_curriculum

log = logging.getLogger("probe_keep_nth")


def gradient_reach(arch: str, seq_len: int, n: int = 5, retain_gate_bias: float = 0.0, batch: int = 256,
                   seed: int = 0) -> float:
    """At init, in fp64: mean gradient norm of the last-position loss w.r.t. the n-th token's embedding,
    relative to the last token's. The signal a keep-nth model gets about the token it must keep."""
    torch.manual_seed(seed)
    model = build_model(arch, 128, bare_mixer=True, d_model=64, gain_bound=0.9,
                        retain_gate_bias=retain_gate_bias).double()
    data = keep_nth(batch, seq_len, 128, n, seed=seed + 1)
    x = model.get_input_embeddings()(data.input_ids).detach().requires_grad_(True)
    logits = logits_of(model(inputs_embeds=x))
    loss = nn.functional.cross_entropy(logits[data.loss_mask], data.targets[data.loss_mask])
    (g,) = torch.autograd.grad(loss, x)
    per_position = g.norm(dim=-1).mean(0)
    return (per_position[n - 1] / per_position[-1]).item()


def plot_curves(paths: list[str], out: str) -> None:
    """Test accuracy at each run's final length against training step, one line per --json file; the
    curriculum's stage boundaries of the first file are drawn as dotted lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, path in enumerate(paths):
        with open(path) as f:
            run = json.load(f)
        key = str(run["final_len"])
        steps = [c["step"] for c in run["checks"]]
        ax.plot(steps, [100 * c["accuracy"][key] for c in run["checks"]], lw=1.2,
                label=os.path.splitext(os.path.basename(path))[0])
        if i == 0:
            for c, nxt in zip(run["checks"], run["checks"][1:]):
                if nxt["seq_len"] != c["seq_len"]:
                    ax.axvline(nxt["step"], color="grey", ls=":", lw=0.8)
                    ax.text(nxt["step"], 1, f" L={nxt['seq_len']}", color="grey", fontsize=8)
    ax.set(xlabel="training step", ylabel="test accuracy at the final length (%)",
           title="keep-nth (n = 5, |V| = 128), one bare layer, d = 64")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    log.info("wrote %s", out)


def lr_factor(step: int, total: int, schedule: str, floor: float = 0.1) -> float:
    """Multiplier of --lr at ``step`` of ``total``: 1 (constant), or a cosine from 1 down to ``floor`` over the
    whole run, every curriculum stage included (the late, long stages train at a low rate)."""
    return 1.0 if schedule == "constant" else cosine_lr(step, total, 1.0, floor)


@torch.no_grad()
def _predict(model: nn.Module, input_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Argmax predictions at every position, ``chunk`` sequences per forward pass."""
    return torch.cat([logits_of(model(input_ids[i:i + chunk])).argmax(-1) for i in range(0, len(input_ids), chunk)])


@torch.no_grad()
def per_token_accuracy(model: nn.Module, last: SyntheticBatch, vocab: int, chunk: int = 2_000) -> list[float]:
    """Accuracy at the last position split by the token to keep (None for a token the test set never keeps):
    does the model keep every token equally well, or some tokens always and others never?"""
    pred = _predict(model, last.input_ids, chunk)[:, -1]
    target = last.targets[:, -1]
    hits = torch.zeros(vocab, device=pred.device).index_add_(0, target, (pred == target).float())
    seen = torch.bincount(target, minlength=vocab).float()
    return [None if n == 0 else h / n for h, n in zip(hits.tolist(), seen.tolist())]


@torch.no_grad()
def _accuracy(model: nn.Module, last: SyntheticBatch, dense: SyntheticBatch, chunk: int = 2_000) -> tuple[float, float]:
    """Accuracy at the last position and at every position after the n-th token (same inputs)."""
    pred = _predict(model, last.input_ids, chunk)
    return tuple((pred[b.loss_mask] == b.targets[b.loss_mask]).float().mean().item() for b in (last, dense))


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="paragru", choices=["paragru", "paralstm", "dense_gru"])
    p.add_argument("--seq-len", type=int, default=None, help="default 12")
    p.add_argument("--n", type=int, default=5, help="which token to keep (1-based)")
    p.add_argument("--steps", type=int, default=None, help="default 3000")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--gain-bound", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retain-gate-bias", type=float, default=0.0,
                   help="initial retention-gate bias (eval/synthetic/models.py: init_retain_gate; 0 = the paper's)")
    p.add_argument("--train-size", type=int, default=20_000,
                   help="training sequences sampled from; 0 = a fresh batch every step (nothing to memorise)")
    p.add_argument("--dense", action="store_true",
                   help="train on every position after the n-th token (the test still reports the last position)")
    p.add_argument("--curriculum", nargs="+", default=None, metavar="L:STEPS",
                   help="train in stages of growing length (e.g. 12:20000 25:10000 100:4000) instead of "
                        "--seq-len/--steps; every check also reports the last stage's length")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate over the whole run: constant, or a cosine from --lr to --lr/10")
    p.add_argument("--test-size", type=int, default=2_000, help="test sequences per length (+-0.9%% at 2,000)")
    p.add_argument("--log-every", type=int, default=500, help="steps between test checks")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop after this many minutes (with a last check), e.g. to fit a GPU lease")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the arguments, every check and the best accuracy at the final length as JSON")
    p.add_argument("--save", default=None, metavar="PATH", help="save the final weights (torch.save) for analysis")
    p.add_argument("--plot", nargs="+", default=None, metavar=("OUT.png", "RUN.json"),
                   help="no training: draw the --json files given after OUT.png (accuracy against step)")
    p.add_argument("--gradient-reach", action="store_true",
                   help="print gradient_reach for both cells, L = 12..100 and retention biases 0, 2, 3, 4; no training")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.plot:
        if len(a.plot) < 2:
            raise SystemExit("--plot takes OUT.png and then at least one --json file")
        plot_curves(a.plot[1:], a.plot[0])
        return 0.0
    if a.gradient_reach:
        biases = (0.0, 2.0, 3.0, 4.0)
        log.info("gradient at token %d / at the last token, at init (fp64); columns: retention-gate bias %s",
                 a.n, ", ".join(f"{b:g}" for b in biases))
        for arch in RNN_ARCHS:
            for seq_len in (12, 25, 50, 100):
                ratios = [gradient_reach(arch, seq_len, a.n, b, seed=a.seed) for b in biases]
                log.info("%-8s L=%3d  %s", arch, seq_len, "  ".join(f"{r:8.1e}" for r in ratios))
        return 0.0
    if a.curriculum and (a.seq_len or a.steps):
        raise SystemExit("--curriculum sets the lengths and steps: drop --seq-len / --steps")
    try:
        stages = list(parse_curriculum(a.curriculum)) if a.curriculum else [(a.seq_len or 12, a.steps or 3000)]
    except ValueError as err:
        raise SystemExit(f"--curriculum: {err}") from None
    final_len = stages[-1][0]
    if a.gain_bound is None and a.arch != "dense_gru" and final_len >= 64:
        log.warning("unbounded recurrent gains at L = %d: once they grow, Newton may not converge and the layer "
                    "falls back to its slow sequential path; the paper's synthetic runs use --gain-bound 0.9",
                    final_len)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    vocab, d = 128, 64
    if a.arch == "dense_gru":
        model = DenseGRULM(vocab, d)
    else:
        model = build_model(a.arch, vocab, bare_mixer=True, d_model=d, gain_bound=a.gain_bound,
                            retain_gate_bias=a.retain_gate_bias)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-6)
    total = sum(steps for _, steps in stages)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, a.schedule))
    # scored at the last position (Table 6); the dense set has the same inputs, scored after the n-th token
    tests = {L: tuple(keep_nth(a.test_size, L, vocab, a.n, seed=a.seed + 2, dense=dense).to(device)
                      for dense in (False, True))
             for L in dict.fromkeys(L for L, _ in stages)}
    t0, acc, done = time.time(), 0.0, 0
    checks: list[dict] = []
    best = {"accuracy": -1.0, "step": None}
    deadline = t0 + 60 * a.time_budget_min if a.time_budget_min is not None else math.inf
    stopped_at = None
    for seq_len, steps in stages:
        if stopped_at is not None:
            break
        train = (keep_nth(a.train_size, seq_len, vocab, a.n, seed=a.seed + 1, dense=a.dense).to(device)
                 if a.train_size else None)
        shown = [seq_len] + ([final_len] if final_len != seq_len else [])
        for step in range(steps):
            if train is None:  # fresh sequences (seeds far from the test split's)
                batch = keep_nth(a.batch_size, seq_len, vocab, a.n, seed=10_000_000 + a.seed * 1_000_000 + done + step,
                                 dense=a.dense).to(device)
            else:
                batch = train[torch.randint(0, len(train), (a.batch_size,), device=device)]
            loss = masked_loss(logits_of(model(batch.input_ids)), batch.targets)  # the trainer's loss, no host sync
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if stopped_at is None and time.time() > deadline:
                stopped_at = done + step
                log.warning("time budget of %g min spent: stopping at step %d of %d", a.time_budget_min, stopped_at, total)
            if step % a.log_every == 0 or step == steps - 1 or stopped_at is not None:
                parts, check = [], {"step": done + step, "seq_len": seq_len, "loss": loss.item(),
                                    "lr": opt.param_groups[0]["lr"], "accuracy": {}}
                for L in shown:
                    acc, acc_dense = _accuracy(model, *tests[L])
                    check["accuracy"][L] = acc
                    parts.append(f"test accuracy at L={L} {acc:.3f} (every position after the n-th: {acc_dense:.3f})")
                if acc > best["accuracy"]:  # acc is the final length's (last in ``shown``)
                    best = {"accuracy": acc, "step": done + step}
                checks.append(check)
                log.info("%s L=%d step %d train loss %.3f %s (%.0f s)", a.arch, seq_len, done + step, check["loss"],
                         "; ".join(parts), time.time() - t0)
            if stopped_at is not None:
                break
        done += steps
    log.info("best test accuracy at L=%d: %.3f (step %s); final %.3f", final_len, best["accuracy"], best["step"], acc)
    per_token = per_token_accuracy(model, tests[final_len][0], vocab)
    kept = torch.tensor([x for x in per_token if x is not None])
    log.info("final accuracy per kept token at L=%d: %d of %d tokens >= 90%%, %d <= 10%% (quartiles %s)",
             final_len, int((kept >= 0.9).sum()), len(kept), int((kept <= 0.1).sum()),
             " / ".join(f"{q:.2f}" for q in kept.quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()))
    if a.save:
        torch.save({"model": model.state_dict(), "args": vars(a)}, a.save)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "final_len": final_len, "final_accuracy": acc, "best": best,
                       "stopped_at_step": stopped_at, "per_token_accuracy": per_token, "checks": checks,
                       "seconds": time.time() - t0}, f, indent=1)
    return acc


if __name__ == "__main__":
    main()
