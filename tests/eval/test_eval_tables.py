"""Tables render from small hand-made result files, with the paper's numbers beside ours."""
from __future__ import annotations

import json
import re

import pytest

from pararnn_lm.eval import tables
from pararnn_lm.eval.paper import TABLE5_PPL, TABLE6


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_table6_from_files(tmp_path):
    d = tmp_path / "syn"
    d.mkdir()
    _write(d / "paragru__parity.json", {"kind": "synthetic", "arch": "paragru", "task": "parity", "accuracy": 0.9987})
    _write(d / "grid.json", {"kind": "synthetic_grid", "results": [
        {"kind": "synthetic", "arch": "mamba2", "task": "keep_nth", "accuracy": 0.0081},
        {"kind": "synthetic", "arch": "mamba2", "task": "parity", "accuracy": 0.5012},
        {"kind": "synthetic", "arch": "mygru", "task": "hop1", "accuracy": 1.0}]})
    _write(d / "unrelated.json", {"kind": "perplexity", "perplexity": 3.0})
    res = tables.synthetic_results([d])
    assert len(res) == 4
    md = tables.render_table6(res)
    lines = {l.split("|")[1].strip(): l for l in md.splitlines() if l.startswith("| ") and "model" not in l}
    assert set(lines) == {"Transformer", "Mamba2", "ParaGRU", "ParaLSTM", "mygru"}
    cells = [c.strip() for c in lines["ParaGRU"].split("|")[2:-1]]
    assert cells == ["– / 100", "99.9 / 100", "– / 100", "– / 100", "– / 100"]
    cells = [c.strip() for c in lines["Mamba2"].split("|")[2:-1]]
    assert cells[:2] == ["0.8 / 1", "50.1 / 52"] and cells[4] == "– / 98"
    assert [c.strip() for c in lines["mygru"].split("|")[2:-1]][3] == "100.0 / –"
    assert "arXiv:2510.21450" in md
    png = tables.plot_table6(res, tmp_path / "t6.png")
    assert png.stat().st_size > 1000


def test_table5_from_files(tmp_path):
    ppl = _write(tmp_path / "ppl.json", {"kind": "perplexity", "perplexity": 19.123, "meta": {"arch": "paragru", "size": "400m"}})
    ppl2 = _write(tmp_path / "mamba2_400m_ppl.json", {"kind": "perplexity", "perplexity": 17.0, "meta": {}})
    lm = _write(tmp_path / "paragru_400m.json", {
        "results": {"arc_challenge": {"acc,none": 0.3, "acc_norm,none": 0.25}, "piqa": {"acc,none": 0.65, "acc_norm,none": 0.66},
                    "mmlu": {"acc,none": 0.251}, "pararnn_tiny_mc": {"acc,none": 1.0}},
        "n-shot": {"arc_challenge": 25, "piqa": 0, "mmlu": 0}})
    lm_meta = _write(tmp_path / "x.json", {"results": {"hellaswag": {"acc_norm,none": 0.4}}, "n-shot": {"hellaswag": 10},
                                           "pararnn_meta": {"arch": "transformer", "size": "400m"}})
    p = tables.perplexity_rows([ppl, ppl2])
    a = tables.lm_eval_rows([lm, lm_meta])
    assert p[("mamba2", "400m")]["perplexity"] == 17.0  # arch/size from the file name
    assert a[("paragru", "400m")] == {"arc_challenge@25": 25.0, "piqa@0": 65.0, "mmlu@0": 25.1}  # suite metrics, %
    md = tables.render_table5(p, a)
    header = next(l for l in md.splitlines() if l.startswith("| size"))
    assert header.index("ARC-C (25-shot)") < header.index("HellaSwag (10-shot)") < header.index("PIQA (0-shot)")
    row = next(l for l in md.splitlines() if l.startswith("| 400m | ParaGRU"))
    assert "19.12 / 18.56" in row and "25.0" in row and "65.0" in row
    row7 = next(l for l in md.splitlines() if l.startswith("| 7b | Mamba2"))
    assert f"– / {TABLE5_PPL['7b']['mamba2']:.2f}" in row7
    png = tables.plot_perplexity_vs_size(p, tmp_path / "ppl.png")
    assert png.stat().st_size > 1000


def test_cli_writes_outputs(tmp_path, capsys):
    _write(tmp_path / "a.json", {"kind": "synthetic", "arch": "paralstm", "task": "mqar", "accuracy": 1.0})
    out = tables.main(["--synthetic", str(tmp_path / "a.json"), "--out", str(tmp_path / "t")])
    assert "100.0 / 100" in out["table6.md"] and (tmp_path / "t" / "table6.md").exists()
    assert (tmp_path / "t" / "table6.png").exists()
    assert "ParaLSTM" in capsys.readouterr().out


