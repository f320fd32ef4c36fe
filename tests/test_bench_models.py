"""scripts/bench_models.py: the --smoke run (CPU, debug preset) produces every section of the JSON
(training throughput: tests/test_bench_train.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert set(res) >= {"meta", "layers", "decode", "skipped", "notes"}
    assert res["meta"]["smoke"] and res["skipped"] == []
    for name in ("== layers", "== decode"):
        assert name in proc.stdout

    layers = {r["layer"]: r for r in res["layers"]}
    assert set(layers) == {"paragru", "paralstm", "mamba2", "mamba2_ref"}
    for name in ("paragru", "paralstm", "mamba2"):
        assert layers[name]["fwd_ms"] > 0 and layers[name]["fwdbwd_ms"] > 0 and "error" not in layers[name]
    ref = layers["mamba2_ref"]
    assert "fwdbwd_ms" in ref or "skipped" in ref

    decode = {r["arch"]: r for r in res["decode"]}
    assert set(decode) == set(ARCHS)
    for r in decode.values():
        assert not any(k.endswith("error") for k in r), r
        assert r["generate_decode_tok_s"] > 0 and r["static_eager_decode_tok_s"] > 0
        assert r["static_eager_tokens_match_generate"] is True


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
