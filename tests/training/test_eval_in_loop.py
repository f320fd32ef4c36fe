"""lm-eval during training (eval.lm_eval_every): the metrics a run logs equal the standalone evaluation
(``python -m pararnn_lm.eval.lm_eval_tasks``) of the checkpoint / export of the same step; the evaluation
leaves training as it was (losses, train mode, RNG) and out of the step time; under two ranks it is logged
once; with eval.submit_slurm the run exports the model and hands ``sbatch`` a job that evaluates it.

Offline: the tasks are the local fixtures of tests/eval/fixtures/lm_eval (a 12-question multiple-choice task
with a 1-shot prompt, and a rolling-loglikelihood perplexity task)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from pararnn_lm.eval import lm_eval_tasks
from pararnn_lm.training.checkpoint import CheckpointManager
from pararnn_lm.training.config import TrainConfig
from pararnn_lm.training.distributed import DistInfo
from pararnn_lm.training.evaluation import lm_eval_in_process, lm_eval_metrics
from fake_sbatch import install_fake_sbatch, sbatch_calls
from repo_scripts import load_script
from test_train import FAST, ROOT, losses, records, run_train

FIXTURES = ROOT / "tests" / "eval" / "fixtures" / "lm_eval"
TASKS = {"pararnn_tiny_mc": 1, "pararnn_tiny_rolling": 0}
STEPS = ["train.steps=4", "checkpoint.every=2"]
LM_EVAL = ["eval.lm_eval_every=2", f"eval.lm_eval_tasks=[{','.join(f'{t}:{k}' for t, k in TASKS.items())}]",
           f"eval.lm_eval_include_path=[{FIXTURES}]", "eval.lm_eval_batch_size=4"]
# accuracy: the same predictions give the same fraction; perplexities: the same fp32 model run by the live
# module and by the export's reloaded code, whose sums of log-probabilities agree to float rounding
PPL_REL = 1e-5


def fast_but(*keys: str) -> list[str]:
    """test_train's FAST overrides without those of ``keys`` (which the caller sets)."""
    return [o for o in FAST if o.split("=")[0] not in keys]


def lm_eval_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if any(k.startswith("lm_eval/") for k in r)}


def standalone(model_dir: Path, out: Path) -> dict[str, float]:
    """``python -m pararnn_lm.eval.lm_eval_tasks`` on an export, as flat metrics."""
    lm_eval_tasks.main(["--model", str(model_dir), "--tasks", *(f"{t}:{k}" for t, k in TASKS.items()),
                        "--include-path", str(FIXTURES), "--batch-size", "4", "--device", "cpu", "--out", str(out)])
    return lm_eval_metrics(json.loads(out.read_text()))


def assert_same_metrics(logged: dict, expect: dict[str, float]) -> None:
    for key, value in expect.items():
        if key.endswith("_stderr"):
            continue
        if key.startswith("lm_eval/pararnn_tiny_mc/"):
            assert logged[key] == value, key
        else:
            assert logged[key] == pytest.approx(value, rel=PPL_REL), key


@pytest.fixture(scope="module")
def in_loop_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("in_loop") / "run"
    run_train(run_dir, *fast_but("export.at_end"), *STEPS, *LM_EVAL, "eval.at_end=true", "export.at_end=true", fast=False)
    return run_dir


def test_logged_lm_eval_equals_standalone_evaluation_of_the_same_checkpoint(in_loop_run, tmp_path):
    logged = lm_eval_records(in_loop_run)
    assert sorted(logged) == [2, 4]  # every 2 steps; the last one at the end of the run
    assert {k.split("/")[1] for k in logged[2] if k.startswith("lm_eval/") and k != "lm_eval/seconds"} == set(TASKS)
    # step 2: the checkpoint written at step 2, exported with the standalone tool, evaluated standalone
    export_hf = load_script("scripts/export_hf.py")
    ckpt_export = tmp_path / "step2_export"
    export_hf.main([str(in_loop_run / "checkpoints" / CheckpointManager.tag(2)), str(ckpt_export),
                    "--config", str(in_loop_run / "export" / "config.json"), "--tokenizer", str(in_loop_run / "export")])
    assert_same_metrics(logged[2], standalone(ckpt_export, tmp_path / "step2.json"))
    # step 4: the run's final export, whose model card carries the same numbers and the validation perplexity
    final = standalone(in_loop_run / "export", tmp_path / "step4.json")
    assert_same_metrics(logged[4], final)
    assert logged[2]["lm_eval/pararnn_tiny_rolling/word_perplexity"] != logged[4]["lm_eval/pararnn_tiny_rolling/word_perplexity"]
    card = ModelCard.load(in_loop_run / "export" / "README.md").data
    in_card = {(r.dataset_name, r.metric_type): r.metric_value for r in card.eval_results}
    for key, value in final.items():
        _, task, metric = key.split("/")
        if not metric.endswith("_stderr"):
            assert in_card[(task, metric)] == pytest.approx(value, rel=PPL_REL), key
    val = next(r for r in records(in_loop_run) if "val_ppl" in r)
    assert in_card[("bundled corpus", "perplexity")] == val["val_ppl"]


