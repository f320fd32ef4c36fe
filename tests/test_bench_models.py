"""scripts/bench_models.py: the --smoke run (CPU, debug preset) produces every section of the JSON."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repo_scripts import load_script

REPO = Path(__file__).resolve().parent.parent
ARCHS = ["paragru", "paralstm", "mamba2", "attention"]


def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_models.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res) >= {"meta", "layers", "training", "decode", "skipped", "notes"}
    assert res["meta"]["smoke"] and res["skipped"] == []
    for name in ("== layers", "== training", "== decode"):
        assert name in proc.stdout

    layers = {r["layer"]: r for r in res["layers"]}
    assert set(layers) == {"paragru", "paralstm", "mamba2", "mamba2_ref"}
    for name in ("paragru", "paralstm", "mamba2"):
        assert layers[name]["fwd_ms"] > 0 and layers[name]["fwdbwd_ms"] > 0 and "error" not in layers[name]
    ref = layers["mamba2_ref"]
    assert "fwdbwd_ms" in ref or "skipped" in ref

    train = {r["arch"]: r for r in res["training"]}
    assert set(train) == set(ARCHS)
    for r in train.values():
        assert "error" not in r, r
        assert r["micro_batch"] >= 1 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
        assert r["non_embedding_params"] < r["params"]
    assert train["attention"]["tokens_per_s_vs_attention"] == 1.0

    decode = {r["arch"]: r for r in res["decode"]}
    assert set(decode) == set(ARCHS)
    for r in decode.values():
        assert not any(k.endswith("error") for k in r), r
        assert r["generate_decode_tok_s"] > 0 and r["static_eager_decode_tok_s"] > 0
        assert r["static_eager_tokens_match_generate"] is True


def test_batch_search_grows_until_oom(monkeypatch, tmp_path):
    bm = load_script("scripts/bench_models.py")

    calls = []

    def fake_try_train(model, opt, mb, *args, **kwargs):
        calls.append(mb)
        if mb > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return 10.0, 12.0, None  # back-to-back ms, synchronised ms, peak

    monkeypatch.setattr(bm, "try_train", fake_try_train)
    args = bm.parse_args(["--smoke", "--out", str(tmp_path / "b.json"), "--sections", "training",
                          "--train-archs", "paragru"])
    args.max_micro_batch = 16  # (--smoke sets 4)
    run = bm.Run(args)
    bm.bench_training(run)
    row = run.result["training"][0]
    # Upwards from 1, stopping at the first OOM; the best tokens/s among the successes is reported.
    assert calls == [1, 2, 4]
    assert row["micro_batch"] == 2 and row["tokens_per_s"] == 2 * args.seq_len / 0.01
    assert row["step_ms_synced"] == 12.0  # kept beside, not used for tokens/s
    assert bm.micro_batch_grid(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96]
    assert [a.get("oom") for a in row["attempts"]] == [None, None, True]


def test_back_to_back_clock_averages_over_the_calls():
    bm = load_script("scripts/bench_models.py")

    calls = []
    ms = bm.Clock(torch.device("cpu")).back_to_back(lambda: (calls.append(1), time.sleep(0.02)), 5)
    assert len(calls) == 5 and 19 <= ms < 60


def test_reference_mamba2_import_survives_a_missing_cuda_extension(tmp_path, monkeypatch):
    """mamba-ssm built without CUDA (MAMBA_SKIP_CUDA_BUILD) imports Mamba-1's selective_scan_cuda in its
    __init__: the loader stands in for it, and anything that touches the stand-in still fails clearly."""
    bm = load_script("scripts/bench_models.py")

    pkg = tmp_path / "mamba_ssm"
    (pkg / "modules").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import selective_scan_cuda\nfrom mamba_ssm.modules.mamba2 import Mamba2\n")
    (pkg / "modules" / "__init__.py").write_text("")
    (pkg / "modules" / "mamba2.py").write_text("class Mamba2:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] in ("mamba_ssm", "selective_scan_cuda")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        cls = bm.import_reference_mamba2()
        assert cls.__name__ == "Mamba2" and cls.__module__ == "mamba_ssm.modules.mamba2"
        import selective_scan_cuda

        with pytest.raises(AttributeError, match="without its CUDA extensions"):
            selective_scan_cuda.fwd
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in ("mamba_ssm", "selective_scan_cuda")]:
            del sys.modules[name]


def test_layer_selection():
    bm = load_script("scripts/bench_models.py")

    assert bm.parse_args(["--layers", "paragru,paragru_compiled,mamba2_ref_compiled"]).layer_names == ["paragru"]
    picked = bm.parse_args(["--compile", "--layers", "paragru_compiled,mamba2_ref,mamba2_ref_compiled"]).layer_names
    assert picked == ["paragru_compiled", "mamba2_ref", "mamba2_ref_compiled"]
    with pytest.raises(SystemExit):
        bm.parse_args(["--layers", "paragru,mamba3"])


def test_search_cap_starts_after_the_first_micro_batch(tmp_path):
    """The first attempt pays compilation and kernel autotuning (minutes for mamba_ssm): even a zero cap
    measures it, and only then stops the search."""
    bm = load_script("scripts/bench_models.py")

    out = tmp_path / "cap.json"
    bm.main(["--smoke", "--device", "cpu", "--sections", "training", "--train-archs", "paragru", "--train-cap", "0",
             "--out", str(out)])
    (row,) = json.loads(out.read_text())["training"]
    assert row["attempts"][0]["micro_batch"] == 1 and row["attempts"][0]["tokens_per_s"] > 0
    assert row["attempts"][1] == {"micro_batch": 2, "skipped": "per-architecture time cap"}
    assert row["first_attempt_s"] > 0 and row["micro_batch"] == 1
