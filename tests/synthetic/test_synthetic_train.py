"""The synthetic-task trainer (pararnn_lm.synthetic): runs end to end with a tiny torch GRU (registered as an
arch) and writes JSON; resumed, interleaved and multi-process runs equal one uninterrupted run."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from pararnn_lm.eval.synthetic import models as synth_models
from pararnn_lm.eval.synthetic.results import variant_name
from pararnn_lm.eval.synthetic.tasks import IGNORE_INDEX, TASKS
from pararnn_lm.synthetic.cli import main
from pararnn_lm.synthetic.config import SyntheticTrainConfig, load_config, parse_sweep, sweep_variants
from pararnn_lm.synthetic.devices import resolve_devices, train_runs, train_runs_on_devices
from pararnn_lm.synthetic.grid import run_grid, run_task
from pararnn_lm.synthetic.run import SeedRun, accuracies, evaluate, masked_loss, planned_steps


class TinyGRULM(nn.Module):
    """A fast stand-in architecture: embedding -> ``torch.nn.GRU`` -> head (registered with register_arch)."""

    def __init__(self, vocab_size: int, d_model: int, **_) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.rnn = nn.GRU(d_model, d_model, batch_first=True)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(input_ids))[0])


@pytest.fixture
def tiny_gru():
    synth_models.register_arch("tinygru", TinyGRULM)
    yield "tinygru"
    synth_models.unregister_arch("tinygru")


def test_gru_learns_short_parity(tiny_gru, tmp_path):
    cfg = SyntheticTrainConfig(task="parity", arch=tiny_gru, seeds=(0,), seq_len=8, n_train=2000, n_test=2000,
                               n_val=500, batch_size=16, lr=1e-2, max_epochs=15, d_model=32, progress=False)
    res = run_task(cfg, out_dir=tmp_path)
    assert res["accuracy"] > 0.95, res
    saved = json.loads((tmp_path / "tinygru__parity.json").read_text())
    assert saved["accuracy"] == res["accuracy"] and saved["seeds"][0]["steps"] > 0


def test_grid_writes_table(tiny_gru, tmp_path):
    cfg = SyntheticTrainConfig(seeds=(0, 1), seq_len=40, n_train=64, n_test=64, n_val=32, max_epochs=1,
                               d_model=16, progress=False)
    grid = run_grid(cfg, archs=[tiny_gru], tasks=list(TASKS), out_dir=tmp_path)
    assert len(grid["results"]) == 5 and all(r["accuracy"] is not None for r in grid["results"])
    for r in grid["results"]:
        assert r["accuracy"] == max(s["test_acc"] for s in r["seeds"])  # best of seeds
    md = (tmp_path / "table6.md").read_text()
    assert "tinygru" in md and "MQAR" in md and "ParaGRU" in md  # ours beside the paper's rows


def test_evaluate_counts_only_scored_positions():
    class Oracle(nn.Module):  # predicts the target wherever it is scored, garbage elsewhere
        def __init__(self, batch):
            super().__init__()
            self.b = batch

        def forward(self, input_ids):
            t = self.b.targets.clamp_min(0)
            return nn.functional.one_hot(t, 10).float()

    b = TASKS["hop1"].generate(50, 40, seed=0)
    assert evaluate(Oracle(b), b, batch_size=50) == 1.0
    # the last-position accuracy counts the rows that score their last position
    wrong_last = b.targets.clone()
    wrong_last[::2, -1] = (wrong_last[::2, -1] + 1) % 10  # rows 0, 2, ...: the last prediction is wrong
    scored_last = b.loss_mask[:, -1]
    expect = 1 - int(scored_last[::2].sum()) / int(scored_last.sum())
    oracle = Oracle(b)
    oracle.b = dataclasses.replace(b, targets=wrong_last)
    acc, last = accuracies(oracle, b, batch_size=50)
    assert last == pytest.approx(expect) and acc == pytest.approx(1 - int(scored_last[::2].sum()) / int(b.loss_mask.sum()))
    class Constant(nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 128)

    assert accuracies(Constant(), TASKS["mqar"].generate(8, 40, seed=0))[1] is None  # MQAR never scores the end


def test_cli_single_task_and_config(tiny_gru, tmp_path, capsys):
    cfg = load_config("configs/synthetic/table6.yaml")
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.betas, cfg.seeds, cfg.d_model, cfg.num_heads) == (
        16, 5e-4, 1e-6, (0.9, 0.999), (0, 1, 2), 64, 4)
    assert (cfg.seq_len, cfg.n_train, cfg.n_test, cfg.max_epochs) == (100, 10_000, 100_000, 3000)
    res = main(["--task", "hop2", "--arch", tiny_gru, "--config", "configs/synthetic/quick.yaml", "--seeds", "3",
                "--seq-len", "30", "--n-train", "32", "--n-test", "32", "--n-val", "16", "--max-epochs", "1",
                "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    assert res["best_seed"] == 3 and res["config"]["seq_len"] == 30 and res["config"]["lr"] == 5e-4
    assert (tmp_path / "tinygru__hop2.json").exists() and '"accuracy"' in capsys.readouterr().out


def test_interleaved_runs_equal_one_after_another(tiny_gru):
    base = dict(arch=tiny_gru, seq_len=20, n_train=48, n_test=64, n_val=32, batch_size=16, max_epochs=2,
                d_model=16, progress=False)
    jobs = [(SyntheticTrainConfig(task=t, **base), s) for t in ("parity", "hop1") for s in (0, 1)]
    seq = train_runs(jobs, concurrent_runs=1, progress=False)
    inter = train_runs(jobs, concurrent_runs=3, progress=False)
    assert [r["seed"] for r in inter] == [0, 1, 0, 1] and all(r["steps"] == 6 for r in inter)
    assert [r["test_acc"] for r in inter] == [r["test_acc"] for r in seq]  # same ops, same order per run


def test_time_budget_reports_best_so_far_and_unstarted_runs(tiny_gru):
    cfg = SyntheticTrainConfig(task="parity", arch=tiny_gru, seq_len=20, n_train=64, n_test=64, n_val=32,
                               batch_size=16, max_epochs=10_000, d_model=16, progress=False)
    res = train_runs([(cfg, 0), (cfg, 1)], concurrent_runs=1, time_budget_s=0.0, progress=False)
    assert res[0]["stopped"] == "time budget" and 0 < res[0]["steps"] < 10_000 * 4
    assert res[0]["test_acc"] is not None and res[1] == {"seed": 1, "test_acc": None,
                                                         "error": "not started (time budget)"}


def test_stopped_runs_resume_exactly(tiny_gru, tmp_path):
    cfg = SyntheticTrainConfig(task="hop1", arch=tiny_gru, seq_len=20, n_train=48, n_test=64, n_val=32,
                               batch_size=16, max_epochs=40, d_model=16, progress=False)
    whole = train_runs([(cfg, 0), (cfg, 1)], progress=False)
    # budget 0: stops after the first 64 rounds (step 64 = epoch 21 + one batch), mid-epoch
    part = train_runs([(cfg, 0), (cfg, 1)], time_budget_s=0.0, progress=False, state_dir=tmp_path)
    assert part[0]["stopped"] == "time budget" and part[0]["steps"] == 64
    assert (tmp_path / "tinygru__hop1__s0.pt").exists() and part[1]["error"] == "not started (time budget)"
    rest = train_runs([(cfg, 0), (cfg, 1)], progress=False, state_dir=tmp_path, resume=True)
    for a, b in zip(whole, rest):
        assert (b["steps"], b["epochs"], b["stopped"]) == (120, 40, "budget")
        assert (b["test_acc"], b["best_val_acc"], b["final_train_loss"]) == (
            a["test_acc"], a["best_val_acc"], a["final_train_loss"])  # the same trajectory, bit for bit
        assert b["val_history"] == a["val_history"]  # incl. the epoch cut at the stop (loss sum carried over)
        assert [h["epoch"] for h in b["val_history"]] == list(range(1, 41))
        assert [h["step"] for h in b["val_history"]] == [3 * e for e in range(1, 41)]
        assert max(h["val_acc"] for h in b["val_history"]) == b["best_val_acc"]
    assert not (tmp_path / "tinygru__hop1__s0.pt").exists() and (tmp_path / "tinygru__hop1__s0.result.json").exists()
    again = train_runs([(cfg, 0)], progress=False, state_dir=tmp_path, resume=True)  # finished: read back
    assert again[0] == rest[0]


def test_resume_refuses_other_settings(tiny_gru, tmp_path):
    """A stopped or finished run continues only under the settings it started with; a clash is refused
    before anything trains and nothing saved is touched."""
    cfg = SyntheticTrainConfig(task="hop1", arch=tiny_gru, seq_len=20, n_train=48, n_test=64, n_val=32,
                               batch_size=16, max_epochs=40, d_model=16, progress=False)
    train_runs([(cfg, 0)], time_budget_s=0.0, progress=False, state_dir=tmp_path)
    saved = (tmp_path / "tinygru__hop1__s0.pt").read_bytes()
    other = dataclasses.replace(cfg, lr=1e-3)
    with pytest.raises(ValueError, match=r"tinygru__hop1__s0: lr saved 0.0005 now 0.001"):
        train_runs([(other, 0)], progress=False, state_dir=tmp_path, resume=True)
    assert (tmp_path / "tinygru__hop1__s0.pt").read_bytes() == saved
    # operational settings (device, concurrency, budget) may change between calls
    done = train_runs([(dataclasses.replace(cfg, concurrent_runs=4, eval_batch_size=7), 0)], progress=False,
                      state_dir=tmp_path, resume=True)[0]
    assert done["stopped"] == "budget" and "run_config" not in done
    with pytest.raises(ValueError, match="max_epochs saved 40 now 80"):  # finished runs are checked too
        train_runs([(dataclasses.replace(cfg, max_epochs=80), 0)], progress=False, state_dir=tmp_path, resume=True)


def test_result_files_record_the_model_and_task_options(tmp_path):
    """Every result file says which model and task options it trained (the paper's per-cell spec, updated by
    the run's model_kwargs / task_kwargs); --resume refuses a run saved under another model or none recorded."""
    from pararnn_lm.eval.synthetic.models import model_spec

    cfg = SyntheticTrainConfig(task="keep_nth", arch="paragru", seeds=(0,), seq_len=12, n_train=32, n_test=16,
                               n_val=16, max_epochs=1, d_model=8, num_heads=2, progress=False,
                               model_kwargs={"rnn_mode": "newton_torch"}, task_kwargs={"scoring": "last"})
    cell = run_task(cfg, out_dir=tmp_path)
    spec = json.loads(json.dumps(model_spec("paragru", "keep_nth", rnn_mode="newton_torch").as_dict()))
    assert spec["block"] == "bare" and spec["position_encoding"] == "sinusoidal" and spec["gain_bound"] == 0.9
    saved = json.loads((tmp_path / "paragru__keep_nth.json").read_text())
    assert saved["model_spec"] == cell["model_spec"] == spec
    assert saved["task_options"] == {"n": 5, "scoring": "last"}
    seed = saved["seeds"][0]
    assert saved["accuracy_last"] == seed["test_acc_last"] == seed["test_acc"]  # "last" scores the last position only
    run_file = tmp_path / "runs" / "paragru__keep_nth__s0.result.json"
    run_config = json.loads(run_file.read_text())["run_config"]
    assert run_config["model_spec"] == spec and run_config["task_options"] == saved["task_options"]
    with pytest.raises(ValueError, match="task_options saved"):  # another scoring is another run
        run_task(dataclasses.replace(cfg, task_kwargs={}, resume=True), out_dir=tmp_path)
    del run_config["model_spec"]  # a run saved before models were recorded: its model may not be today's
    run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "run_config": run_config}))
    with pytest.raises(ValueError, match="model_spec saved None"):
        run_task(dataclasses.replace(cfg, resume=True), out_dir=tmp_path)


