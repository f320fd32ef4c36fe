"""GPU checks of the synthetic trainer (pararnn_lm.synthetic) (skipped without CUDA): a CUDA-graph step equals the eager step,
and runs advanced concurrently on their own streams give the same results as one after another."""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.synthetic.config import SyntheticTrainConfig
from pararnn_lm.synthetic.devices import train_runs, train_runs_on_devices
from pararnn_lm.synthetic.run import SeedRun

pytestmark = pytest.mark.gpu
SMALL = dict(seq_len=40, n_train=64, n_test=256, n_val=64, batch_size=16, lr=3e-3, max_steps=12,
             d_model=32, num_heads=4, progress=False, device="cuda")


@pytest.mark.parametrize("arch,task", [("paragru", "parity"), ("paralstm", "keep_nth"),
                                       ("mamba2", "mqar"), ("transformer", "hop1")])
def test_graphed_steps_equal_eager_steps(arch, task):
    runs = {}
    for graphed in (False, True):
        run = SeedRun(SyntheticTrainConfig(task=task, arch=arch, cuda_graph=graphed, **SMALL), seed=0)
        for _ in range(10):  # 3 eager warm-up steps, the capture, then replays across an epoch end
            run.advance()
        torch.cuda.synchronize()
        runs[graphed] = run
    assert runs[True].graph is not None, "capture failed (see the log): the run fell back to eager steps"
    assert runs[True].epoch == 2 and runs[False].epoch == 2  # 4 batches per epoch: val ran twice
    eager, graphed = runs[False].model.state_dict(), runs[True].model.state_dict()
    for name, ref in eager.items():
        torch.testing.assert_close(graphed[name], ref, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert runs[True].best_val == pytest.approx(runs[False].best_val, abs=1 / 64)
    # the learning curve's mean training loss counts the warm-up, capture and replayed steps alike
    losses = {g: [h["train_loss"] for h in runs[g].val_history] for g in runs}
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


def test_concurrent_runs_match_sequential_runs():
    jobs = [(SyntheticTrainConfig(task=t, arch=a, **SMALL), s)
            for a, t in (("paragru", "hop2"), ("transformer", "keep_nth")) for s in (0, 1)]
    one_by_one = train_runs(jobs, concurrent_runs=1, progress=False)
    together = train_runs(jobs, concurrent_runs=4, progress=False)
    assert [r["steps"] for r in together] == [12] * 4 and all(r["cuda_graph"] for r in together)
    for a, b in zip(one_by_one, together):
        assert a["seed"] == b["seed"] and a["test_acc"] == pytest.approx(b["test_acc"], abs=2 / 256)


def test_graphed_run_resumes_exactly(tmp_path):
    cfg = SyntheticTrainConfig(task="parity", arch="paragru", **{**SMALL, "max_steps": None, "max_epochs": 40})
    whole = train_runs([(cfg, 0)], progress=False)[0]
    part = train_runs([(cfg, 0)], time_budget_s=0.0, progress=False, state_dir=tmp_path)[0]
    assert part["stopped"] == "time budget" and part["steps"] == 64 and part["cuda_graph"]
    rest = train_runs([(cfg, 0)], progress=False, state_dir=tmp_path, resume=True)[0]
    assert (rest["steps"], rest["cuda_graph"]) == (160, True)
    # the resumed run re-captures after 3 eager steps: same ops, so the same trajectory
    assert rest["final_train_loss"] == pytest.approx(whole["final_train_loss"], rel=1e-5, abs=1e-6)
    assert rest["best_val_acc"] == pytest.approx(whole["best_val_acc"], abs=1 / 64)
    assert [h["train_loss"] for h in rest["val_history"]] == pytest.approx(
        [h["train_loss"] for h in whole["val_history"]], rel=1e-5, abs=1e-5)


def test_graphed_curriculum_recaptures_per_length_and_equals_eager():
    """Each curriculum stage has its own shapes: the graph is dropped at a stage boundary and captured
    again after the warm-up steps; the trajectory still equals the eager one."""
    cfg = dict(SMALL, max_steps=8, curriculum=((12, 6), (20, 6)))
    runs = {}
    for graphed in (False, True):
        run = SeedRun(SyntheticTrainConfig(task="keep_nth", arch="paragru", cuda_graph=graphed, **cfg), seed=0)
        lengths = []
        while not run.done:
            run.advance()
            lengths.append(run.train.input_ids.shape[1])
        torch.cuda.synchronize()
        runs[graphed] = run
        assert lengths == [12] * 6 + [20] * 6 + [40] * 8
    assert runs[True].graph is not None and runs[True].static_ids.shape == (16, 40)  # the main stage's capture
    eager, graphed = runs[False].model.state_dict(), runs[True].model.state_dict()
    for name, ref in eager.items():
        torch.testing.assert_close(graphed[name], ref, atol=5e-5, rtol=2e-4, msg=lambda m: f"{name}: {m}")
    assert [h["train_seq_len"] for h in runs[True].val_history] == [h["train_seq_len"] for h in runs[False].val_history]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_runs_spread_over_two_gpus_match_one_gpu(tmp_path):
    jobs = [(SyntheticTrainConfig(task=t, arch=a, **SMALL), s)
            for a, t in (("paragru", "hop2"), ("mamba2", "keep_nth")) for s in (0, 1)]
    one_gpu = train_runs(jobs, concurrent_runs=4, progress=False)
    two_gpus = train_runs_on_devices(jobs, devices=("cuda:0", "cuda:1"), concurrent_runs=2, progress=False,
                                     state_dir=tmp_path)
    assert [r["seed"] for r in two_gpus] == [0, 1, 0, 1] and all(r["cuda_graph"] for r in two_gpus)
    for a, b in zip(one_gpu, two_gpus):
        assert b["steps"] == a["steps"] == 12
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=2 / 256)
        assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-4, abs=1e-5)
    assert len(list(tmp_path.glob("*.result.json"))) == 4
