"""Export a ParaRNN-LM model to a self-contained Hugging Face directory (and optionally push it).

The command-line tool is ``scripts/export_hf.py``; training calls :func:`export_model` at the end of a run.
A source (:func:`load_source`) is one of
- an HF directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``), e.g. save_pretrained;
- a training checkpoint directory (``state.pt`` with a ``model`` state dict, training/checkpoint.py), or a
  DeepSpeed checkpoint (a directory with ``latest`` / ``global_step*`` or a ``deepspeed/`` subfolder):
  ZeRO shards are consolidated with deepspeed's ``zero_to_fp32`` (imported only then). These need the
  model config: ``--config`` (a config.json), or ``--arch``/``--size`` (+ ``--vocab-size``) presets.

The export holds ``model.safetensors``, ``config.json`` (with ``auto_map``), ``generation_config.json``,
tokenizer files (``--tokenizer``), a hub model card (README.md: :func:`model_card`) and the modeling code, flat in one folder
(:data:`BUNDLE`): the modules of ``models/`` and the engine's torch-only reference files (the cell base
and cells, ``config.py``, ``layout.py``, the sequential recurrence and the layer base), copied verbatim
with every import of a bundled module pointed at its flat file (:func:`rewrite_imports`). The export
loads with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` with only torch +
transformers installed: ``engine.py`` then builds the cell layers from the copied files (sequential
recurrence) and Mamba2 runs the PyTorch SSD; where the project is installed ``engine.py`` takes its
engine (Newton + parallel scans, Triton on GPU) and Mamba2 takes fla-core on CUDA. After writing, the
export is reloaded and its logits are compared with the source model's.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..provenance import build_info
from .configuration import ParaRNNLMConfig
from .modeling import ParaRNNLMForCausalLM, check_tokenizer

log = logging.getLogger(__name__)

# The export's modules: flat file name -> the package module copied verbatim (imports rewritten). The models
# (presets.py needs yaml + configs/ and stays behind; export.py is a tool, not the model) and
# the engine's torch-only reference files, which import only each other.
BUNDLE = {
    "configuration_pararnn_lm": "pararnn_lm.models.configuration",
    "modeling_pararnn_lm": "pararnn_lm.models.modeling",
    **{name: f"pararnn_lm.models.{name}" for name in (
        "mixers", "inference", "decode", "attention", "layers", "packing", "ssd", "cache", "loss", "registry",
        "engine")},
    "kernels_cell": "pararnn_lm.kernels.cell",
    "kernels_config": "pararnn_lm.kernels.config",
    "kernels_layout": "pararnn_lm.kernels.layout",
    "kernels_sequential": "pararnn_lm.kernels.sequential",
    "kernels_layer_base": "pararnn_lm.kernels.layer_base",
    "kernels_paragru_cell": "pararnn_lm.kernels.cells.paragru.cell",
    "kernels_paralstm_cell": "pararnn_lm.kernels.cells.paralstm.cell",
}
FLAT_NAMES = {module: flat for flat, module in BUNDLE.items()}
_FROM_IMPORT = re.compile(r"^(\s*)from\s+(\.*)([\w.]*)(\s+import\b)", re.M)


# ---------------------------------------------------------------------------------------------- code
def _absolute(module: str, dots: str, name: str) -> str:
    """The module that ``from <dots><name> import`` names inside ``module`` (a plain module, not a package)."""
    if not dots:
        return name
    package = module.split(".")[: -len(dots)]
    return ".".join(package + ([name] if name else []))


def rewrite_imports(source: str, module: str) -> str:
    """Point every import of a bundled module at its flat file (``from .<flat> import``); others stay."""
    def flat(match: re.Match) -> str:
        target = FLAT_NAMES.get(_absolute(module, match[2], match[3]))
        return match[0] if target is None else f"{match[1]}from .{target}{match[4]}"

    return _FROM_IMPORT.sub(flat, source)


def write_code(out: Path) -> dict[str, str]:
    """Copy the modeling code into ``out``; returns the ``auto_map``."""
    for flat, module in BUNDLE.items():
        source = Path(importlib.util.find_spec(module).origin).read_text()
        (out / f"{flat}.py").write_text(rewrite_imports(source, module))
    return {
        "AutoConfig": "configuration_pararnn_lm.ParaRNNLMConfig",
        "AutoModel": "modeling_pararnn_lm.ParaRNNLMModel",
        "AutoModelForCausalLM": "modeling_pararnn_lm.ParaRNNLMForCausalLM",
    }


# -------------------------------------------------------------------------------------------- loading
def _clean_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrappers' prefixes (DDP ``module.``, torch.compile ``_orig_mod.``)."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


@contextlib.contextmanager
def deepspeed_weights_only():
    """DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``, which would run any
    code pickled into them. Inside this context every ``torch.load`` is ``weights_only=True`` (torch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), with the few record classes DeepSpeed pickles allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _zero_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # lazy: optional

    tag = None
    if not (path / "latest").is_file():
        steps = sorted(p.name for p in path.iterdir() if p.is_dir())
        if not steps:
            raise FileNotFoundError(f"{path} holds no DeepSpeed checkpoint tag directory")
        tag = steps[-1]
    with deepspeed_weights_only():
        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)