def test_grid_of_chosen_cells(tiny_gru, tmp_path):
    """--cells trains exactly the named (arch, task) pairs in one grid; bad pairs fail before training."""
    args = ["--grid", "--seeds", "0", "--seq-len", "20", "--n-train", "32", "--n-test", "16", "--n-val", "16",
            "--max-epochs", "1", "--out", str(tmp_path), "--no-progress", "--device", "cpu"]
    grid = main(args + ["--cells", f"{tiny_gru}:hop1", f"{tiny_gru}:parity"])
    assert [(r["arch"], r["task"]) for r in grid["results"]] == [(tiny_gru, "hop1"), (tiny_gru, "parity")]
    assert sorted(p.name for p in tmp_path.glob(f"{tiny_gru}__*.json")) == [f"{tiny_gru}__hop1.json",
                                                                            f"{tiny_gru}__parity.json"]
    with pytest.raises(ValueError, match="unknown task"):
        main(args + ["--cells", f"{tiny_gru}:hop3"])
    with pytest.raises(SystemExit, match="not both"):
        main(args + ["--cells", f"{tiny_gru}:hop1", "--tasks", "hop1"])
    with pytest.raises(SystemExit, match="ARCH:TASK"):
        main(args + ["--cells", tiny_gru])


def test_cli_budget_then_resume(tiny_gru, tmp_path):
    args = ["--grid", "--archs", tiny_gru, "--tasks", "parity", "--seeds", "0", "1", "--seq-len", "20",
            "--n-train", "48", "--n-test", "32", "--n-val", "16", "--max-epochs", "40", "--concurrent-runs", "2",
            "--out", str(tmp_path), "--no-progress", "--device", "cpu"]
    first = main(args + ["--time-budget-min", "0"])
    assert [s["stopped"] for s in first["results"][0]["seeds"]] == ["time budget"] * 2
    assert len(list((tmp_path / "runs").glob("*.pt"))) == 2
    done = main(args + ["--resume"])
    assert [(s["stopped"], s["steps"]) for s in done["results"][0]["seeds"]] == [("budget", 120)] * 2
    assert (tmp_path / "table6.md").exists() and not list((tmp_path / "runs").glob("*.pt"))


