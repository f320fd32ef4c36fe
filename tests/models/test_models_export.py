"""The HF export (pararnn_lm.models.export, scripts/export_hf.py): it loads in a fresh process that cannot
import pararnn_lm, with a standard tokenizer, and records the code that wrote it; its files import only
each other, torch and transformers, and the engine's files in it are the package's, verbatim. Its README.md
is a hub model card (metadata and model-index as given), ``--push-to-hub`` creates the repository and uploads
the folder (a recording fake of huggingface_hub.HfApi, no network), and ``--dtype bf16`` writes bf16 weights
whose logits are those of the fp32 model within bf16 rounding."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pararnn_lm
from pararnn_lm.models import ParaRNNLMForCausalLM, config_for
from pararnn_lm.models.export import BUNDLE, _probe_ids, export_model, load_in_isolated_process, load_source, write_code
from repo_scripts import load_script

main = load_script("scripts/export_hf.py").main

ARCHS = ("paragru", "paralstm", "mamba2", "attention")


def _model(arch: str, **kw) -> ParaRNNLMForCausalLM:
    torch.manual_seed(0)
    model = ParaRNNLMForCausalLM(config_for(arch, "debug", rnn_mode="newton_torch", **kw)).eval()
    with torch.no_grad():  # away from init, so a silent re-init on load would show
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_without_the_repository(arch, tmp_path):
    model = _model(arch)
    out = export_model(model, tmp_path / "export", data="toy", tokens=1e3, results={"ppl": 12.5})
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "modeling_pararnn_lm.py", "engine.py"} <= files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_pararnn_lm.ParaRNNLMForCausalLM"
    assert cfg["pararnn_lm"]["pararnn_lm_version"] == pararnn_lm.__version__ and "git_commit" in cfg["pararnn_lm"]
    assert "pararnn_lm" not in model.config.to_dict()  # the stamp is written, not kept on the live config
    assert "| toy (validation) | ppl | 12.5 |" in (out / "README.md").read_text()
    ids = _probe_ids(model.config)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    got = load_in_isolated_process(out, ids, cwd=elsewhere)
    assert got["engine"] == "reference"  # the engine's reference files in the export, not pararnn_lm.kernels
    with torch.no_grad():
        want = model(ids).logits
        gen = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(torch.tensor(got["logits"]), want, atol=1e-4, rtol=1e-4)
    assert got["generated"] == gen.tolist()


# What an export may import unconditionally: Python's standard library, torch and transformers (HF's loader
# refuses a remote module whose imports outside ``try`` blocks are not installed).
ALLOWED = set(sys.stdlib_module_names) | {"__future__", "torch", "transformers"}


def imports_outside_bundle(folder: Path) -> list[str]:
    """``file: import`` for every import outside a ``try`` block of a .py file in ``folder`` that is neither
    ``from .<a file of the folder> import`` nor of an allowed package."""
    bundle = {p.stem for p in folder.glob("*.py")}
    bad = []

    def visit(path: Path, node: ast.AST) -> None:
        if isinstance(node, ast.Try):  # optional dependencies (fla-core, the project's engine)
            return
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level != 1 or node.module not in bundle:
                bad.append(f"{path.name}: from {'.' * node.level}{node.module or ''} import")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            bad.extend(f"{path.name}: import {n}" for n in names if n.split(".")[0] not in ALLOWED)
        for child in ast.iter_child_nodes(node):
            visit(path, child)

    for path in sorted(folder.glob("*.py")):
        visit(path, ast.parse(path.read_text()))
    return bad


def test_bundled_files_import_only_each_other_torch_and_transformers(tmp_path):
    write_code(tmp_path)
    assert {p.stem for p in tmp_path.glob("*.py")} == set(BUNDLE)
    assert imports_outside_bundle(tmp_path) == []
    # the check itself: a bundled file importing the package, or a file that is not bundled, is caught
    (tmp_path / "kernels_sequential.py").write_text("from pararnn_lm.kernels.modes import MODES\nfrom .modes import x\n")
    assert imports_outside_bundle(tmp_path) == ["kernels_sequential.py: import pararnn_lm.kernels.modes",
                                                "kernels_sequential.py: from .modes import"]


def test_engine_files_are_copied_verbatim_but_for_their_imports(tmp_path):
    write_code(tmp_path)
    for flat, module in BUNDLE.items():
        source = Path(importlib.util.find_spec(module).origin).read_text().splitlines()
        copy = (tmp_path / f"{flat}.py").read_text().splitlines()
        assert len(copy) == len(source), flat
        changed = [(a, b) for a, b in zip(source, copy) if a != b]
        assert all(a.lstrip().startswith("from ") and b.lstrip().startswith("from .") for a, b in changed), changed


def test_export_from_training_checkpoint_with_prefixed_keys(tmp_path):
    model = _model("paragru")
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "step": 10}, ckpt / "state.pt")
    model.config.to_json_file(tmp_path / "config.json")
    main([str(ckpt), str(tmp_path / "out"), "--config", str(tmp_path / "config.json")])  # includes the reload check
    loaded = load_source(tmp_path / "out")
    ids = _probe_ids(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_export_rejects_a_tokenizer_larger_than_the_vocab(tmp_path):
    class Tok:
        def __len__(self):
            return 1000

        def save_pretrained(self, path):  # pragma: no cover - must not be reached
            raise AssertionError

    with pytest.raises(ValueError, match="tokenizer has 1000 tokens"):
        export_model(_model("attention"), tmp_path / "x", Tok())


TOKENIZER_PROBE = r"""
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)
text = "In the beginning, naive cafe\u0301s."
ids = tok(text)["input_ids"]
print(json.dumps({"class": type(tok).__module__ + "." + type(tok).__name__, "roundtrip": tok.decode(ids) == text,
                  "eos": tok.eos_token, "len": len(tok)}))