def test_evaluation_changes_neither_the_losses_nor_the_step_time(in_loop_run, tmp_path):
    plain = tmp_path / "plain"
    run_train(plain, *STEPS)
    assert losses(in_loop_run) == losses(plain)  # bit for bit: RNG states restored, weights untouched
    # the step after an evaluation is timed without it (timer.paused): an evaluation takes seconds, a step
    # of the debug model a fraction of that
    steps = {r["step"]: r for r in records(in_loop_run) if "step_time_s" in r}
    seconds = lm_eval_records(in_loop_run)[2]["lm_eval/seconds"]
    assert steps[3]["step_time_s"] < seconds / 4, (steps[3]["step_time_s"], seconds)


def test_in_process_evaluation_restores_train_mode_and_rng():
    from pararnn_lm.data.tokenizer import train_tokenizer
    from pararnn_lm.models import ParaRNNLMForCausalLM, config_for

    texts = [json.loads(line)["text"] for line in (FIXTURES / "tiny_rolling.jsonl").read_text().splitlines() if line]
    tokenizer = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = ParaRNNLMForCausalLM(config_for("paragru", "debug", vocab_size=len(tokenizer))).train()
    cfg = TrainConfig()
    cfg.eval.lm_eval_tasks = ["pararnn_tiny_mc:1", "pararnn_tiny_rolling"]
    cfg.eval.lm_eval_include_path = [str(FIXTURES)]
    cfg.eval.lm_eval_batch_size = 4
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    rng = torch.get_rng_state()
    results = lm_eval_in_process(model, tokenizer, cfg, info)
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)  # lm-eval seeded the generators; they are back
    direct = lm_eval_tasks.evaluate(model, TASKS, tokenizer=tokenizer, include_path=FIXTURES, batch_size=4)
    assert lm_eval_metrics(results) == lm_eval_metrics(direct)


@pytest.mark.parametrize("deepspeed", ["none", "zero3"])  # zero3: rank 0 evaluates a gathered copy
def test_two_ranks_log_one_evaluation_of_the_shared_model(tmp_path, deepspeed):
    run_dir = tmp_path / "ddp"
    run_train(run_dir, *fast_but("export.at_end", "train.micro_batch_size"), "train.micro_batch_size=2", "train.steps=2",
              "checkpoint.every=0", "eval.lm_eval_every=2", *LM_EVAL[1:], "export.at_end=true", f"deepspeed={deepspeed}",
              fast=False, launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"])
    logged = [r for r in records(run_dir) if any(k.startswith("lm_eval/") for k in r)]
    assert [r["step"] for r in logged] == [2]  # rank 0 evaluated, once; the other rank waited
    assert_same_metrics(logged[0], standalone(run_dir / "export", tmp_path / "ddp.json"))


def test_submit_slurm_exports_and_submits_each_evaluation(in_loop_run, tmp_path, monkeypatch):
    log = install_fake_sbatch(tmp_path, monkeypatch)
    run_dir = tmp_path / "slurm_run"
    run_train(run_dir, *fast_but("export.at_end"), *STEPS, *LM_EVAL, "eval.submit_slurm=true", "eval.slurm_gpus=0",
              "eval.slurm_time=00:30:00", "cluster.partition=evalq", "cluster.account=proj",
              f"cluster.env_file={ROOT / 'slurm' / 'env.sh'}", "export.at_end=true", fast=False)
    assert losses(run_dir) == losses(in_loop_run)  # the snapshot export leaves training as it was
    assert not lm_eval_records(run_dir)  # nothing evaluated in the loop
    evals = run_dir / "evals"
    submitted = [r for r in records(run_dir) if r.get("event") == "lm_eval_submitted"]
    assert [(r["step"], r["job_id"], r["export"]) for r in submitted] == [
        (2, "4242", str(evals / "step_00000002" / "export")), (4, "4243", str(run_dir / "export"))]
    calls = sbatch_calls(log)
    assert len(calls) == 2
    for (argv, text), step in zip(calls, (2, 4)):
        script = evals / f"step_{step:08d}" / "lm_eval.sbatch"
        # what sbatch got: --parsable and the script, nothing that ties the job to the training job
        assert argv == ["--parsable", str(script)]
        assert text == script.read_text()
        for line in ("#SBATCH --partition=evalq", "#SBATCH --account=proj", "#SBATCH --time=00:30:00",
                     f"#SBATCH --output={script.parent / 'slurm-%j.out'}", f"cd {ROOT}",
                     f"source {ROOT / 'slurm' / 'env.sh'}"):
            assert line in text.splitlines(), line
        assert "--gpus-per-node" not in text and "--dependency" not in text
    # run the step-2 job as SLURM would: it evaluates the snapshot like the in-loop evaluation of that step
    job = evals / "step_00000002"
    proc = subprocess.run(["bash", str(job / "lm_eval.sbatch")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_metrics(lm_eval_records(in_loop_run)[2], lm_eval_metrics(json.loads((job / "lm_eval.json").read_text())))
