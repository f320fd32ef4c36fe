"""lm-eval integration: the paper's downstream suite, in-process on a live model or on an exported directory.

* :func:`paper_tasks` - task -> {num_fewshot, metric} from ``configs/lm_eval/paper.yaml`` (one config).
* :func:`wrap_live_model` - wraps a live ``PreTrainedModel`` + tokenizer in lm-eval's ``HFLM`` (no export).
* :func:`evaluate` - runs tasks grouped by shot count (lm-eval takes one ``num_fewshot`` per call) on an LM
  object, a live model, or an exported directory (lm-eval's standard ``hf`` model with
  ``trust_remote_code=True``), and returns ONE merged lm-eval-style results dict with ``pararnn_meta``
  (arch, size, suite) so ``eval.tables`` can place it in Table 5.
* :func:`loglikelihoods` - raw ``(logprob, is_greedy)`` for (context, continuation) pairs, used to check that
  padded batches equal batch size 1.

CLI:
    python -m pararnn_lm.eval.lm_eval_tasks --model EXPORT_DIR --suite fewshot --arch paragru --size 400m --out r/paragru_400m.json
    python -m pararnn_lm.eval.lm_eval_tasks --model DIR --tasks pararnn_tiny_mc:0 --include-path tests/eval/fixtures/lm_eval
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .paper import lm_eval_suite

log = logging.getLogger(__name__)


def paper_tasks(suite: str | None = None) -> dict[str, dict[str, Any]]:
    """The paper's tasks with shot counts and reported metric (``fewshot`` or ``lowshot`` setting)."""
    return lm_eval_suite(suite)


def _hflm_cls() -> type:
    import lm_eval.models  # noqa: F401  (registers the model classes before we touch them)
    from lm_eval.models.huggingface import HFLM

    return HFLM


def wrap_live_model(model: torch.nn.Module, tokenizer: Any, *, batch_size: int | str = 8,
                    max_length: int | None = None, **kwargs: Any) -> Any:
    """lm-eval ``HFLM`` around a live model: no export, weights shared with the caller."""
    HFLM = _hflm_cls()
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, **kwargs)


def exported_model_args(path: str | Path, dtype: str = "float32", **extra: Any) -> str:
    args = {"pretrained": str(path), "trust_remote_code": True, "dtype": dtype, **extra}
    return ",".join(f"{k}={v}" for k, v in args.items())


def _task_manager(include_path: str | Path | Sequence[str | Path] | None) -> Any:
    if include_path is None:
        return _indexed_tasks(())
    paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path)]
    return _indexed_tasks(tuple(paths))


@functools.lru_cache(maxsize=4)
def _indexed_tasks(include_path: tuple[str, ...]) -> Any:
    """lm-eval's task index (built once per process: it reads every task YAML lm-eval ships, which takes
    tens of seconds, and a training run evaluates every ``eval.lm_eval_every`` steps)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path)) if include_path else TaskManager()


def evaluate(model: Any, tasks: Mapping[str, int | Mapping[str, Any]] | str | None = None, *,
             tokenizer: Any = None, batch_size: int | str = 8, include_path: Any = None, limit: int | float | None = None,
             device: str | None = None, dtype: str = "float32", meta: Mapping[str, Any] | None = None,
             **simple_evaluate_kwargs: Any) -> dict[str, Any]:
    """Run lm-eval; ``model`` is an lm-eval ``LM``, a live ``nn.Module`` (needs ``tokenizer``), or a path.

    ``tasks``: ``{task: num_fewshot}`` / ``{task: {"num_fewshot": k, ...}}`` or a suite name of the
    paper config (default: its default suite).
    """
    import lm_eval

    if tasks is None or isinstance(tasks, str):
        tasks = paper_tasks(tasks)
    shots = {t: int(v["num_fewshot"] if isinstance(v, Mapping) else v) for t, v in tasks.items()}
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("a live model needs its tokenizer")
        lm: Any = wrap_live_model(model, tokenizer, batch_size=batch_size)
        model_args = None
    elif isinstance(model, (str, Path)):
        lm, model_args = "hf", exported_model_args(model, dtype)
    else:
        lm, model_args = model, None
    tm = _task_manager(include_path)
    merged: dict[str, Any] = {"results": {}, "n-shot": {}, "configs": {}, "versions": {}, "groups": {}}
    for k in sorted(set(shots.values())):
        names = [t for t, s in shots.items() if s == k]
        log.info("lm-eval: %s with %d-shot", names, k)
        out = lm_eval.simple_evaluate(model=lm, model_args=model_args, tasks=names, num_fewshot=k,
                                      batch_size=batch_size, device=device, limit=limit, task_manager=tm,
                                      log_samples=False, **simple_evaluate_kwargs)
        if out is None:  # non-zero ranks in distributed runs
            continue
        for key in ("results", "n-shot", "configs", "versions", "groups"):
            merged[key].update(_jsonable(out.get(key, {})))
    merged["pararnn_meta"] = dict(meta or {})
    return merged


def loglikelihoods(lm: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """``lm.loglikelihood`` on (context, continuation) pairs."""
    from lm_eval.api.instance import Instance

    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(c, x), idx=i) for i, (c, x) in enumerate(pairs)]
    return [(float(lp), bool(g)) for lp, g in lm.loglikelihood(reqs, disable_tqdm=True)]


def rolling_loglikelihoods(lm: Any, texts: Sequence[str]) -> list[float]:
    from lm_eval.api.instance import Instance

    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    return [float(x) for x in lm.loglikelihood_rolling(reqs, disable_tqdm=True)]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported HF directory (loaded with trust_remote_code)")
    p.add_argument("--suite", default=None, help="paper suite: fewshot (default) or lowshot")
    p.add_argument("--tasks", nargs="*", default=None, help="override: task:shots ...")
    p.add_argument("--include-path", nargs="*", default=None, help="directories with extra task YAMLs")
    p.add_argument("--batch-size", default="8")
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--arch", default=None)
    p.add_argument("--size", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tasks: Any = a.suite
    if a.tasks:
        tasks = {t.split(":")[0]: int(t.split(":")[1]) if ":" in t else 0 for t in a.tasks}
    bs: Any = int(a.batch_size) if a.batch_size.isdigit() else a.batch_size
    limit = int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit
    res = evaluate(a.model, tasks, batch_size=bs, include_path=a.include_path, limit=limit, device=a.device,
                   dtype=a.dtype, meta={"arch": a.arch, "size": a.size, "suite": a.suite or "default", "model": a.model})
    print(json.dumps(res["results"], indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