def _is_deepspeed_dir(path: Path) -> bool:
    return (path / "latest").is_file() or any(path.glob("global_step*")) or any(path.glob("*/*model_states.pt"))


def load_source(source: str | Path, config: ParaRNNLMConfig | None = None) -> ParaRNNLMForCausalLM:
    path = Path(source)
    if (path / "config.json").is_file() and any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        return ParaRNNLMForCausalLM.from_pretrained(path)
    if config is None:
        if (path / "config.json").is_file():
            config = ParaRNNLMConfig.from_pretrained(path)
        else:
            raise ValueError(f"{path} is not an HF model directory; pass --config or --arch/--size for its model config")
    if (path / "state.pt").is_file():
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)["model"]
    elif (path / "deepspeed").is_dir():
        state = _zero_state_dict(path / "deepspeed")
    elif _is_deepspeed_dir(path):
        state = _zero_state_dict(path)
    elif path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    else:
        raise ValueError(f"cannot find weights in {path} (model.safetensors, state.pt or a DeepSpeed checkpoint)")
    model = ParaRNNLMForCausalLM(config)
    missing, unexpected = model.load_state_dict(_clean_keys(state), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model


# ----------------------------------------------------------------------------------------------- card
PAPER_ARXIV = "2510.21450"  # Danieli et al., "ParaRNN"
TASK_TYPE = "text-generation"
# training's validation metrics (pararnn_lm.train): hub metric id, display name
VALIDATION_METRICS = {"val_ppl": ("perplexity", "perplexity"), "val_loss": ("loss", "loss (nats/token)")}
DISPLAY_NAMES = {"paragru": "ParaGRU", "paralstm": "ParaLSTM", "mamba2": "Mamba2", "attention": "Transformer"}


def eval_results(results: Mapping[str, Any] | None, dataset: str | None) -> list[EvalResult]:
    """The hub's ``model-index`` entries of ``results``: its top-level numbers (e.g. ``val_ppl``) are metrics
    on the validation split of the training data ``dataset``; an lm-eval results dict under it (``results``,
    ``n-shot``, ``configs``, as ``pararnn_lm.eval.lm_eval_tasks`` writes it) gives one entry per task and
    metric (standard errors left out), on the task's hub dataset."""
    if not results:
        return []
    out = []
    for name, value in results.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kind, label = VALIDATION_METRICS.get(name, (name, name))
            out.append(EvalResult(task_type=TASK_TYPE, dataset_type=dataset or "unknown", dataset_split="validation",
                                  dataset_name=dataset or "training data", metric_type=kind, metric_name=label,
                                  metric_value=float(value)))
    shots, configs = results.get("n-shot", {}), results.get("configs", {})
    for task, metrics in results.get("results", {}).items():
        config = configs.get(task, {})
        for key, value in metrics.items():
            metric, comma, _ = key.partition(",")  # "<metric>,<filter>"; other entries (sample_len) are counts
            if not comma or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            k = shots.get(task)
            out.append(EvalResult(
                task_type=TASK_TYPE, dataset_type=config.get("dataset_path") or task, dataset_name=task,
                dataset_config=config.get("dataset_name"), dataset_split=config.get("test_split"),
                metric_type=metric, metric_value=float(value),
                metric_name=metric if k is None else f"{metric} ({k}-shot)",
                metric_args=None if k is None else {"num_fewshot": int(k)}, source_name="lm-evaluation-harness",
                source_url="https://github.com/EleutherAI/lm-evaluation-harness"))
    return out


def model_card(model: ParaRNNLMForCausalLM, *, repo_id: str | None = None, data: str | None = None,
               datasets: Sequence[str] = (), tokens: float | None = None, results: Mapping[str, Any] | None = None,
               license: str = "apache-2.0", base_model: str | None = None, init_from: str | None = None) -> ModelCard:
    """The export's README.md as a hub ``ModelCard``: metadata (license, datasets, base model, tags with the
    paper's arXiv id, ``model-index`` from :func:`eval_results`) and a text body with the same numbers.

    ``data`` describes the training data in words, ``datasets`` are its hub dataset ids; ``base_model`` is the
    hub id of the model training started from, ``init_from`` that start in words (e.g. a local checkpoint)."""
    c = model.config
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    mixers = c.mixers
    arch = mixers[0] if len(set(mixers)) == 1 else "hybrid (" + ", ".join(f"{m} x{mixers.count(m)}" for m in dict.fromkeys(mixers)) + ")"
    name = DISPLAY_NAMES.get(arch, arch)
    size = next(f"{n / scale:,.{digits}f}{unit}" for scale, unit, digits in ((1e9, "B", 1), (1e6, "M", 0), (1e3, "K", 0), (1, "", 0))
                if n >= scale or scale == 1)
    title = f"{name} language model ({size} parameters)"
    evaluated = eval_results(results, datasets[0] if datasets else data)
    card_data = ModelCardData(
        model_name=repo_id or title, license=license, library_name="transformers",
        pipeline_tag=TASK_TYPE, datasets=list(datasets) or None, base_model=base_model,
        tags=["pararnn", arch.split(" ")[0], "recurrent", "causal-lm", f"arxiv:{PAPER_ARXIV}"],
        eval_results=evaluated or None)
    rows = "\n".join(f"| {r.dataset_name}{f' ({r.dataset_split})' if r.dataset_split else ''} | {r.metric_name or r.metric_type} "
                     f"| {r.metric_value:.4g} |" for r in evaluated) or "| (not evaluated yet) | | |"
    load_id = repo_id or "PATH_TO_THIS_DIRECTORY"
    body = f"""# {title}

A causal language model from the ParaRNN-LM project: nonlinear RNNs (ParaGRU, ParaLSTM) trained in
parallel over the sequence with Newton's method and parallel scans, beside Mamba2 and Transformer baselines
(Danieli et al., "ParaRNN", [arXiv:{PAPER_ARXIV}](https://arxiv.org/abs/{PAPER_ARXIV})).

## Architecture
| field | value |
|---|---|
| mixer | {arch} |
| parameters | {n:,} |
| layers | {c.num_hidden_layers} |
| hidden size | {c.hidden_size} |
| MLP (SwiGLU) width | {c.intermediate_size or "none"} |
| heads | {c.mamba_num_heads if arch == "mamba2" else c.num_attention_heads} |
| vocabulary | {c.vocab_size:,} ({"tied" if c.tie_word_embeddings else "untied"} embeddings) |
| context used in training | {c.max_position_embeddings} |

Blocks are pre-norm residual (RMSNorm) mixer + SwiGLU MLP. ParaGRU/ParaLSTM mixer: linear in-projection ->
short causal depthwise conv -> channelwise cell with diagonal recurrence (recurrent gains bounded at
{c.rnn_gain_bound}) -> gated RMSNorm -> out-projection. Generation keeps an O(1) recurrent state per RNN/SSM layer.

## Training
- data: {data or ", ".join(datasets) or "not recorded"}
- tokens: {f"{tokens / 1e9:.1f}B" if tokens else "not recorded"}{f"{chr(10)}- initialised from: {init_from or base_model}" if init_from or base_model else ""}

## Evaluation
| data | metric | value |
|---|---|---|
{rows}

## Usage
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{load_id}", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained("{load_id}", trust_remote_code=False)  # a standard tokenizer class
print(tok.decode(model.generate(**tok("The", return_tensors="pt"), max_new_tokens=20)[0]))
```
The bundled code needs only torch + transformers (the cell recurrence then runs sequentially); with the
project installed it uses its parallel Newton engine (and Triton kernels on GPU).
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


# ---------------------------------------------------------------------------------------------- export
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_model(model: ParaRNNLMForCausalLM, out: str | Path, tokenizer: Any = None, *, data: str | None = None,
                 datasets: Sequence[str] = (), tokens: float | None = None, results: Mapping[str, Any] | None = None,
                 license: str = "apache-2.0", base_model: str | None = None, init_from: str | None = None,
                 repo_id: str | None = None,
                 check: bool = True, atol: float = 1e-4, dtype: str = "fp32") -> Path:
    """Write the export directory with weights in ``dtype`` (fp32, or bf16: half the size, for the hub;
    ``model`` is cast in place); with ``check`` reload it (trust_remote_code) and compare logits.
    ``data`` .. ``init_from`` go into the model card (:func:`model_card`)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        check_tokenizer(model.config, tokenizer)
    model = model.to(EXPORT_DTYPES[dtype]).eval()
    auto_map = write_code(out)
    model.config.auto_map = auto_map
    model.config.pararnn_lm = build_info()  # the code that wrote the export (version, git commit)
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        del model.config.auto_map, model.config.pararnn_lm
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    model_card(model, repo_id=repo_id, data=data, datasets=datasets, tokens=tokens, results=results,
               license=license, base_model=base_model, init_from=init_from).save(out / "README.md")
    if check:
        diff = compare_logits(model, out)
        if diff > atol:
            raise RuntimeError(f"reloaded export differs from the source model: max |logit diff| = {diff:.3g} > {atol}")
        log.info("export reloads with identical logits (max diff %.2g)", diff)
    return out


def _probe_ids(config: ParaRNNLMConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def compare_logits(model: ParaRNNLMForCausalLM, out: Path) -> float:
    """Max |logit difference| between ``model`` and its reloaded export, both on ``model``'s device: the check is
    about what was written, so both sides run the same kernels (on CUDA the mamba-ssm kernels compute in TF32,
    ~1e-3 off the CPU's fp32)."""
    from transformers import AutoModelForCausalLM

    param = next(model.parameters())
    ids = _probe_ids(model.config).to(param.device)
    expected = model(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).to(param.device, param.dtype).eval()
    return float((reloaded(ids).logits - expected).abs().max())


ISOLATED_LOADER = r"""
import json, sys

class _NoProject:
    # Simulate an environment without this project: any import of pararnn_lm fails as if it were absent
    # (it may be pip-installed, editable or not; Hugging Face's own ``kernels`` package stays importable).
    def find_spec(self, name, path=None, target=None):
        if name == "pararnn_lm" or name.startswith("pararnn_lm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoProject())
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(%(out)r, trust_remote_code=True).eval()
assert not [m for m in sys.modules if m.split(".")[0] == "pararnn_lm"], "the export imported pararnn_lm"
ids = torch.tensor(json.loads(sys.argv[1]))
with torch.no_grad():
    logits = model(ids).logits
    gen = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
engine = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".engine"].ENGINE
print(json.dumps({"logits": logits.tolist(), "engine": engine, "generated": gen.tolist()}))
"""


def load_in_isolated_process(out: Path, ids: torch.Tensor, cwd: Path) -> dict[str, Any]:
    """Load the export in a fresh interpreter in which ``pararnn_lm`` cannot be imported (torch and
    transformers only), from ``cwd``; returns its logits, a short greedy generation and the engine used."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    code = ISOLATED_LOADER % {"out": str(Path(out).resolve())}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(ids.tolist())], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"isolated load failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def push_to_hub(out: Path, repo_id: str, private: bool = False) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message="Upload ParaRNN-LM export")
    log.info("pushed %s to https://huggingface.co/%s", out, repo_id)