@pytest.mark.parametrize("arch", ["paragru", "paralstm"])
@pytest.mark.parametrize("bias", [0.0, 3.0])
def test_retain_gate_bias_keeps_sigmoid_b_per_step(arch, bias):
    """With zero input and zero recurrent gains, a channel whose retention gate starts at ``bias``
    keeps exactly sigmoid(bias) of its state per step (ParaGRU: h_t = (1 - z) h_{t-1} with z =
    sigmoid(-bias), candidate tanh(0) = 0; ParaLSTM: c_t = f c_{t-1} with f = sigmoid(bias))."""
    torch.manual_seed(0)
    model = synth_models.build_model(arch, "keep_nth", d_model=8, num_heads=2, retain_gate_bias=bias)
    layers = [m for m in model.modules() if type(getattr(m, "cell", None)).__name__ in synth_models.RETAIN_GATE]
    assert len(layers) == 1
    layer = layers[0]
    row, sign = synth_models.RETAIN_GATE[type(layer.cell).__name__]
    assert torch.equal(layer.bias[row], torch.full((8,), sign * bias))
    others = [g for g in range(layer.bias.shape[0]) if g != row]
    assert torch.equal(layer.bias[others], torch.zeros(len(others), 8))  # the paper's zero init elsewhere
    T = 6
    with torch.no_grad():
        layer.recurrent.zero_()
        h0 = torch.ones(1, layer.state_size, 8, dtype=torch.float64)
        _, final = layer.double()(torch.zeros(1, T, 8, dtype=torch.float64), h0)
    kept = torch.sigmoid(torch.tensor(bias, dtype=torch.float64)) ** T
    torch.testing.assert_close(final[0, 0], torch.full((8,), float(kept), dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_retain_gate_bias_needs_a_recurrent_cell():
    model = synth_models.build_model("transformer", "hop1", d_model=8, num_heads=2)
    with pytest.raises(ValueError, match="no ParaGRU/ParaLSTM cell"):
        synth_models.init_retain_gate(model, 3.0)


def test_parse_sweep_types_and_refusals():
    sweep = parse_sweep(["lr=5e-4,1e-3", "d_model=16,32", "model_kwargs.gain_bound=none,0.9"])
    assert sweep == {"lr": [5e-4, 1e-3], "d_model": [16, 32], "model_kwargs.gain_bound": [None, 0.9]}
    assert isinstance(parse_sweep(["lr=1"])["lr"][0], float)  # a float field takes an integer literal as float
    variants = sweep_variants(sweep)
    assert len(variants) == 8 and variants[0] == {"lr": 5e-4, "d_model": 16, "model_kwargs.gain_bound": None}
    assert variant_name(variants[-1]) == "lr=0.001,d_model=32,model_kwargs.gain_bound=0.9"
    for bad, msg in [("lr", "FIELD=V1"), ("arch=a,b", "not a sweepable"), ("seeds=1,2", "not a sweepable"),
                     ("betas=1,2", "not a sweepable"), ("nonsense=1", "not a sweepable"),
                     ("d_model=16.5", "is not a int"), ("lr=fast", "is not a float"), ("lr=none", "none is not"),
                     ("lr=1e-3,1e-3", "repeated"), ("foo.bar=1", "dotted")]:
        with pytest.raises(ValueError, match=msg):
            parse_sweep([bad])
    with pytest.raises(ValueError, match="twice"):
        parse_sweep(["lr=1e-3", "lr=2e-3"])


def test_sweep_trains_each_setting_apart_and_equals_plain_runs(tiny_gru, tmp_path):
    """A sweep is the grid under each setting: one folder per setting, each equal to a plain grid run with
    that setting (same seeds, same steps), trained by one scheduler; resuming continues every setting."""
    args = ["--grid", "--archs", tiny_gru, "--tasks", "parity", "--seeds", "0", "--seq-len", "12",
            "--n-train", "48", "--n-test", "32", "--n-val", "16", "--max-epochs", "30", "--no-progress",
            "--device", "cpu", "--concurrent-runs", "2"]
    swept = main(args + ["--out", str(tmp_path / "sw"), "--sweep", "lr=1e-4,1e-3"])
    assert swept["kind"] == "synthetic_sweep" and [g["overrides"] for g in swept["variants"]] == [
        {"lr": 1e-4}, {"lr": 1e-3}]
    for lr, folder in [("0.0001", "lr=0.0001"), ("0.001", "lr=0.001")]:
        plain = main(args + ["--out", str(tmp_path / f"plain{lr}"), "--lr", lr])
        cell = json.loads((tmp_path / "sw" / folder / f"{tiny_gru}__parity.json").read_text())
        assert cell["config"]["lr"] == float(lr)
        ref = plain["results"][0]["seeds"][0]
        assert cell["seeds"][0]["test_acc"] == ref["test_acc"] and cell["seeds"][0]["final_train_loss"] == ref["final_train_loss"]
    a, b = (swept["variants"][i]["results"][0]["seeds"][0]["final_train_loss"] for i in (0, 1))
    assert a != b  # the two settings really trained differently
    md = (tmp_path / "sw" / "sweep.md").read_text()
    assert "lr=0.0001 | lr=0.001" in md and (tmp_path / "sw" / "sweep.png").stat().st_size > 0
    assert (tmp_path / "sw" / "sweep_curves.png").stat().st_size > 0  # one panel per setting
    assert (tmp_path / "sw" / "lr=0.001" / "curves.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="both as a flag"):
        main(args + ["--out", str(tmp_path / "x"), "--sweep", "lr=1e-4,1e-3", "--lr", "1e-3"])
    with pytest.raises(SystemExit, match="needs --grid"):
        main(["--task", "parity", "--sweep", "lr=1e-4,1e-3"])
    # a budgeted sweep resumes per setting; a folder keeps its own runs' settings
    first = main(args + ["--out", str(tmp_path / "bud"), "--sweep", "lr=1e-4,1e-3", "--time-budget-min", "0"])
    assert all(s["stopped"] == "time budget" for r in first["results"] for s in r["seeds"])
    assert sorted(p.parent.parent.name for p in (tmp_path / "bud").glob("*/runs/*.pt")) == ["lr=0.0001", "lr=0.001"]
    done = main(args + ["--out", str(tmp_path / "bud"), "--sweep", "lr=1e-4,1e-3", "--resume"])
    for g, ref in zip(done["variants"], swept["variants"]):
        assert g["results"][0]["seeds"][0]["final_train_loss"] == ref["results"][0]["seeds"][0]["final_train_loss"]
        assert g["results"][0]["seeds"][0]["val_history"] == ref["results"][0]["seeds"][0]["val_history"]


def test_learning_curve_records_validation_and_mean_training_loss(tiny_gru, tmp_path):
    """lr = 0 freezes the model, so an epoch's mean training loss must equal the loss over the whole training
    set computed here independently (parity scores every position: equal weight per batch)."""
    cfg = SyntheticTrainConfig(task="parity", arch=tiny_gru, seq_len=20, n_train=48, n_test=32, n_val=32,
                               batch_size=16, lr=0.0, max_epochs=2, d_model=16, progress=False)
    run = SeedRun(cfg, seed=0)
    while not run.done:
        run.advance()
    train = run.splits["train"]
    with torch.no_grad():
        logits = run.model(train.input_ids)
        scored = train.targets != IGNORE_INDEX
        expect = nn.functional.cross_entropy(logits[scored].double(), train.targets[scored]).item()
    hist = run.result()["val_history"]
    assert [h["epoch"] for h in hist] == [1, 2] and [h["step"] for h in hist] == [3, 6]
    assert all(h["train_loss"] == pytest.approx(expect, abs=2e-5) for h in hist)
    assert all(h["val_acc"] == evaluate(run.model, run.val, 1000) for h in hist)
    # the curves are drawn per task for a grid and per setting for a sweep
    from pararnn_lm.eval.tables import grid_curves, plot_curves

    grid = run_grid(dataclasses.replace(cfg, seeds=(0, 1), lr=1e-2), archs=[tiny_gru], tasks=["parity", "hop1"],
                    out_dir=tmp_path)
    assert list(grid_curves(grid)) == ["parity (|V|=2)", "1-hop (|V|=10)"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert plot_curves({"old file": [{"arch": "x", "task": "parity", "seeds": [{"test_acc": 0.5}]}]},
                       tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


class _LengthRecorder(TinyGRULM):
    """The tiny GRU, recording the length of every training-mode batch it sees."""

    def __init__(self, vocab_size, d_model, **kw):
        super().__init__(vocab_size, d_model, **kw)
        self.train_lengths, self.eval_lengths = [], set()

    def forward(self, input_ids):
        (self.train_lengths.append(input_ids.shape[1]) if self.training else self.eval_lengths.add(input_ids.shape[1]))
        return super().forward(input_ids)


def test_curriculum_trains_short_stages_first_and_validates_at_seq_len():
    synth_models.register_arch("recgru", _LengthRecorder)
    try:
        # 48 sequences of batch 16: 3 steps per epoch; stages of 4 and 3 steps, then 2 epochs at L = 20
        cfg = SyntheticTrainConfig(task="keep_nth", arch="recgru", seq_len=20, n_train=48, n_test=32, n_val=32,
                                   batch_size=16, lr=1e-2, max_epochs=2, d_model=16, progress=False,
                                   curriculum=((8, 4), (12, 3)))
        assert planned_steps(cfg) == 4 + 3 + 6
        run = SeedRun(cfg, seed=0)
        while not run.done:
            run.advance()
        res = run.result()
    finally:
        synth_models.unregister_arch("recgru")
    assert run.model.train_lengths == [8] * 4 + [12] * 3 + [20] * 6
    assert run.model.eval_lengths == {20}  # validation and test at seq_len only
    hist = res["val_history"]
    # a stage's last partial epoch ends at its boundary; max_epochs counts the main stage's epochs
    assert [h["step"] for h in hist] == [3, 4, 7, 10, 13] and [h["epoch"] for h in hist] == [1, 2, 3, 4, 5]
    assert [h["train_seq_len"] for h in hist] == [8, 8, 12, 20, 20]
    # the curves mark where each stage starts, from the config: where the recorded training length changes
    from pararnn_lm.eval.tables import curriculum_stage_starts

    res["config"] = dataclasses.asdict(cfg)
    assert curriculum_stage_starts(res) == [(0, 8), (4, 12), (7, 20)]
    assert [h["step"] for h, after in zip(hist, hist[1:]) if h["train_seq_len"] != after["train_seq_len"]] == [4, 7]
    assert curriculum_stage_starts({"config": {"curriculum": [], "seq_len": 20}}) == []
    # a panel draws the stages its runs reached, and none when its runs differ in curriculum
    from pararnn_lm.eval.tables import panel_stage_starts

    res["seeds"] = [{"val_history": hist}]
    stopped = {**res, "seeds": [{"val_history": hist[:2]}]}  # stopped at step 4, as stage 2 began
    assert panel_stage_starts([res]) == [(0, 8), (4, 12), (7, 20)]
    assert panel_stage_starts([stopped]) == [(0, 8)] and panel_stage_starts([stopped, res]) == [(0, 8), (4, 12), (7, 20)]
    other = {**res, "config": {**res["config"], "curriculum": [(8, 5)]}}
    assert panel_stage_starts([res, other]) == []
    assert (res["steps"], res["epochs"], res["stopped"]) == (13, 5, "budget")
    assert res["best_val_acc"] == max(h["val_acc"] for h in hist)
    # one cosine over every stage: the schedule's horizon is the whole budget
    assert run.lr_at(13) == pytest.approx(cfg.min_lr) and run.lr_at(6.5) == pytest.approx(cfg.lr / 2)
    # each stage has its own sequences: not a crop of the main training set
    stage0 = run._stage_data(0).input_ids
    assert stage0.shape == (48, 8) and not torch.equal(stage0, run.splits["train"].input_ids[:, :8])


def test_curriculum_run_resumes_exactly_mid_stage(tiny_gru, tmp_path):
    cfg = SyntheticTrainConfig(task="hop1", arch=tiny_gru, seq_len=20, n_train=48, n_test=64, n_val=32,
                               batch_size=16, max_epochs=10, d_model=16, progress=False,
                               curriculum=((8, 50), (12, 30)))
    whole = train_runs([(cfg, 0)], progress=False)[0]
    part = train_runs([(cfg, 0)], time_budget_s=0.0, progress=False, state_dir=tmp_path)[0]
    assert part["steps"] == 64 and part["val_history"][-1]["train_seq_len"] == 12  # stopped inside stage 2
    rest = train_runs([(cfg, 0)], progress=False, state_dir=tmp_path, resume=True)[0]
    assert (rest["steps"], rest["stopped"]) == (110, "budget")
    assert rest["val_history"] == whole["val_history"] and rest["final_train_loss"] == whole["final_train_loss"]
    assert rest["test_acc"] == whole["test_acc"]
    # another curriculum is another run: refused; a file saved before the field existed counts as none
    with pytest.raises(ValueError, match="curriculum saved"):
        train_runs([(dataclasses.replace(cfg, curriculum=((8, 50),)), 0)], progress=False, state_dir=tmp_path,
                   resume=True)
    plain = dataclasses.replace(cfg, curriculum=(), max_epochs=40)
    old = tmp_path / "old"
    train_runs([(plain, 0)], time_budget_s=0.0, progress=False, state_dir=old)
    state = torch.load(old / "tinygru__hop1__s0.pt", weights_only=False)
    del state["run_config"]["curriculum"]
    torch.save(state, old / "tinygru__hop1__s0.pt")
    assert train_runs([(plain, 0)], progress=False, state_dir=old, resume=True)[0]["steps"] == 120


def test_curriculum_from_cli_and_yaml_is_marked_off_recipe(tiny_gru, tmp_path):
    from pararnn_lm.eval.tables import recipe_deviations, render_table6

    args = ["--task", "keep_nth", "--arch", tiny_gru, "--seeds", "0", "--seq-len", "16", "--n-train", "32",
            "--n-test", "32", "--n-val", "16", "--max-epochs", "1", "--out", str(tmp_path), "--no-progress",
            "--device", "cpu"]
    res = main(args + ["--curriculum", "8:3", "12:2"])
    assert res["config"]["curriculum"] == [[8, 3], [12, 2]] and res["seeds"][0]["steps"] == 3 + 2 + 2
    assert "curriculum 8:3 12:2 (paper none)" in recipe_deviations(res)
    assert "curriculum 8:3 12:2" in render_table6([res])
    with pytest.raises(SystemExit, match="L:STEPS"):
        main(args + ["--curriculum", "8"])
    yml = tmp_path / "c.yaml"
    yml.write_text("curriculum: ['12:100', [25, 50]]\n")
    assert load_config(yml).curriculum == ((12, 100), (25, 50))


def test_curriculum_length_the_task_cannot_take_fails_before_training(tiny_gru):
    cfg = SyntheticTrainConfig(task="mqar", arch=tiny_gru, seq_len=40, n_train=32, n_test=32, n_val=16,
                               d_model=16, progress=False, curriculum=((40, 2), (6, 2)))
    with pytest.raises(ValueError, match="does not fit seq_len=6"):
        SeedRun(cfg, seed=0)


def test_curriculum_is_checked_on_every_way_in(tmp_path):
    # the API and dataclasses.replace, not only the CLI: negative, zero, float or malformed stages fail
    for bad in [((12, -5),), ((0, 3),), ((12, 2.5),), ((12,),), ("12:100:3",), ("12:x",), ((True, 3),)]:
        with pytest.raises(ValueError, match="curriculum stage"):
            SyntheticTrainConfig(curriculum=bad)
        with pytest.raises(ValueError, match="curriculum stage"):
            dataclasses.replace(SyntheticTrainConfig(), curriculum=bad)
    assert SyntheticTrainConfig(curriculum=[[12, 100], "25:50"]).curriculum == ((12, 100), (25, 50))
    assert SyntheticTrainConfig(curriculum=None).curriculum == ()
    # YAML: an empty key is no curriculum, one string is split on spaces (not read a character at a time)
    yml = tmp_path / "c.yaml"
    yml.write_text("curriculum:\n")
    assert load_config(yml).curriculum == ()
    yml.write_text("curriculum: '12:100 25:50'\n")
    assert load_config(yml).curriculum == ((12, 100), (25, 50))


def test_patience_counts_main_stage_validations_only():
    synth_models.register_arch("recgru", _LengthRecorder)
    try:
        # lr = 0: validation never improves after its first check, so patience 2 stops two checks later -
        # in the main stage, not in the 30-step curriculum stage before it (10 flat checks there)
        cfg = SyntheticTrainConfig(task="keep_nth", arch="recgru", seq_len=20, n_train=48, n_test=32, n_val=32,
                                   batch_size=16, lr=0.0, max_epochs=50, d_model=16, progress=False, patience=2,
                                   curriculum=((8, 30),))
        run = SeedRun(cfg, seed=0)
        while not run.done:
            run.advance()
    finally:
        synth_models.unregister_arch("recgru")
    assert run.stop_reason == "patience"
    assert run.model.train_lengths == [8] * 30 + [20] * 6


def test_masked_loss_is_the_scored_mean_and_zero_without_scored_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    targets[0, :3] = IGNORE_INDEX
    scored = targets != IGNORE_INDEX
    expect = -torch.log_softmax(logits, -1)[scored].gather(-1, targets[scored][:, None]).mean()
    assert masked_loss(logits, targets).item() == pytest.approx(expect.item(), rel=1e-6)
    # a batch with nothing to score (short k-hop sequences): zero loss and zero gradient, not NaN
    loss = masked_loss(logits, torch.full_like(targets, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


class CrashOnTenTokens(TinyGRULM):
    """Kills its whole process when built for a 10-token task (1-hop): a worker dying, not a run failing."""

    def __init__(self, vocab_size: int, d_model: int, **kw) -> None:
        if vocab_size == 10:
            import os

            os._exit(3)
        super().__init__(vocab_size, d_model, **kw)


def test_runs_spread_over_devices_equal_one_process(tiny_gru, tmp_path):
    base = dict(arch=tiny_gru, seq_len=20, n_train=48, n_test=64, n_val=32, batch_size=16, max_epochs=3,
                d_model=16, progress=False)
    jobs = [(SyntheticTrainConfig(task=t, **base), s) for t in ("parity", "hop1") for s in (0, 1, 2)]
    one = train_runs(jobs, progress=False)
    spread = train_runs_on_devices(jobs, devices=("cpu", "cpu"), concurrent_runs=2, progress=False,
                                   state_dir=tmp_path)
    assert [r["seed"] for r in spread] == [0, 1, 2, 0, 1, 2]  # job order, though dealt 0,2,4 / 1,3,5
    for a, b in zip(one, spread):
        assert (b["test_acc"], b["steps"], b["epochs"]) == (a["test_acc"], a["steps"], a["epochs"])
        assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-6)
        assert [h["val_acc"] for h in b["val_history"]] == [h["val_acc"] for h in a["val_history"]]
    assert sorted(p.name for p in tmp_path.glob("*.result.json")) == sorted(
        f"tinygru__{t}__s{s}.result.json" for t in ("parity", "hop1") for s in (0, 1, 2))


def test_a_dead_worker_fails_only_its_own_runs():
    synth_models.register_arch("crashy", CrashOnTenTokens)
    try:
        base = dict(arch="crashy", seq_len=20, n_train=48, n_test=64, n_val=32, batch_size=16, max_epochs=2,
                    d_model=16, progress=False)
        jobs = [(SyntheticTrainConfig(task="parity", **base), 0), (SyntheticTrainConfig(task="hop1", **base), 0),
                (SyntheticTrainConfig(task="parity", **base), 1)]
        res = train_runs_on_devices(jobs, devices=("cpu", "cpu"), progress=False)
    finally:
        synth_models.unregister_arch("crashy")
    assert res[0]["test_acc"] is not None and res[2]["test_acc"] is not None  # the surviving worker's runs
    assert res[1]["test_acc"] is None and res[1]["error"].startswith("worker on cpu failed")


def test_cli_devices_then_resume_in_one_process(tiny_gru, tmp_path):
    args = ["--grid", "--archs", tiny_gru, "--tasks", "parity", "hop1", "--seeds", "0", "1", "--seq-len", "20",
            "--n-train", "48", "--n-test", "32", "--n-val", "16", "--max-epochs", "40", "--out", str(tmp_path),
            "--no-progress", "--device", "cpu"]
    first = main(args + ["--devices", "cpu", "cpu", "--concurrent-runs", "2", "--time-budget-min", "0"])
    assert first["device"] == "2 x cpu"
    assert [s["stopped"] for r in first["results"] for s in r["seeds"]] == ["time budget"] * 4
    assert len(list((tmp_path / "runs").glob("*.pt"))) == 4
    done = main(args + ["--resume"])  # states written by two workers, continued by one process
    assert [(s["stopped"], s["steps"]) for r in done["results"] for s in r["seeds"]] == [("budget", 120)] * 4
    with pytest.raises(ValueError, match="not a device"):
        resolve_devices(["gpu0"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            resolve_devices(["all"])


def test_schedule_is_the_cosine_to_min_lr_bit_for_bit():
    """The run's learning rate comes from the training loop's schedule (warm-up 0); with min_lr = 0 it equals
    0.5 lr (1 + cos(pi t / T)) exactly, so a run is the same float for float as with a formula of its own."""
    import math

    from pararnn_lm.synthetic.run import SeedRun

    cfg = SyntheticTrainConfig(task="parity", arch="paragru", seq_len=8, n_train=32, n_test=16, n_val=16, max_steps=37,
                               d_model=8, num_heads=2, lr=3e-3)
    run = SeedRun(cfg, seed=0)
    assert run.horizon == 37
    for step in range(0, 45):
        assert run.lr_at(step) == 0.5 * cfg.lr * (1 + math.cos(math.pi * min(step / 37, 1.0)))
    run.cfg = dataclasses.replace(cfg, min_lr=1e-4)
    assert run.lr_at(0) == pytest.approx(3e-3) and run.lr_at(37) == pytest.approx(1e-4)
    assert run.lr_at(18.5) == pytest.approx(1e-4 + 0.5 * (3e-3 - 1e-4))
    with pytest.raises(ValueError, match="min_lr"):
        SyntheticTrainConfig(lr=1e-4, min_lr=1e-3)


def test_config_by_shipped_name_and_state_files_written_atomically(tiny_gru, tmp_path):
    assert load_config("table6") == load_config("configs/synthetic/table6.yaml")
    assert load_config("quick.yaml").max_epochs == 20
    with pytest.raises(FileNotFoundError, match="configs/synthetic"):
        load_config("no_such_config")
    cfg = SyntheticTrainConfig(task="hop1", arch=tiny_gru, seq_len=20, n_train=48, n_test=32, n_val=16,
                               max_epochs=40, d_model=16, progress=False)
    train_runs([(cfg, 0)], time_budget_s=0.0, progress=False, state_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tinygru__hop1__s0.pt"]  # no temporary file left
    train_runs([(cfg, 0)], progress=False, state_dir=tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tinygru__hop1__s0.result.json"]


def test_tables_do_not_import_the_app():
    """Layering: eval (tables, result names) sits below the app; rendering a sweep needs no trainer."""
    import subprocess
    import sys

    code = ("import sys, pararnn_lm.eval.tables; "
            "print(sorted(m for m in sys.modules if m.startswith('pararnn_lm.synthetic') or m.startswith('pararnn_lm.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
