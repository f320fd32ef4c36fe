"""Model-level measurements: mixer layers and 1B decoding (training throughput: scripts/bench_train.py).

    python scripts/bench_models.py --out $OUT/bench_models.json     # H100: about 5-6 minutes
    python scripts/bench_models.py --smoke --out /tmp/bench.json     # CPU, tiny sizes (tests)

Sections (JSON keys), each saved as soon as it is measured:
  layers    bf16 (bf16 parameters and inputs) forward and forward+backward of one mixer layer at the
            Mamba2 rows of ../shared/docs/peer-benchmarks.md: our ParaGRU, ParaLSTM and Mamba2 mixers and
            the reference ``mamba_ssm.Mamba2(d_model, d_state=128, headdim=64, expand=2,
            use_mem_eff_path=False)`` when importable (else skipped with a note; the peer-benchmarks
            numbers are printed beside it either way); with --compile each also under torch.compile
            (``NAME_compiled``; --layers picks rows). Loss-free backward: y.backward(randn_like(y)).
            CUDA events, warm-up, median of --reps.
  decode    batch-1 greedy decoding of the 1b preset in bf16 weights: prefill --prompt-len tokens, then
            --new-tokens tokens. ``generate``: plain model.generate (decode rate = (n-1) / (total - prefill));
            ``static_graph``: models.StaticDecoder, static buffers + one CUDA graph per token;
            ``static_eager``: the same step without the graph; ``static_graph_compiled``: the block step
            torch.compile'd (compile="block") inside the graph, compilation time in its setup_s. Static
            variants: decode rate = (n-1) / time of the n-1 graph replays after a prefill, measured
            directly; tokens_match_generate compares their tokens with model.generate's. paragru (the
            issue's >= 500 tok/s target) runs first with every variant; the others if time allows.

The run stops starting new items after --time-budget seconds (skipped items are listed under "skipped").
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from pararnn_lm.models import ParaRNNLMConfig, ParaRNNLMForCausalLM, StaticDecoder, build_mixer, config_for
from pararnn_lm.models.packing import SequenceInfo
from pararnn_lm.models.ssd import import_mamba_ssm

LAYER_SHAPES = [(8, 2048, 1024), (16, 2048, 2048), (2, 16384, 1024)]
# the layer section's rows, in order; "mamba2_ref" is mamba_ssm's Mamba2 module (optional)
LAYERS = tuple(f"{n}{c}" for n in ("paragru", "paralstm", "mamba2", "mamba2_ref") for c in ("", "_compiled"))
# Reference Mamba2 layer (mamba_ssm 2.3.2, bf16, H100): fwd / fwd+bwd ms, peer-benchmarks.md.
PEER_MAMBA2 = {(8, 2048, 1024): (2.50, 12.56), (16, 2048, 2048): (7.00, 27.67), (2, 16384, 1024): (3.21, 14.67)}
ARCHS = ["paragru", "paralstm", "mamba2", "attention"]


# ----------------------------------------------------------------------------- helpers
class Clock:
    """Median of CUDA-event (or perf_counter on CPU) timings."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        """ms of one call (synchronised)."""
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def median(self, fn, reps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = sorted(self.once(fn) for _ in range(reps))
        return times[len(times) // 2]


def wall(fn, device) -> tuple[float, object]:
    """Seconds of one call, synchronised on both ends, and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Run:
    def __init__(self, args) -> None:
        self.args = args
        self.t0 = time.time()
        self.device = torch.device(args.device)
        self.clock = Clock(self.device)
        self.result = {"meta": self.meta(), "layers": [], "decode": [], "skipped": [], "notes": []}

    def meta(self) -> dict:
        a, dev = self.args, torch.device(self.args.device)
        info = {"command": " ".join(sys.argv), "torch": torch.__version__, "smoke": a.smoke, "device": str(dev),
                "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
        try:
            import triton
            info["triton"] = triton.__version__
        except Exception:
            info["triton"] = None
        try:
            import transformers
            info["transformers"] = transformers.__version__
        except Exception:
            pass
        return info

    def elapsed(self) -> float:
        return time.time() - self.t0

    def over_budget(self, what: str) -> bool:
        if self.elapsed() > self.args.time_budget:
            self.result["skipped"].append(f"{what}: time budget {self.args.time_budget:.0f} s used up")
            print(f"[skip] {what}: time budget used up", flush=True)
            self.save()
            return True
        return False

    def note(self, msg: str) -> None:
        print(f"[note] {msg}", flush=True)
        self.result["notes"].append(msg)

    def save(self) -> None:
        self.result["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        path = self.args.out
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.result, f, indent=1)


# ----------------------------------------------------------------------------- (a) layers
def layer_config(a, d: int) -> ParaRNNLMConfig:
    return ParaRNNLMConfig(
        vocab_size=128, hidden_size=d, num_hidden_layers=1, intermediate_size=0, num_attention_heads=a.rnn_heads,
        mamba_d_state=a.mamba_d_state, mamba_headdim=a.mamba_headdim, mamba_expand=2, rnn_mode="auto",
        mamba_chunk_size=a.mamba_chunk,
    )


def import_reference_mamba2():
    """mamba_ssm's Mamba2 class (optional; import errors reach the caller)."""
    return import_mamba_ssm("modules.mamba2").Mamba2


def reference_mamba2(a, d):
    Mamba2 = import_reference_mamba2()
    return Mamba2(d_model=d, d_state=a.mamba_d_state, headdim=a.mamba_headdim, expand=2, use_mem_eff_path=False)


def measure_layer(a, name, B, T, d, positions, dev, clock) -> dict:
    """fwd and fwd+bwd ms (and peak memory on CUDA) of one bf16 layer; its tensors are freed on return.
    ``NAME_compiled``: the same mixer under ``torch.compile`` (as ``train.compile`` runs it)."""
    out = {}
    torch.manual_seed(0)
    base, compiled = name.removesuffix("_compiled"), name.endswith("_compiled")
    if compiled:
        # Every shape, width and grad mode recompiles the same forward code; past dynamo's recompile
        # limit (8) it would silently run eager. A fresh cache per measured layer keeps it compiled.
        torch._dynamo.reset()
    if base == "mamba2_ref":  # mamba_ssm's module takes x only
        mod, extra = reference_mamba2(a, d), ()
    else:
        mod, extra = build_mixer(base, layer_config(a, d), 0), (SequenceInfo(positions),)
    fn = torch.compile(mod) if compiled else mod

    def call(x):
        return fn(x, *extra)
    mod = mod.to(device=dev, dtype=torch.bfloat16)
    out["params"] = sum(p.numel() for p in mod.parameters())
    x = torch.randn(B, T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    params = list(mod.parameters())
    with torch.no_grad():
        gy = torch.randn_like(call(x))

    def fwd_bwd():
        for p in params:
            p.grad = None
        x.grad = None
        call(x).backward(gy)

    with torch.no_grad():
        out["fwd_ms"] = clock.median(lambda: call(x), a.reps, a.warmup)
    out["fwdbwd_ms"] = clock.median(fwd_bwd, a.reps, a.warmup)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if base == "mamba2":
        out["ssd_backend"] = mod.kernel_backend(x)
    return out


def bench_layers(run: Run) -> None:
    a, dev, clock = run.args, run.device, run.clock
    ref_error = None
    try:
        import_reference_mamba2()
    except Exception as err:  # not installed, or broken against this torch
        ref_error = f"{type(err).__name__}: {err}"[:300]
        run.note(f"mamba_ssm not importable ({ref_error}); reference Mamba2 layer skipped, "
                 "peer-benchmarks.md numbers shown instead")
    for (B, T, d) in a.layer_shapes:
        positions = torch.arange(T, device=dev).expand(B, T)
        for name in a.layer_names:
            if run.over_budget(f"layers {name} {(B, T, d)}"):
                return
            row = {"layer": name, "B": B, "T": T, "d_model": d, "dtype": "bf16"}
            peer = PEER_MAMBA2.get((B, T, d))
            if name.startswith("mamba2_ref"):
                row["peer_fwd_ms"], row["peer_fwdbwd_ms"] = peer if peer else (None, None)
                if ref_error is not None:
                    row["skipped"] = ref_error
                    run.result["layers"].append(row)
                    continue
            try:
                row.update(measure_layer(a, name, B, T, d, positions, dev, clock))
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"[:500]
                print(f"[error] layer {name} {(B, T, d)}: {row['error']}", flush=True)
            free_memory()
            run.result["layers"].append(row)
            print(f"[layer] {row}", flush=True)
            run.save()
        # ratios against the reference Mamba2 (measured here, else the peer-benchmarks number)
        rows = {r["layer"]: r for r in run.result["layers"] if (r["B"], r["T"], r["d_model"]) == (B, T, d)}
        ref = rows.get("mamba2_ref", {})
        base = ref.get("fwdbwd_ms") or ref.get("peer_fwdbwd_ms")
        ref_compiled = rows.get("mamba2_ref_compiled", {}).get("fwdbwd_ms")
        for r in rows.values():
            if base and r.get("fwdbwd_ms"):
                r["fwdbwd_vs_mamba2_ref"] = r["fwdbwd_ms"] / base
                r["ref_source"] = "measured" if ref.get("fwdbwd_ms") else "peer-benchmarks.md"
            if ref_compiled and r.get("fwdbwd_ms"):
                r["fwdbwd_vs_mamba2_ref_compiled"] = r["fwdbwd_ms"] / ref_compiled


# ----------------------------------------------------------------------------- (c) decode
def build_decode_model(a, arch, dev):
    cfg = config_for(arch, a.decode_size, rnn_mode="auto")
    torch.manual_seed(0)
    with torch.device(dev):
        model = ParaRNNLMForCausalLM(cfg)
    return model.to(torch.bfloat16 if not a.decode_fp32 else torch.float32).eval()


def decode_rates(row, prefix, t_prefill, t_total, n_new):
    row[f"{prefix}_prefill_s"] = t_prefill
    row[f"{prefix}_total_s"] = t_total
    row[f"{prefix}_end_to_end_tok_s"] = n_new / t_total
    row[f"{prefix}_decode_tok_s"] = (n_new - 1) / max(t_total - t_prefill, 1e-9)


def bench_decode_arch(run: Run, arch: str, variants: list[str]) -> None:
    a, dev = run.args, run.device
    row = {"arch": arch, "size": a.decode_size, "batch": 1, "prompt": a.prompt_len, "new_tokens": a.new_tokens,
           "dtype": "fp32" if a.decode_fp32 else "bf16"}
    run.result["decode"].append(row)
    try:
        model = build_decode_model(a, arch, dev)
        row["params"] = sum(p.numel() for p in model.parameters())
        V, n = model.config.vocab_size, a.new_tokens
        prompt = torch.randint(1, V, (1, a.prompt_len), device=dev, generator=torch.Generator(dev).manual_seed(0))
        gen_kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=n, max_new_tokens=n)
        ref = None
        with torch.no_grad():
            t_prefill, _ = wall(lambda: model(prompt, use_cache=True, logits_to_keep=1), dev)
        for variant in variants:
            if run.over_budget(f"decode {arch} {variant}"):
                break
            try:
                if variant == "generate":
                    with torch.no_grad():
                        model.generate(prompt, **{**gen_kw, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
                        t_prefill, _ = wall(lambda: model(prompt, use_cache=True, logits_to_keep=1), dev)
                        t_total, ref = wall(lambda: model.generate(prompt, **gen_kw), dev)
                    decode_rates(row, variant, t_prefill, t_total, n)
                else:
                    graph = variant.startswith("static_graph")
                    compiled = "block" if variant.endswith("compiled") else False
                    t_build = time.time()
                    dec = StaticDecoder(model, batch_size=1, max_length=a.prompt_len + n + 8, cuda_graph=graph,
                                        compile=compiled, max_new_tokens=n)
                    dec.generate(prompt, max_new_tokens=min(n, 8))  # warm-up (+ compile + graph capture)
                    run.clock.sync()
                    row[f"{variant}_setup_s"] = time.time() - t_build
                    t_total, out = wall(lambda: dec.generate(prompt, max_new_tokens=n), dev)
                    t_pre, _ = wall(lambda: dec.prefill(prompt), dev)
                    t_loop, _ = wall(lambda: [dec.decode_one() for _ in range(n - 1)], dev)
                    decode_rates(row, variant, t_pre, t_total, n)
                    row[f"{variant}_decode_tok_s"] = (n - 1) / t_loop  # measured directly, not by difference
                    row[f"{variant}_ms_per_token"] = t_loop / (n - 1) * 1e3
                    if ref is not None:
                        same = (out == ref)[0, a.prompt_len:]
                        row[f"{variant}_tokens_match_generate"] = bool(same.all())
                        bad = (~same).nonzero()
                        row[f"{variant}_first_mismatch"] = int(bad[0]) if bad.numel() else None
                    dec = None  # frees its buffers and graph pool before the next variant
            except Exception as err:
                row[f"{variant}_error"] = f"{type(err).__name__}: {err}"[:500]
                print(f"[error] decode {arch} {variant}: {row[f'{variant}_error']}", flush=True)
            run.save()
            print(f"[decode] {arch} {variant}: "
                  f"{ {k: v for k, v in row.items() if k.startswith(variant)} }", flush=True)
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:500]
        print(f"[error] decode {arch}: {row['error']}", flush=True)
    free_memory()
    run.save()


def bench_decode(run: Run) -> None:
    """The first architecture (paragru: the issue's target) gets every variant, the compiled one last;
    the others, if time allows, plain generate and the eager-step CUDA graph (+ compiled if listed)."""
    a = run.args
    cuda = run.device.type == "cuda"
    for i, arch in enumerate(a.decode_archs):
        if run.over_budget(f"decode {arch}"):
            return
        variants = ["generate", "static_graph"] if cuda else ["generate", "static_eager"]
        if cuda and i == 0:
            variants.append("static_eager")
        if arch in a.decode_compile and cuda:  # (CPU: tests/test_models_decode.py covers compile)
            variants.append("static_graph_compiled")
        bench_decode_arch(run, arch, variants)


# ----------------------------------------------------------------------------- report
def fmt(v, spec=".3g"):
    if v is None or v == "":
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def print_tables(res: dict) -> None:
    print("\n== layers: bf16, ms (median) ==")
    print("layer | B | T | d | fwd | fwd+bwd | peer fwd+bwd | fwd+bwd / Mamba2 ref | / Mamba2 ref compiled | note")
    for r in res["layers"]:
        print(" | ".join([r["layer"], str(r["B"]), str(r["T"]), str(r["d_model"]), fmt(r.get("fwd_ms")),
                          fmt(r.get("fwdbwd_ms")), fmt(r.get("peer_fwdbwd_ms")), fmt(r.get("fwdbwd_vs_mamba2_ref")),
                          fmt(r.get("fwdbwd_vs_mamba2_ref_compiled")), (r.get("ref_source") or "") + (" skipped" if r.get("skipped") else "")
                          + (" ERROR " + r["error"][:60] if r.get("error") else "")]))
    print("\n== decode: batch 1, greedy ==")
    print("arch | size | variant | decode tok/s | ms/token | end-to-end tok/s | prefill s | setup s | same tokens as generate")
    for r in res["decode"]:
        for v in ("generate", "static_eager", "static_graph", "static_graph_compiled"):
            if f"{v}_decode_tok_s" in r or f"{v}_error" in r:
                print(" | ".join([r["arch"], r["size"], v, fmt(r.get(f"{v}_decode_tok_s"), ".1f"),
                                  fmt(r.get(f"{v}_ms_per_token")), fmt(r.get(f"{v}_end_to_end_tok_s"), ".1f"), fmt(r.get(f"{v}_prefill_s")),
                                  fmt(r.get(f"{v}_setup_s")), fmt(r.get(f"{v}_tokens_match_generate"))
                                  + (" ERROR " + r[f"{v}_error"][:60] if r.get(f"{v}_error") else "")]))
    for s in res["skipped"]:
        print(f"skipped: {s}")
    for n in res["notes"]:
        print(f"note: {n}")


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "bench_models.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (debug preset), few reps")
    ap.add_argument("--device", default=None)
    ap.add_argument("--sections", default="layers,decode")
    ap.add_argument("--layers", default=",".join(LAYERS),
                    help="layers of the layer section; NAME_compiled rows run with --compile only")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rnn-heads", type=int, default=4, help="ParaRNN heads of the layer benchmark (presets: 4)")
    ap.add_argument("--mamba-d-state", type=int, default=128)
    ap.add_argument("--mamba-headdim", type=int, default=64)
    ap.add_argument("--mamba-chunk", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="also each layer under torch.compile (NAME_compiled rows)")
    ap.add_argument("--decode-archs", default=",".join(ARCHS))
    ap.add_argument("--decode-size", default="1b")
    ap.add_argument("--decode-fp32", action="store_true", help="decode with fp32 weights (default bf16)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--decode-compile", default="paragru",
                    help="archs also decoded with the torch.compile'd block step ('' = none; CPU smoke: eager)")
    ap.add_argument("--time-budget", type=float, default=400.0, help="seconds after which no new item starts")
    a = ap.parse_args(argv)
    if a.smoke:
        a.device = a.device or "cpu"
        a.reps, a.warmup = min(a.reps, 3), 1
        a.layer_shapes = [(2, 32, 64)]
        a.rnn_heads, a.mamba_d_state, a.mamba_headdim, a.mamba_chunk = 2, 16, 16, 8
        a.decode_size, a.prompt_len, a.new_tokens = "debug", 8, 8
    else:
        a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        a.layer_shapes = LAYER_SHAPES
    a.sections = [s for s in a.sections.split(",") if s]
    a.layer_names = [s for s in a.layers.split(",") if s]
    unknown = sorted(set(a.layer_names) - set(LAYERS))
    if unknown:
        ap.error(f"unknown --layers {unknown}; choose from {','.join(LAYERS)}")
    # each compiled layer follows its eager row; without --compile only the eager ones run
    a.layer_names = [n for n in a.layer_names if a.compile or not n.endswith("_compiled")]
    a.decode_archs = [s for s in a.decode_archs.split(",") if s]
    a.decode_compile = [s for s in a.decode_compile.split(",") if s]
    return a


def main(argv=None):
    a = parse_args(argv)
    run = Run(a)
    print(f"device: {run.result['meta']['device_name']}; torch {torch.__version__}", flush=True)
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for section, fn in (("layers", bench_layers), ("decode", bench_decode)):
        if section in a.sections:
            t = time.time()
            fn(run)
            run.result["meta"][f"{section}_s"] = round(time.time() - t, 1)
            run.save()
    print_tables(run.result)
    print(f"total {run.elapsed():.0f} s; JSON: {a.out}", flush=True)
    run.save()
    return run.result


if __name__ == "__main__":
    main()
