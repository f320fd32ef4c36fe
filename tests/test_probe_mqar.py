"""scripts/probe_mqar.py: accuracy split by the queried key's prefix pair, and reading a saved Table-6 run."""
from __future__ import annotations

import torch
from torch import nn

from pararnn_lm.eval.synthetic.tasks import mqar
from pararnn_lm.eval.synthetic.train import SeedRun, SyntheticTrainConfig, run_identity
from repo_scripts import load_script

probe_mqar = load_script("scripts/probe_mqar.py")
accuracy_by_pair, load_saved_run = probe_mqar.accuracy_by_pair, probe_mqar.load_saved_run


class AnswersSomePairs(nn.Module):
    """Right (from the prefix, by a plain loop) exactly on the queries of the chosen pairs, wrong elsewhere."""

    def __init__(self, pairs: int, answered: set[int], vocab: int = 128) -> None:
        super().__init__()
        self.pairs, self.answered, self.vocab = pairs, answered, vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., 0] = 1.0  # token 0 is a key, never a correct answer
        for r, row in enumerate(input_ids.tolist()):
            pair_of = {row[2 * m]: m for m in range(self.pairs)}
            for t in range(2 * self.pairs, len(row)):
                if pair_of.get(row[t]) in self.answered:
                    logits[r, t, row[2 * pair_of[row[t]] + 1]] = 2.0
        return logits


def test_accuracy_by_pair_counts_each_pair_apart():
    batch = mqar(50, 40, 128, num_pairs=5, seed=3)
    got = accuracy_by_pair(AnswersSomePairs(5, {0, 3}), batch, 5, chunk=16)
    assert got == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_load_saved_run_restores_the_best_weights(tmp_path):
    cfg = SyntheticTrainConfig(task="mqar", arch="transformer", seq_len=20, n_train=32, n_test=16, n_val=0,
                               batch_size=16, d_model=16, num_heads=2, task_kwargs={"num_pairs": 2})
    run = SeedRun(cfg, seed=1)
    best = {k: v.clone() for k, v in run.model.state_dict().items()}
    with torch.no_grad():  # the current weights move on; the best ones are what the probe must read
        for p in run.model.parameters():
            p.add_(0.5)
    run.best_state, run.best_val = best, 0.5
    torch.save({**run.state_dict(), "run_config": run_identity(cfg)}, tmp_path / "transformer__mqar__s1.pt")

    model, loaded_cfg = load_saved_run(str(tmp_path / "transformer__mqar__s1.pt"))
    assert (loaded_cfg.task, loaded_cfg.arch, loaded_cfg.task_kwargs) == ("mqar", "transformer", {"num_pairs": 2})
    run.model.load_state_dict(best)
    ids = mqar(4, 20, 128, num_pairs=2, seed=0).input_ids
    model.eval(), run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, run.model(ids).logits, rtol=0, atol=0)
