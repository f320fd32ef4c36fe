"""Mamba2 SSD: chunked PyTorch == naive sequential reference (fp64), steps, the mixer's decode; fla on GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pararnn_lm.models.ssd import ssd_chunked, ssd_naive, ssd_step


def _inputs(B=2, T=37, H=4, P=3, G=2, N=5, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    x, dt = r(B, T, H, P), F.softplus(r(B, T, H))
    A = -torch.rand(H, generator=g, dtype=dtype).to(device) * 2 - 0.05
    return x, dt, A, r(B, T, G, N), r(B, T, G, N), r(B, H, P, N)


def _resets(B, T, spots):
    reset = torch.zeros(B, T, dtype=torch.bool)
    for b, t in spots:
        reset[b, t] = True
    return reset


@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_resets", [False, True])
def test_chunked_equals_naive_fp64(chunk, with_state, with_resets):
    x, dt, A, Bm, Cm, S0 = _inputs()
    # resets: mid-chunk, at chunk starts, two in a row, at t=0 of row 1 (drops its initial state)
    reset = _resets(2, 37, [(0, 5), (0, 8), (0, 9), (0, 16), (1, 0), (1, 30), (1, 36)]) if with_resets else None
    S0 = S0 if with_state else None
    y_ref, s_ref = ssd_naive(x, dt, A, Bm, Cm, S0, reset)
    y, s = ssd_chunked(x, dt, A, Bm, Cm, S0, reset, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(s, s_ref, atol=1e-12, rtol=1e-10)


def test_naive_reference_matches_explicit_formula():
    """The reference itself against the closed form y_t = sum_s prod(a) dt_s (C_t.B_s) x_s (one head)."""
    x, dt, A, Bm, Cm, _ = _inputs(B=1, T=6, H=1, P=2, G=1, N=3)
    y, _ = ssd_naive(x, dt, A, Bm, Cm)
    a = torch.exp(dt[0, :, 0] * A[0])
    for t in range(6):
        want = sum(torch.prod(a[s + 1 : t + 1]) * dt[0, s, 0] * (Cm[0, t, 0] @ Bm[0, s, 0]) * x[0, s, 0] for s in range(t + 1))
        torch.testing.assert_close(y[0, t, 0], want)


def test_final_state_continues_the_sequence():
    x, dt, A, Bm, Cm, S0 = _inputs(T=40)
    y_all, s_all = ssd_chunked(x, dt, A, Bm, Cm, S0, chunk_size=8)
    y1, s1 = ssd_chunked(x[:, :23], dt[:, :23], A, Bm[:, :23], Cm[:, :23], S0, chunk_size=8)
    y2, s2 = ssd_chunked(x[:, 23:], dt[:, 23:], A, Bm[:, 23:], Cm[:, 23:], s1, chunk_size=8)
    torch.testing.assert_close(torch.cat((y1, y2), 1), y_all)
    torch.testing.assert_close(s2, s_all)
    # single steps from the prefix state
    S, ys = s1, []
    for t in range(23, 40):
        yt, S = ssd_step(S, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t])
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y2)


def test_chunked_gradients_match_naive():
    x, dt, A, Bm, Cm, S0 = _inputs(T=19)
    reset = _resets(2, 19, [(0, 7), (1, 12)])
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, Bm, Cm, S0)]
    y, s = ssd_chunked(*leaves, reset=reset, chunk_size=4)
    g = torch.autograd.grad((y.sin().sum() + s.cos().sum()), leaves)
    leaves_ref = [t.clone().requires_grad_() for t in (x, dt, A, Bm, Cm, S0)]
    y, s = ssd_naive(*leaves_ref, reset=reset)
    g_ref = torch.autograd.grad((y.sin().sum() + s.cos().sum()), leaves_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.gpu
def test_fla_kernel_matches_torch_ssd():
    pytest.importorskip("fla")
    from pararnn_lm.models.packing import SequenceInfo
    from pararnn_lm.models.ssd import ssd_fla

    x, dt, A, Bm, Cm, S0 = _inputs(B=2, T=200, H=4, P=64, G=1, N=64, dtype=torch.float32, device="cuda")
    pos = torch.arange(200, device="cuda").repeat(2, 1)
    pos[0, 77:] -= 77  # a document starts at 77 in row 0
    seq = SequenceInfo(pos)
    y_ref, s_ref = ssd_chunked(x.double(), dt.double(), A.double(), Bm.double(), Cm.double(), S0.double(), seq.resets)
    for s0 in (None, S0):
        y, s = ssd_fla(x, dt, A, Bm, Cm, s0, seq.resets, seq)
        if s0 is None:
            y_ref, s_ref = ssd_chunked(x.double(), dt.double(), A.double(), Bm.double(), Cm.double(), None, seq.resets)
        # fla's fp32 matmuls may use TF32: compare relative to the output scale
        assert (y.double() - y_ref).abs().max() <= 5e-3 * y_ref.abs().max()
        assert (s.double() - s_ref).abs().max() <= 5e-3 * s_ref.abs().max()


def test_backend_resolution_and_config_errors():
    from pararnn_lm.models import ParaRNNLMConfig
    from pararnn_lm.models.ssd import SSD_KERNELS, resolve_ssd_backend

    cpu = torch.device("cpu")
    assert resolve_ssd_backend("auto", cpu) == "torch" and resolve_ssd_backend("torch", cpu) == "torch"
    for name in SSD_KERNELS:  # the Triton kernels need CUDA: asking for one on the CPU says so
        with pytest.raises(RuntimeError, match=f"ssd_backend='{name}' needs a CUDA device"):
            resolve_ssd_backend(name, cpu)
    with pytest.raises(ValueError, match="ssd_backend must be one of auto\\|torch\\|fla\\|mamba_ssm, got 'cuda'"):
        ParaRNNLMConfig(mixer="mamba2", ssd_backend="cuda")


@pytest.mark.gpu
def test_mamba_ssm_on_a_batch_past_32_bit_offsets():
    """The 1B Mamba2's prefill at 128 x 4,096 tokens (x, B, C slices of the 4,352-wide conv output: 2.3e9
    elements) ran into an illegal memory access; in row blocks it runs, and its last rows equal a call on
    those rows alone."""
    from pararnn_lm.models.ssd import mamba_ssm_available, mamba_ssm_row_blocks, ssd_mamba_ssm

    if not mamba_ssm_available(torch.device("cuda")):
        pytest.skip("mamba_ssm not installed")
    B, T, H, P, N = 128, 4096, 64, 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    wide = torch.randn(B, T, H * P + 2 * N, device="cuda", dtype=torch.bfloat16, generator=g)
    x = wide[..., : H * P].view(B, T, H, P)
    Bm, Cm = wide[..., H * P : H * P + N].view(B, T, 1, N), wide[..., H * P + N :].view(B, T, 1, N)
    dt = torch.rand(B, T, H, device="cuda", generator=g) * 0.1
    A = -torch.rand(H, device="cuda", generator=g) - 0.05
    assert len(mamba_ssm_row_blocks(x, dt, Bm, Cm)) == 2
    y, h = ssd_mamba_ssm(x, dt, A, Bm, Cm)
    torch.cuda.synchronize()
    tail = slice(B - 2, B)
    y_tail, h_tail = ssd_mamba_ssm(x[tail].contiguous(), dt[tail], A, Bm[tail].contiguous(), Cm[tail].contiguous())
    torch.testing.assert_close(y[tail].float(), y_tail.float(), atol=2e-2, rtol=2e-2)  # bf16 outputs
    torch.testing.assert_close(h[tail], h_tail, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_kernel_matches_fp64_reference(dtype):
    """mamba_ssm's chunked SSD (the GPU backend where fla-core refuses Hopper) against the fp64 chunked SSD
    (itself tested against the naive loop above): outputs, final states and every gradient, with a
    document start mid-chunk, one on a chunk boundary, one at t = 0 (drops the initial state)."""
    from pararnn_lm.models.ssd import mamba_ssm_available, ssd_mamba_ssm

    if not mamba_ssm_available(torch.device("cuda")):
        pytest.skip("mamba_ssm not installed")
    B, T = 3, 600  # > 2 kernel chunks of 256 and a ragged tail
    x, dt, A, Bm, Cm, S0 = _inputs(B=B, T=T, H=4, P=64, G=2, N=64, dtype=torch.float32, device="cuda")
    reset = _resets(B, T, [(0, 77), (0, 256), (1, 0), (1, 400), (2, 599)]).cuda()
    for s0, rs in ((None, None), (S0, None), (S0, reset)):
        ins = [t.to(dtype) for t in (x, Bm, Cm)]
        leaves = [ins[0], dt.clone(), A.clone(), ins[1], ins[2]] + ([s0.clone()] if s0 is not None else [])
        for t in leaves:
            t.requires_grad_()
        y, s = ssd_mamba_ssm(*leaves[:5], leaves[5] if s0 is not None else None, rs)
        gy, gs = torch.randn_like(y, dtype=torch.float32), torch.randn_like(s, dtype=torch.float32)
        grads = torch.autograd.grad((y.float() * gy).sum() + (s.float() * gs).sum(), leaves)
        ref = [t.detach().double().requires_grad_() for t in leaves]
        y_ref, s_ref = ssd_chunked(*ref[:5], ref[5] if s0 is not None else None, rs)
        grads_ref = torch.autograd.grad((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum(), ref)
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # TF32 / bf16 matmuls: relative to each tensor's scale
        for name, got, want in [("y", y, y_ref), ("state", s, s_ref)] + [
                (f"grad {i}", g, r) for i, (g, r) in enumerate(zip(grads, grads_ref))]:
            err = (got.double() - want).abs().max() / want.abs().max()
            assert err <= tol, f"{name} (initial state {s0 is not None}, resets {rs is not None}): {err:.2e}"


def test_auto_backend_keeps_fp64_on_the_pytorch_ssd(monkeypatch):
    """A kernel that claims the device must still not take fp64 inputs (its matmuls are fp32)."""
    from pararnn_lm.models import ParaRNNLMConfig
    from pararnn_lm.models import ssd
    from pararnn_lm.models.mixers import Mamba2Mixer

    monkeypatch.setitem(ssd.SSD_KERNELS, "mamba_ssm", (lambda device: True, ssd.SSD_KERNELS["mamba_ssm"][1]))
    mixer = Mamba2Mixer(ParaRNNLMConfig(mixer="mamba2", hidden_size=32, num_hidden_layers=1, vocab_size=16,
                                        mamba_headdim=16, mamba_d_state=8), 0)
    assert mixer.kernel_backend(torch.zeros(1, 2, 32, dtype=torch.float64)) == "torch"
    assert mixer.kernel_backend(torch.zeros(1, 2, 32)) in ssd.SSD_KERNELS


def test_backend_probes_ask_once_per_cuda_device():
    """The availability probes run on every Mamba2 forward: each CUDA device is probed once, CPU never."""
    from pararnn_lm.models.ssd import _probe_per_device

    cache, asked = {}, []
    probe = lambda index: asked.append(index) or index == 1  # noqa: E731
    assert not _probe_per_device(cache, torch.device("cpu"), probe)
    assert [_probe_per_device(cache, torch.device("cuda", i), probe) for i in (0, 1, 0, 1)] == [False, True, False, True]
    assert asked == [0, 1]


def test_mamba_ssm_calls_stay_within_32_bit_offsets(monkeypatch):
    """A batch whose calls would address past 2^31 elements goes to mamba_ssm in row blocks (its kernels'
    32-bit offsets overflow past it). As in the model, x, B and C are slices of one wider tensor: the
    offsets follow its row stride, not x's size (counting sizes, the guard let a 1B Mamba2 prefill fault).
    Each call's largest offset is read from the data pointers; the blocks' outputs equal one call's. The
    kernel is stood in for by the fp64 chunked SSD, which records each call's batch."""
    import types

    from pararnn_lm.models import ssd

    calls = []

    def last_offset(t):  # elements from a call's first to its last element, from the addresses
        return (t[(-1,) * t.dim()].data_ptr() - t.data_ptr()) // t.element_size()

    def combined(x, dt, A, Bm, Cm, chunk, initial_states=None, seq_idx=None, return_final_states=True):
        calls.append(x.shape[0])
        for t in (x, dt, Bm, Cm):
            assert last_offset(t) <= ssd.MAMBA_SSM_MAX_ELEMENTS
        assert x[..., 0].numel() * x.shape[-1] <= ssd.MAMBA_SSM_MAX_ELEMENTS + 1  # the output, allocated
        assert -(-x.shape[1] // ssd.MAMBA_SSM_CHUNK) * x[0, 0].numel() * Bm.shape[-1] * x.shape[0] <= ssd.MAMBA_SSM_MAX_ELEMENTS
        reset = None if seq_idx is None else torch.diff(seq_idx, dim=-1, prepend=seq_idx[:, :1] * 0) != 0
        return ssd_chunked(x, dt.double(), A.double(), Bm, Cm, initial_states, reset, chunk_size=8)

    monkeypatch.setattr(ssd, "import_mamba_ssm", lambda module: types.SimpleNamespace(mamba_chunk_scan_combined=combined))
    x, dt, A, Bm, Cm, S0 = _inputs(B=7, T=37)
    B, T, H, P = x.shape
    G, N = Bm.shape[2:]
    wide = torch.cat([x.flatten(2), Bm.flatten(2), Cm.flatten(2)], -1)  # (B, T, 12 + 10 + 10): the conv output
    x, Bm, Cm = (wide[..., :12].view(B, T, H, P), wide[..., 12:22].view(B, T, G, N), wide[..., 22:].view(B, T, G, N))
    reset = _resets(7, 37, [(0, 5), (3, 0), (6, 20)])
    y_ref, s_ref = ssd_chunked(x, dt, A, Bm, Cm, S0, reset, chunk_size=8)
    y_one, s_one = ssd.ssd_mamba_ssm(x, dt, A, Bm, Cm, S0, reset)
    assert calls == [7]
    torch.testing.assert_close(y_one, y_ref, atol=1e-5, rtol=1e-4)  # the kernel's dt and A are fp32
    torch.testing.assert_close(s_one, s_ref, atol=1e-5, rtol=1e-4)
    # a row of x spans 1,164 elements of the wide tensor (its last at offset 36 x 32 + 11) and the next row
    # starts 37 x 32 = 1,184 after it: 2 rows end at offset 2,347, 3 at 3,531. x holds 444 elements per
    # row, so counting sizes would allow 6 rows under this limit
    monkeypatch.setattr(ssd, "MAMBA_SSM_MAX_ELEMENTS", 3000)
    calls.clear()
    y, s = ssd.ssd_mamba_ssm(x, dt, A, Bm, Cm, S0, reset)
    assert calls == [2, 2, 2, 1]
    torch.testing.assert_close(y, y_one, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(s, s_one, atol=1e-12, rtol=1e-10)
    monkeypatch.setattr(ssd, "MAMBA_SSM_MAX_ELEMENTS", 1162)  # not even one row fits: a clear error
    with pytest.raises(ValueError, match="one sequence of 37 tokens spans 1,164 elements"):
        ssd.ssd_mamba_ssm(x, dt, A, Bm, Cm, S0, reset)
