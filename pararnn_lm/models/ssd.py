"""Mamba2's state-space dual (SSD) recurrence: naive reference, chunked PyTorch, single step, and the two
maintained Triton kernels (fla-core, mamba_ssm) as GPU backends (``SSD_KERNELS``).

Per head h (headdim P, state N, group g(h) of B/C):
    a_t = exp(dt_t * A_h)                          (A_h < 0, so 0 < a_t <= 1)
    S_t = a_t S_{t-1} + dt_t x_t B_t^T             (S: P x N)
    y_t = S_t C_t
The skip term D * x is applied by the caller. ``reset`` (B, T) bool marks document starts: there the
previous state is dropped (S_{t-1} := 0), including at t = 0 where it drops ``initial_state``.

Shapes: x (B, T, H, P), dt (B, T, H) (already softplus'ed), A (H,), Bm/Cm (B, T, G, N),
initial_state (B, H, P, N) or None, reset (B, T) bool or None. Returns y (B, T, H, P) and the
state after the last token (B, H, P, N).
"""
from __future__ import annotations

import logging
import re
import sys
import types

import torch
import torch.nn.functional as F

from .configuration import SSD_BACKENDS

log = logging.getLogger(__name__)


def _heads(m: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., G, N) -> (..., H, N): each group serves H/G consecutive heads."""
    return m.repeat_interleave(num_heads // m.shape[-2], dim=-2)


def ssd_naive(x, dt, A, Bm, Cm, initial_state=None, reset=None):
    """Token-by-token reference loop (use fp64 in tests)."""
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    Bh, Ch = _heads(Bm, H), _heads(Cm, H)
    S = x.new_zeros(Bsz, H, P, N) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(T):
        if reset is not None:
            S = S * (~reset[:, t]).to(x.dtype)[:, None, None, None]
        y, S = ssd_step(S, x[:, t], dt[:, t], A, Bh[:, t], Ch[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), S


def ssd_step(state, x_t, dt_t, A, B_t, C_t):
    """One token: state (B, H, P, N), x_t (B, H, P), dt_t (B, H), B_t/C_t (B, G or H, N) -> y_t, state."""
    H = x_t.shape[1]
    if B_t.shape[1] != H:
        B_t, C_t = _heads(B_t, H), _heads(C_t, H)
    a = torch.exp(dt_t * A)[:, :, None, None]
    state = a * state + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C_t)
    return y, state


def ssd_chunked(x, dt, A, Bm, Cm, initial_state=None, reset=None, chunk_size: int = 64):
    """Chunked SSD in PyTorch: quadratic attention-like form inside chunks, a state carry between them.

    Resets are handled with segment ids inside each chunk (no -inf in the log-decay cumsum, so no
    NaNs and no precision loss): a pair (t, s) interacts only if no document starts in (s, t].
    """
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    L = chunk_size
    pad = (-T) % L
    if reset is None:
        reset = torch.zeros(Bsz, T, dtype=torch.bool, device=x.device)
    if pad:  # padded steps: dt = 0 (decay 1, no input), no reset -> the final state is unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bm = F.pad(Bm, (0, 0, 0, 0, 0, pad))
        Cm = F.pad(Cm, (0, 0, 0, 0, 0, pad))
        reset = F.pad(reset, (0, pad))
    nc = x.shape[1] // L
    xc = x.reshape(Bsz, nc, L, H, P)
    dtc = dt.reshape(Bsz, nc, L, H)
    Bc = _heads(Bm, H).reshape(Bsz, nc, L, H, N)
    Cc = _heads(Cm, H).reshape(Bsz, nc, L, H, N)
    seg = reset.reshape(Bsz, nc, L).long().cumsum(-1)  # resets counted from the chunk start
    cs = torch.cumsum(dtc * A, dim=2)  # (B, nc, L, H) cumulative log decay, <= 0, decreasing

    # Intra-chunk: y_t = sum_{s<=t, same segment} exp(cs_t - cs_s) (C_t . B_s) dt_s x_s
    diff = cs.unsqueeze(3) - cs.unsqueeze(2)  # (B, nc, L_t, L_s, H)
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    same = seg.unsqueeze(3) == seg.unsqueeze(2)  # (B, nc, L_t, L_s)
    valid = (causal & same).unsqueeze(-1)
    decay = torch.exp(diff.masked_fill(~valid, float("-inf")))
    scores = torch.einsum("bctkn,bcskn->bctsk", Cc, Bc) * decay  # (B, nc, L_t, L_s, H)
    xdt = xc * dtc.unsqueeze(-1)
    y = torch.einsum("bctsk,bcskp->bctkp", scores, xdt)

    # Each chunk's own end state (from zero), and its carry factor for the incoming state.
    to_end = torch.exp(cs[:, :, -1:] - cs) * (seg == seg[:, :, -1:]).unsqueeze(-1).to(x.dtype)  # (B, nc, L, H)
    chunk_states = torch.einsum("bclk,bclkp,bclkn->bckpn", to_end, xdt, Bc)
    carry = torch.exp(cs[:, :, -1]) * (seg[:, :, -1] == 0).unsqueeze(-1).to(x.dtype)  # (B, nc, H)

    S = x.new_zeros(Bsz, H, P, N) if initial_state is None else initial_state.to(x.dtype)
    incoming = []
    for c in range(nc):  # few iterations (T / chunk_size)
        incoming.append(S)
        S = carry[:, c, :, None, None] * S + chunk_states[:, c]
    S_in = torch.stack(incoming, dim=1)  # (B, nc, H, P, N)

    # Inter-chunk: the incoming state reaches t if no document starts in [chunk start, t].
    from_start = torch.exp(cs) * (seg == 0).unsqueeze(-1).to(x.dtype)  # (B, nc, L, H)
    y = y + torch.einsum("bclkn,bckpn->bclkp", Cc, S_in) * from_start.unsqueeze(-1)
    y = y.reshape(Bsz, nc * L, H, P)[:, :T]
    return y, S


def _probe_per_device(cache: dict[int, bool], device: torch.device, probe) -> bool:
    """``probe(cuda_index) -> bool``, asked once per CUDA device (the mixers ask on every forward); False
    off CUDA."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in cache:
        cache[index] = probe(index)
    return cache[index]