def test_paper_numbers_match_the_paper():
    assert TABLE6["transformer"] == {"keep_nth": 100, "parity": 53, "mqar": 100, "hop1": 82, "hop2": 78}
    assert TABLE6["mamba2"]["keep_nth"] == 1 and TABLE6["mamba2"]["hop2"] == 98
    assert TABLE5_PPL["7b"] == {"paragru": 9.19, "paralstm": 9.16, "mamba2": 8.62, "transformer": 9.55}
    assert TABLE5_PPL["400m"] == {"paragru": 18.56, "paralstm": 18.40, "mamba2": 16.49, "transformer": 17.00}


def _paper_setup(arch, task, model=None, task_options=None):
    """What the trainer records of a run's model and task when it follows the paper (JSON-normalised)."""
    from pararnn_lm.eval.paper import TABLE6_MODELS, TABLE6_TASKS

    return {"model_spec": json.loads(json.dumps({**TABLE6_MODELS[(arch, task)], **(model or {})})),
            "task_options": {**TABLE6_TASKS[task], **(task_options or {})}}


def test_table6_flags_results_off_the_papers_recipe():
    recipe = {"seq_len": 100, "n_train": 10_000, "batch_size": 16, "lr": 5e-4, "weight_decay": 1e-6,
              "retain_gate_bias": 0.0, "max_epochs": 3000}
    res = [{"kind": "synthetic", "arch": "paragru", "task": "parity", "accuracy": 1.0, "config": recipe,
            **_paper_setup("paragru", "parity")},
           {"kind": "synthetic", "arch": "paralstm", "task": "keep_nth", "accuracy": 0.011,
            "config": {**recipe, "retain_gate_bias": 4.0, "n_train": 1_000_000}, **_paper_setup("paralstm", "keep_nth")},
           {"kind": "synthetic", "arch": "paragru", "task": "keep_nth", "accuracy": 0.02,
            "config": {**recipe, "model_kwargs": {"gain_bound": None, "position_encoding": None},
                       "task_kwargs": {"scoring": "last"}},
            **_paper_setup("paragru", "keep_nth", {"gain_bound": None, "position_encoding": None}, {"scoring": "last"})},
           # the paper's setting given explicitly is still the paper's
           {"kind": "synthetic", "arch": "transformer", "task": "mqar", "accuracy": 1.0,
            "config": {**recipe, "model_kwargs": {"position_encoding": "sinusoidal"}, "task_kwargs": {"num_pairs": 2}},
            **_paper_setup("transformer", "mqar")},
           {"kind": "synthetic", "arch": "mamba2", "task": "hop2", "accuracy": 0.98, "config": recipe,  # kernels only
            **_paper_setup("mamba2", "hop2", {"mixer": {"mamba_expand": 1, "mamba_headdim": 16, "mamba_d_state": 64,
                                                        "ssd_backend": "mamba_ssm"}})},
           {"kind": "synthetic", "arch": "mamba2", "task": "mqar", "accuracy": 0.5, "config": recipe,
            **_paper_setup("mamba2", "mqar", {"mixer": {"mamba_expand": 1, "mamba_headdim": 16, "mamba_d_state": 16}},
                           {"layout": "ours", "num_pairs": 8})},
           {"kind": "synthetic", "arch": "paralstm", "task": "hop1", "accuracy": 0.9, "config": recipe},  # older trainer
           {"kind": "synthetic", "arch": "mamba2", "task": "hop1", "accuracy": 0.99}]  # no config: nothing to flag
    md = tables.render_table6(res)
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in md.splitlines() if l.startswith("| ") and "model" not in l}
    assert rows["ParaGRU"][1] == "100.0 / 100" and rows["Mamba2"][3] == "99.0 / 100"
    assert rows["Transformer"][2] == "100.0 / 100" and rows["Mamba2"][4] == "98.0 / 98"
    assert rows["ParaLSTM"][0] == "1.1 * / 100" and rows["ParaGRU"][0] == "2.0 * / 100"
    assert rows["Mamba2"][2] == "50.0 * / 100" and rows["ParaLSTM"][3] == "90.0 * / 100"
    notes = {l.split(":", 1)[0]: l for l in md.splitlines() if l.startswith("\\*")}
    assert len(notes) == 4
    lstm = notes["\\* ParaLSTM, keep-nth (n=5, |V|=128)"]
    assert "n_train=1000000 (paper 10000)" in lstm and "retain_gate_bias=4.0 (paper 0.0)" in lstm
    assert "seq_len" not in lstm and "model " not in lstm and "task " not in lstm
    gru = notes["\\* ParaGRU, keep-nth (n=5, |V|=128)"]
    assert "model gain_bound=None (paper 0.9)" in gru and "model position_encoding=None (paper sinusoidal)" in gru
    assert "task scoring=last (paper dense)" in gru
    mamba = notes["\\* Mamba2, MQAR (|V|=128)"]
    assert "model mamba_d_state=16 (paper 64)" in mamba and "task layout=ours (paper zoology)" in mamba
    assert "task num_pairs=8 (paper 2)" in mamba
    assert "not recorded" in notes["\\* ParaLSTM, 1-hop (|V|=10)"]


