"""Short parity under one equal budget: the project's one-layer ParaGRU (the paper's bare mixer: the cell layer
without conv, gate or residual; pararnn_lm.eval.synthetic.models) solves it on CPU, Mamba2's bare mixer (a
linear recurrence) does not - the parity column of Table 6 (arXiv 2510.21450) in miniature.

Both architectures get the same run settings: the same step budget, the same learning-rate sweep and the
same seeds, each trained by the same grid (``run_grid``), scored as the paper does (best of the seeds).
Parity is scored at every position (running parity), so a model that gets only the first k prefixes of the
L = 16 bits right scores 0.5 + k / 32: under this budget Mamba2's best run scores ~0.58 (the first two or
three prefixes; ~0.63 after 6 epochs), every ParaGRU run 1.0 within its first epoch.
"""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.eval.synthetic.models import build_model
from pararnn_lm.synthetic.config import SyntheticTrainConfig
from pararnn_lm.synthetic.grid import run_grid
from pararnn_lm.synthetic.run import planned_steps

# L=16 has 65k distinct sequences, so 3k training sequences cannot be memorised: > 99 % means parity is
# computed. 188 steps per epoch; runs that reach 99 % validation accuracy stop at an epoch end.
BUDGET = SyntheticTrainConfig(task="parity", seeds=(0, 1, 2), seq_len=16, n_train=3000, n_test=2000, n_val=500,
                              batch_size=16, max_epochs=2, target_acc=0.99, d_model=64, num_heads=4, progress=False)
LEARNING_RATES = [1e-2, 3e-2]
SOLVED, UNSOLVED = 0.99, 0.7


@pytest.fixture
def one_thread():
    """A d=64 layer on 16 x 16 tokens is far too small for intra-op threads: on a busy CPU their
    synchronisation makes each step ~15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_parity_models_are_one_layer_bare_mixers():
    for arch in ("paragru", "mamba2"):
        config = build_model(arch, "parity").config
        assert config.bare_mixer and config.num_hidden_layers == 1, arch


def test_paragru_solves_short_parity_and_mamba2_does_not_under_equal_budgets(one_thread):
    sweep = run_grid(BUDGET, archs=("paragru", "mamba2"), tasks=("parity",), sweep={"lr": LEARNING_RATES})
    acc = {(v["overrides"]["lr"], r["arch"]): r["accuracy"] for v in sweep["variants"] for r in v["results"]}
    assert sorted(acc) == sorted((lr, arch) for lr in LEARNING_RATES for arch in ("paragru", "mamba2"))
    for cell in sweep["results"]:  # the budget really was equal: same seeds, at most the same steps
        assert [s["seed"] for s in cell["seeds"]] == list(BUDGET.seeds)
        assert all(s["steps"] <= planned_steps(BUDGET) for s in cell["seeds"])
    for lr in LEARNING_RATES:
        assert acc[lr, "paragru"] >= SOLVED, acc
        assert acc[lr, "mamba2"] <= UNSOLVED, acc