_FLA_STATUS: dict[int, bool] = {}


def _fla_serves(index: int) -> bool:
    try:
        import fla.ops.simple_gla  # noqa: F401
        import triton
    except Exception:  # not installed or broken: the PyTorch path is used
        return False
    if torch.cuda.get_device_capability(index)[0] == 9:
        version = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:3])
        if version < (3, 7, 1):
            log.warning("fla-core's SSD backward is wrong/refused on Hopper with triton %s < 3.7.1; "
                        "Mamba2 uses another SSD backend", triton.__version__)
            return False
    return True


def fla_available(device: torch.device) -> bool:
    """fla-core's kernel can serve this device: installed, CUDA, and not the Hopper + triton < 3.7.1 pair
    on which fla refuses its gated backward."""
    return _probe_per_device(_FLA_STATUS, device, _fla_serves)


def ssd_fla(x, dt, A, Bm, Cm, initial_state=None, reset=None, seq=None):
    """SSD through fla-core's simple-GLA chunk kernel (q=C, k=B, v=dt*x, g=dt*A, scale 1).

    Resets use fla's varlen API: the batch is packed to (1, B*T) with cu_seqlens from ``seq``
    (:class:`models.packing.SequenceInfo`), and carried states go to each row's first document.
    """
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as err:  # pragma: no cover - guarded by fla_available
        raise RuntimeError("ssd_backend='fla' needs fla-core (pip install 'pararnn-lm[mamba]')") from err
    Bsz, T, H, P = x.shape
    q, k = _heads(Cm, H), _heads(Bm, H)
    v = (x * dt.unsqueeze(-1)).to(x.dtype)
    g = (dt * A).float()  # log decays stay fp32
    if seq is not None and seq.has_inner_resets:
        packed = seq.packed()
        h0 = seq.initial_rows_to_docs(initial_state)
        flat = [t.reshape(1, Bsz * T, *t.shape[2:]) for t in (q, k, v, g)]
        y, hT = chunk_simple_gla(*flat, scale=1.0, initial_state=h0, output_final_state=True,
                                 state_v_first=True, cu_seqlens=packed["cu_seqlens"].long())
        return y.reshape(Bsz, T, H, P), hT[packed["last_doc"]]
    if initial_state is not None and reset is not None:
        initial_state = initial_state * (~reset[:, 0]).to(initial_state.dtype)[:, None, None, None]
    y, hT = chunk_simple_gla(q, k, v, g, scale=1.0, initial_state=initial_state, output_final_state=True,
                             state_v_first=True)
    return y, hT


# ---------------------------------------------------------------------------------------------- mamba_ssm
MAMBA_SSM_CHUNK = 256  # the reference Mamba2 layer's chunk; ``mamba_chunk_size`` is the PyTorch path's


def import_mamba_ssm(module: str) -> types.ModuleType:
    """Import ``mamba_ssm.<module>``; import errors reach the caller.

    mamba-ssm installed without compiling CUDA (``MAMBA_SKIP_CUDA_BUILD=TRUE``: Mamba2's SSD is Triton)
    lacks Mamba-1's ``selective_scan_cuda`` extension, which the package's ``__init__`` imports although
    Mamba2 never calls it. It gets a stand-in module that raises if anything in it is used."""
    import importlib

    name = f"mamba_ssm.{module}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != "selective_scan_cuda":
            raise
    stub = types.ModuleType("selective_scan_cuda")

    def missing(attr):
        raise AttributeError(f"selective_scan_cuda.{attr}: mamba-ssm was installed without its CUDA extensions "
                             "(only Mamba2's Triton path is available)")

    stub.__getattr__ = missing
    sys.modules["selective_scan_cuda"] = stub
    for partial in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[partial]  # the failed import left partial modules behind
    return importlib.import_module(name)