"""


def test_export_tokenizer_is_a_standard_class_that_runs_no_custom_code(tmp_path):
    """The exported tokenizer loads with AutoTokenizer in a process that cannot import pararnn_lm, runs no
    code from the export (trust_remote_code=False, stdin closed: nothing can be asked), is one of
    transformers' own classes and round-trips text."""
    from pararnn_lm.data.tokenizer import EOS_TOKEN, train_tokenizer

    texts = ["In the beginning God created the heaven and the earth.", "And the earth was without form."] * 50
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = ParaRNNLMForCausalLM(config_for("paragru", "debug", vocab_size=len(tokenizer))).eval()
    out = export_model(model, tmp_path / "export", tokenizer)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    blocker = ("import sys\nclass B:\n def find_spec(self, n, p=None, t=None):\n"
               "  if n.split('.')[0] == 'pararnn_lm': raise ModuleNotFoundError(n)\nsys.meta_path.insert(0, B())\n")
    proc = subprocess.run([sys.executable, "-c", blocker + TOKENIZER_PROBE, str(out)], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class"].startswith("transformers."), got
    assert got["roundtrip"] and got["eos"] == EOS_TOKEN and got["len"] == len(tokenizer)


# lm-eval's results as `python -m pararnn_lm.eval.lm_eval_tasks --out` writes them (abridged)
LM_EVAL_RESULTS = {
    "results": {"piqa": {"alias": "piqa", "acc,none": 0.625, "acc_stderr,none": 0.011, "acc_norm,none": 0.6375,
                         "sample_len": 1838},
                "arc_challenge": {"acc_norm,none": 0.25, "acc_norm_stderr,none": 0.012}},
    "n-shot": {"piqa": 0, "arc_challenge": 25},
    "configs": {"piqa": {"dataset_path": "baber/piqa", "test_split": "validation"},
                "arc_challenge": {"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Challenge", "test_split": "test"}},
    "pararnn_meta": {"arch": "paragru", "size": "debug"},
}


def test_model_card_is_a_hub_model_card_with_the_results_as_model_index(tmp_path):
    from huggingface_hub import EvalResult, ModelCard

    results = {"val_ppl": 17.25, "val_loss": 2.8478, **LM_EVAL_RESULTS}
    out = export_model(_model("paragru"), tmp_path / "export", data="SlimPajama", datasets=["cerebras/SlimPajama-627B"],
                       tokens=2.5e9, results=results, license="mit", base_model="someone/paragru-base",
                       repo_id="me/paragru-debug", check=False)
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("mit", "transformers", "text-generation")
    assert data.datasets == ["cerebras/SlimPajama-627B"] and data.base_model == "someone/paragru-base"
    assert {"pararnn", "paragru", "arxiv:2510.21450"} <= set(data.tags)
    assert data.model_name == "me/paragru-debug"
    assert "https://arxiv.org/abs/2510.21450" in card.text and 'from_pretrained("me/paragru-debug"' in card.text
    common = {"task_type": "text-generation"}
    lm_eval_source = {"source_name": "lm-evaluation-harness", "source_url": "https://github.com/EleutherAI/lm-evaluation-harness"}
    slim = {**common, "dataset_type": "cerebras/SlimPajama-627B", "dataset_name": "cerebras/SlimPajama-627B",
            "dataset_split": "validation"}
    piqa = {**common, **lm_eval_source, "dataset_type": "baber/piqa", "dataset_name": "piqa", "dataset_split": "validation",
            "metric_args": {"num_fewshot": 0}}
    arc = {**common, **lm_eval_source, "dataset_type": "allenai/ai2_arc", "dataset_name": "arc_challenge",
           "dataset_config": "ARC-Challenge", "dataset_split": "test", "metric_args": {"num_fewshot": 25}}
    # stderr entries and counts (sample_len) are not results; the validation metrics take the hub's names
    assert data.eval_results == [
        EvalResult(**slim, metric_type="perplexity", metric_name="perplexity", metric_value=17.25),
        EvalResult(**slim, metric_type="loss", metric_name="loss (nats/token)", metric_value=2.8478),
        EvalResult(**piqa, metric_type="acc", metric_name="acc (0-shot)", metric_value=0.625),
        EvalResult(**piqa, metric_type="acc_norm", metric_name="acc_norm (0-shot)", metric_value=0.6375),
        EvalResult(**arc, metric_type="acc_norm", metric_name="acc_norm (25-shot)", metric_value=0.25),
    ]
    assert "| arc_challenge (test) | acc_norm (25-shot) | 0.25 |" in card.text


def test_model_card_without_results_or_base_model(tmp_path):
    from huggingface_hub import ModelCard

    out = export_model(_model("mamba2"), tmp_path / "export", check=False)
    data = ModelCard.load(out / "README.md").data
    assert data.eval_results is None and data.base_model is None and data.datasets is None
    assert data.license == "apache-2.0" and "arxiv:2510.21450" in data.tags


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records create_repo / upload_folder and what the folder held."""
    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        card = (Path(folder_path) / "README.md").read_text()
        self.calls.append(("upload_folder", repo_id, {"folder_path": folder_path, **kwargs}, files, card))


def test_push_to_hub_creates_the_repository_and_uploads_the_export(tmp_path, monkeypatch):
    import huggingface_hub

    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    model = _model("paragru")
    model.save_pretrained(tmp_path / "source")
    (tmp_path / "val.json").write_text(json.dumps({"val_ppl": 20.5}))
    (tmp_path / "lm_eval.json").write_text(json.dumps(LM_EVAL_RESULTS))
    out = tmp_path / "export"
    main([str(tmp_path / "source"), str(out), "--push-to-hub", "me/paragru-debug", "--private",
          "--results", str(tmp_path / "val.json"), "--results", str(tmp_path / "lm_eval.json"),
          "--datasets", "cerebras/SlimPajama-627B", "--license", "apache-2.0", "--base-model", "someone/base"])
    create, upload = RecordingHfApi.calls
    assert create == ("create_repo", "me/paragru-debug", {"private": True, "exist_ok": True})
    name, repo, kwargs, files, card = upload
    assert (name, repo, kwargs["folder_path"]) == ("upload_folder", "me/paragru-debug", str(out))
    assert {"config.json", "model.safetensors", "README.md", "modeling_pararnn_lm.py", "engine.py"} <= set(files)
    from huggingface_hub import ModelCard

    data = ModelCard(card).data  # what was uploaded: the card of this export, with both result files
    assert data.model_name == "me/paragru-debug" and data.base_model == "someone/base"
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("cerebras/SlimPajama-627B", "perplexity", 20.5), ("piqa", "acc", 0.625), ("piqa", "acc_norm", 0.6375),
        ("arc_challenge", "acc_norm", 0.25)]


# bf16 keeps 8 significant bits: each weight and activation is rounded by up to 2^-9 relative. Through the
# debug models (2 blocks, width 32) that moves the logits by 1-2% of the largest |logit| (rounding the weights
# alone: ~1%). 4e-2 of it bounds that with margin; one block's MLP output zeroed moves them by 40% or more.
BF16_REL_TO_MAX_LOGIT = 4e-2


@pytest.mark.parametrize("arch", ["paragru", "attention"])
def test_bf16_export_has_bf16_weights_and_the_fp32_logits_within_bf16_rounding(arch, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = _model(arch)
    model.save_pretrained(tmp_path / "source")
    out = tmp_path / "export"
    main([str(tmp_path / "source"), str(out), "--dtype", "bf16"])  # includes the reload check in bf16
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    assert (out / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "source" / "model.safetensors").stat().st_size
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    ids = _probe_ids(model.config)
    with torch.no_grad():
        want, got = model(ids).logits, reloaded(ids).logits.float()
    scale = want.abs().max()
    diff = (got - want).abs().max()
    assert diff <= BF16_REL_TO_MAX_LOGIT * scale, (float(diff), float(scale))
    assert diff > 0  # bf16 really rounded something (not an fp32 file read back)
    # the tolerance would catch a real bug: one wrong weight matrix (here zeroed) moves the logits far more
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
        assert (model(ids).logits - want).abs().max() > 5 * BF16_REL_TO_MAX_LOGIT * scale


def test_the_hub_repository_of_an_init_from_export_becomes_the_base_model(tmp_path):
    from pararnn_lm.training.export import hub_id_of

    pushed = export_model(_model("paragru"), tmp_path / "pushed", repo_id="someone/paragru-base", check=False)
    local = export_model(_model("paragru"), tmp_path / "local", check=False)
    assert hub_id_of(str(pushed)) == "someone/paragru-base"
    assert hub_id_of(str(local)) is None  # never pushed: its card names no repository
    assert hub_id_of(str(tmp_path)) is None and hub_id_of(None) is None  # a folder without a card, no init_from


def test_the_reload_check_sees_a_changed_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    from pararnn_lm.models.export import compare_logits

    model = _model("paragru")
    out = export_model(model, tmp_path / "export")
    assert compare_logits(model, out) < 1e-5
    weights = load_file(out / "model.safetensors")
    name = next(k for k in weights if k.endswith("norm.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    assert compare_logits(model, out) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_export_check_passes_for_a_model_on_the_gpu(arch, tmp_path):
    """The reload check runs the export on the model's device, with the same kernels (mamba-ssm's TF32 SSD on
    CUDA differs from the CPU's fp32 by ~1e-3, which failed the check at the end of a Mamba2 run)."""
    torch.manual_seed(0)
    model = ParaRNNLMForCausalLM(config_for(arch, "debug")).cuda().eval()
    export_model(model, tmp_path / "export", check=True)  # raises past atol