def test_table6_recipe_agrees_with_the_trainer_and_its_config():
    """The recipe is written in three places; a drift would flag (or hide) off-recipe results wrongly. The
    trainer's tasks and models take the paper's per-task setup as their defaults."""
    from pathlib import Path

    from pararnn_lm.eval.paper import TABLE6_MODELS, TABLE6_RECIPE, TABLE6_TASKS
    from pararnn_lm.eval.synthetic.models import model_spec
    from pararnn_lm.eval.synthetic.tasks import TASKS
    from pararnn_lm.synthetic.config import SyntheticTrainConfig, load_config, run_choices

    yaml_cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "synthetic" / "table6.yaml")
    for k, v in TABLE6_RECIPE.items():
        assert getattr(SyntheticTrainConfig(), k) == v, k
        assert getattr(yaml_cfg, k) == v, k
    assert {t: spec.options() for t, spec in TASKS.items()} == TABLE6_TASKS
    for (arch, task), paper in TABLE6_MODELS.items():
        assert model_spec(arch, task).as_dict() == paper
        recorded = {"arch": arch, "task": task, "config": {"seq_len": 100},
                    **run_choices(SyntheticTrainConfig(arch=arch, task=task))}
        assert tables.recipe_deviations(recorded) == [], (arch, task)


def _cell(arch, task, seeds, **cfg):
    return {"kind": "synthetic", "arch": arch, "task": task, "accuracy": max(seeds),
            **_paper_setup(arch, task, cfg.get("model_kwargs")),
            "seeds": [{"seed": i, "test_acc": a} for i, a in enumerate(seeds)],
            "config": {"seq_len": 100, "n_train": 10_000, "batch_size": 16, "lr": 5e-4, "weight_decay": 1e-6,
                       "d_model": 64, "num_heads": 4, "retain_gate_bias": 0.0, **cfg}}


def test_sweep_table_and_plots(tmp_path, caplog):
    one_key = {"kind": "synthetic_sweep", "sweep": {"lr": [5e-4, 2e-3]}, "variants": [
        {"overrides": {"lr": 5e-4}, "results": [_cell("paragru", "mqar", [0.016, 0.9871]),
                                                 _cell("mamba2", "mqar", [0.5, 0.25])]},
        {"overrides": {"lr": 2e-3}, "results": [_cell("paragru", "mqar", [0.2, 0.1], lr=2e-3, n_train=5000),
                                                 _cell("mamba2", "mqar", [1.0, 0.75], lr=2e-3, n_train=5000)]}]}
    md = tables.render_sweep(one_key)
    split = [re.split(r"(?<!\\)\|", l) for l in md.splitlines() if l.startswith("| ") and "model" not in l]
    rows = {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in split}  # "\|" stays in a cell
    assert list(rows) == ["Mamba2", "ParaGRU"]  # the paper's row order
    assert rows["ParaGRU"] == ["MQAR (\\|V\\|=128)", "100", "98.7 [1.6, 98.7]", "20.0 [20.0, 10.0]"]
    assert rows["Mamba2"][3] == "100.0 [100.0, 75.0]"
    assert "lr=0.0005 | lr=0.002" in md
    assert "also differs" not in md  # lr is the swept setting; n_train differs in one setting only
    assert tables.plot_sweep(one_key, tmp_path / "lr.png").stat().st_size > 0
    two_keys = {"kind": "synthetic_sweep", "sweep": {"lr": [5e-4], "model_kwargs.gain_bound": [None, 0.9]},
                "variants": [{"overrides": {"lr": 5e-4, "model_kwargs.gain_bound": g},
                              "results": [_cell("paragru", "keep_nth", [0.01], n_train=1000,
                                                model_kwargs={"gain_bound": g})]} for g in (None, 0.9)]}
    md = tables.render_sweep(two_keys)
    assert "lr=0.0005,model_kwargs.gain_bound=none" in md
    assert md.strip().endswith("n_train=1000 (paper 10000)")  # a deviation every run shares is stated
    assert tables.plot_sweep(two_keys, tmp_path / "two.png").stat().st_size > 0
    _write(tmp_path / "sweep.json", two_keys)
    assert tables.synthetic_results([tmp_path]) == [] and "is a sweep" in caplog.text
    out = tables.main(["--sweep", str(tmp_path / "sweep.json"), "--out", str(tmp_path / "r")])
    assert out["sweep.md"] == md and (tmp_path / "r" / "sweep.png").exists()
    assert not (tmp_path / "r" / "sweep_curves.png").exists()  # these results carry no learning curves
    _write(tmp_path / "cell.json", {"kind": "synthetic", "arch": "paragru", "task": "mqar", "accuracy": 0.5})
    with pytest.raises(SystemExit):
        tables.main(["--sweep", str(tmp_path / "cell.json")])


def test_compact_step_labels():
    assert tables._compact_count(250_000) == "250k"
    assert tables._compact_count(1_500_000) == "1.5M"
    assert tables._compact_count(62_500) == "62.5k"
    assert tables._compact_count(999) == "999"
    assert tables._compact_count(0) == "0"