_MAMBA_SSM_STATUS: dict[int, bool] = {}


def _mamba_ssm_serves(index: int) -> bool:
    try:
        import_mamba_ssm("ops.triton.ssd_combined")
    except Exception:  # not installed or broken against this torch/triton: the next backend is used
        return False
    return True


def mamba_ssm_available(device: torch.device) -> bool:
    """mamba_ssm's Triton SSD can serve this device: CUDA and the package importable."""
    return _probe_per_device(_MAMBA_SSM_STATUS, device, _mamba_ssm_serves)


@torch.compiler.disable  # an autograd.Function around autotuned Triton kernels: run it as it is
def ssd_mamba_ssm(x, dt, A, Bm, Cm, initial_state=None, reset=None, seq=None):
    """SSD through mamba_ssm's ``mamba_chunk_scan_combined`` (the reference Mamba2 layer's kernel).

    Documents: ``seq_idx`` = resets counted along the row; the kernel drops the carried state wherever it
    changes, and the incoming state belongs to index 0, so a reset at t = 0 drops ``initial_state``.
    The final state is the state after each row's last token (its last document's)."""
    try:
        ssd = import_mamba_ssm("ops.triton.ssd_combined")
    except Exception as err:  # pragma: no cover - guarded by mamba_ssm_available
        raise RuntimeError("ssd_backend='mamba_ssm' needs mamba-ssm (its install line is in the README)") from err
    seq_idx = None if reset is None else reset.to(torch.int32).cumsum(-1, dtype=torch.int32)
    outputs = [ssd.mamba_chunk_scan_combined(
        x[rows], dt[rows].float(), A.float(), Bm[rows], Cm[rows], MAMBA_SSM_CHUNK,
        initial_states=None if initial_state is None else initial_state[rows],
        seq_idx=None if seq_idx is None else seq_idx[rows], return_final_states=True)
        for rows in mamba_ssm_row_blocks(x, dt, Bm, Cm)]
    if len(outputs) == 1:
        return outputs[0]
    return torch.cat([y for y, _ in outputs]), torch.cat([hT for _, hT in outputs])


MAMBA_SSM_MAX_ELEMENTS = 2**31 - 1  # mamba_ssm's kernels address their tensors with 32-bit offsets


def mamba_ssm_row_blocks(x: torch.Tensor, dt: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor) -> list[slice]:
    """Rows per mamba_ssm call such that no offset its kernels compute (batch index x batch stride + ...,
    in 32 bits) passes ``MAMBA_SSM_MAX_ELEMENTS``, in the inputs as given or in what it allocates (the
    output (B, T, H, P), the per-chunk states (B, T / chunk, H, P, N)). The inputs' strides count, not their
    sizes: in the model x, B and C are slices of the conv output, whose rows are wider (a 1B Mamba2 batch of
    128 x 4,096 tokens has 2^31 elements of x but x's batch stride times 127 passes 2^31: an illegal memory
    access). Rows are independent sequences, so the calls' outputs concatenate to the one call's."""
    B, T, H, P = x.shape
    chunk_states = -(-T // MAMBA_SSM_CHUNK) * H * P * Bm.shape[-1]
    # (batch stride, largest offset within one row) of every tensor a call indexes
    layouts = [(t.stride(0), sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:]))) for t in (x, dt, Bm, Cm)]
    layouts += [(T * H * P, T * H * P - 1), (chunk_states, chunk_states - 1)]
    row_extent = max(extent for _, extent in layouts)
    if row_extent > MAMBA_SSM_MAX_ELEMENTS:
        raise ValueError(f"one sequence of {T} tokens spans {row_extent + 1:,} elements in a mamba_ssm call, past its "
                         f"32-bit offsets ({MAMBA_SSM_MAX_ELEMENTS + 1:,}): split the sequence")
    rows = min((MAMBA_SSM_MAX_ELEMENTS - extent) // stride + 1 for stride, extent in layouts if stride > 0)
    return [slice(start, start + rows) for start in range(0, B, rows)]


# name -> (can it serve this device, the kernel); ``auto`` takes the first available, else PyTorch.
SSD_KERNELS = {
    "fla": (fla_available, ssd_fla),
    "mamba_ssm": (mamba_ssm_available, ssd_mamba_ssm),
}
assert SSD_BACKENDS == ("auto", "torch", *SSD_KERNELS), "models/configuration.py SSD_BACKENDS is out of date"


def resolve_ssd_backend(backend: str, device: torch.device) -> str:
    """The backend a Mamba2 layer runs on ``device``: ``torch`` or a key of ``SSD_KERNELS``."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return next((name for name, (ok, _) in SSD_KERNELS.items() if ok(device)), "torch")
    if not SSD_KERNELS[backend][0](device):
        raise RuntimeError(f"ssd_backend={backend!r} needs a CUDA device and {backend} installed "
                           "(fla: pip install 'pararnn-lm[mamba]'; mamba-ssm: the README's install line)")
    return backend
