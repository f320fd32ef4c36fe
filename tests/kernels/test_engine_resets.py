"""``parallel_rnn(..., resets=R)``: documents that start inside batch rows, in every registered mode.

Two references, both independent of the code under test:
- a per-row Python loop of ``cell.step`` (fp64, autograd) that zeroes the state where R is True;
- the ``cu_seqlens`` path on the same documents packed into one row (1, B*T), every row start a boundary.
The Triton modes run in Triton's CPU interpreter (tests/conftest.py), on tiny shapes.
"""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.kernels import MODES, ParaGRU, ParaLSTM, ParaGRULayer, parallel_rnn
from pararnn_lm.kernels import shooting
from pararnn_lm.kernels.layout import SequenceLayout

CELLS = {"paragru": ParaGRU, "paralstm": ParaLSTM}
FP64_MODES = {"sequential", "newton_torch"}  # the Triton modes compute in fp32
SHOOTING_MODES = {"fused"}  # kernels the 'small' tiles settings reach


def _resets(B: int, T: int) -> torch.Tensor:
    """Row 0: reset at t = 0 and inside; row 1: adjacent resets (and one at the last step); row 2: none."""
    R = torch.zeros(B, T, dtype=torch.bool)
    R[0, 0] = True
    for t in (2, 3, 4, 9, 10, 16):
        if t < T:
            R[1, t] = True
    for t in (3, 11):
        if t < T:
            R[0, t] = True
    if T > 1:
        R[1, T - 1] = True
    return R


def _inputs(cell, B, T, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, cell.num_inputs, D, generator=g, dtype=dtype)
    p = (torch.rand(cell.num_params, D, generator=g, dtype=dtype) * 2 - 1) * 0.5
    h0 = torch.randn(B, cell.state_size, D, generator=g, dtype=dtype) * 0.5
    return u, p, h0


def _loop_reference(cell, u, p, h0, R):
    """Per-row loop of the cell's step: state zeroed where R, h0 (or zero) at t = 0 otherwise."""
    B, T = R.shape
    ys, lasts = [], []
    for b in range(B):
        h = h0[b : b + 1] if h0 is not None else u.new_zeros(1, cell.state_size, u.shape[-1])
        row = []
        for t in range(T):
            if R[b, t]:
                h = torch.zeros_like(h)
            h = cell.step(h, u[b : b + 1, t], p)
            row.append(cell.output(h))
        ys.append(torch.stack(row, 1))
        lasts.append(h)
    return torch.cat(ys, 0), torch.cat(lasts, 0)


def _packed_reference(cell, u, p, h0, R, mode="sequential"):
    """The same documents through cu_seqlens on (1, B*T): per-document h0, last document per row."""
    B, T = R.shape
    starts = R.clone()
    starts[:, 0] = True
    flat = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat((flat, torch.tensor([B * T]))).to(torch.int32)
    docs_per_row = starts.sum(1)
    last_doc = docs_per_row.cumsum(0) - 1
    first_doc = last_doc - docs_per_row + 1
    h0_docs = None
    if h0 is not None:
        keep = (~R[:, 0]).to(h0.dtype)[:, None, None]
        h0_docs = h0.new_zeros(cu.numel() - 1, *h0.shape[1:]).index_copy(0, first_doc, h0 * keep)
    y, h_docs = parallel_rnn(cell, u.reshape(1, B * T, *u.shape[2:]), p, h0_docs, cu_seqlens=cu, mode=mode)
    return y.reshape(B, T, -1), h_docs[last_doc]


@pytest.fixture
def tiles(request):
    """'small': 16-channel blocks and 4 shooting segments, so resets fall inside and at the borders of
    segments, and D = 19 spans two channel blocks."""
    if request.param == "small":
        shooting.TUNING.update(segments=4, BD=16)
    yield request.param
    shooting.TUNING.clear()


# Every registered mode at the default tiles; the shooting kernels also at small tiles.
CASES = [(tiles, mode, cell, T, with_h0)
         for tiles in ("default", "small")
         for mode in sorted(MODES) if tiles == "default" or mode in SHOOTING_MODES
         for cell in ("paragru", "paralstm")
         for T in ((1, 5, 17) if tiles == "default" else (17,))
         for with_h0 in ((True, False) if tiles == "default" else (True,))]


def _close(got, ref, tol, what):
    err = (got.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} (scale {scale:.2f})"


@pytest.mark.parametrize("tiles, mode, cell_name, T, with_h0", CASES, indirect=["tiles"])
def test_resets_equal_the_loop_and_the_packed_path(tiles, mode, cell_name, T, with_h0):
    cell = CELLS[cell_name]()
    B, D = 3, (19 if tiles == "small" else 5)
    u, p, h0 = _inputs(cell, B, T, D, seed=T + 7 * with_h0)
    if not with_h0:
        h0 = None
    R = _resets(B, T)
    if not MODES[mode].available(cell, u):
        pytest.skip(f"{mode} cannot run {cell_name} here")
    dtype = torch.float64 if mode in FP64_MODES else torch.float32
    tol = 1e-10 if dtype == torch.float64 else 3e-5

    leaves = [x.clone().requires_grad_() for x in (u, p, h0) if x is not None]
    y_ref, h_ref = _loop_reference(cell, *(leaves + [None] * (3 - len(leaves))), R)
    g = torch.Generator().manual_seed(3)
    wy, wh = torch.randn(y_ref.shape, generator=g, dtype=torch.float64), torch.randn(h_ref.shape, generator=g, dtype=torch.float64)
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (h_ref * wh).sum(), leaves)

    args = [x.detach().to(dtype).requires_grad_() for x in leaves]
    y, h_last = parallel_rnn(cell, *(args + [None] * (3 - len(args))), resets=R, mode=mode)
    assert y.shape == (B, T, D) and h_last.shape == (B, cell.state_size, D)
    _close(y, y_ref, tol, "y")
    _close(h_last, h_ref, tol, "h_last")
    grads = torch.autograd.grad((y.double() * wy).sum() + (h_last.double() * wh).sum(), args)
    for got, ref, what in zip(grads, grads_ref, "uph"):
        _close(got, ref, 5 * tol, f"d{what}")
    if with_h0:
        assert torch.all(grads[2][0] == 0), "row 0 is reset at t = 0: h0[0] gets no gradient"
        assert grads[2][1:].abs().max() > 0

    # The cu_seqlens path on the same documents packed in one row, in the same mode.
    args2 = [x.detach().to(dtype).requires_grad_() for x in leaves]
    y_p, h_p = _packed_reference(cell, *(args2 + [None] * (3 - len(args2))), R, mode=mode)
    _close(y, y_p, tol, "y vs cu_seqlens")
    _close(h_last, h_p, tol, "h_last vs cu_seqlens")
    grads_p = torch.autograd.grad((y_p.double() * wy).sum() + (h_p.double() * wh).sum(), args2)
    for got, ref, what in zip(grads, grads_p, "uph"):
        _close(got, ref, 5 * tol, f"d{what} vs cu_seqlens")


def test_the_references_agree_and_resets_matter():
    # Guards the test itself: the loop and packed references agree, and resets change the answer.
    cell = ParaGRU()
    u, p, h0 = _inputs(cell, 3, 17, 5, seed=1)
    R = _resets(3, 17)
    y_loop, h_loop = _loop_reference(cell, u, p, h0, R)
    y_pack, h_pack = _packed_reference(cell, u, p, h0, R)
    torch.testing.assert_close(y_loop, y_pack, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_loop, h_pack, atol=1e-12, rtol=0)
    y_none, _ = parallel_rnn(cell, u, p, h0, mode="sequential")
    assert (y_none - y_loop).abs().max() > 1e-3
    torch.testing.assert_close(y_none[2], y_loop[2], atol=1e-12, rtol=0)  # row 2 has no reset


def test_all_false_resets_equal_no_resets():
    cell = ParaLSTM()
    u, p, h0 = _inputs(cell, 2, 9, 4, seed=2)
    R = torch.zeros(2, 9, dtype=torch.bool)
    for mode in ("sequential", "fused"):
        y0, h0_last = parallel_rnn(cell, u.float(), p.float(), h0.float(), mode=mode)
        y1, h1_last = parallel_rnn(cell, u.float(), p.float(), h0.float(), mode=mode, resets=R)
        torch.testing.assert_close(y1, y0, atol=1e-6, rtol=0)
        torch.testing.assert_close(h1_last, h0_last, atol=1e-6, rtol=0)


def test_resets_layout_builds_without_reading_values(monkeypatch):
    # The fused modes only need the start map; building it must not call nonzero / read values.
    R = _resets(3, 17)

    def sync(*_a, **_k):
        raise AssertionError("host sync while building the resets layout")

    monkeypatch.setattr(torch, "nonzero", sync)
    for name in ("__bool__", "item", "tolist", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    layout = SequenceLayout.build(3, 17, torch.device("cpu"), None, R)
    smap = layout.start_map()
    mask = layout.start_mask()
    monkeypatch.undo()
    assert layout.num_rows == 4 and layout.zero_row == 3 and not layout.rows_only
    expected = torch.where(R, 3, -1)
    expected[:, 0] = torch.where(R[:, 0], 3, torch.arange(3))
    assert smap.dtype == torch.int32 and torch.equal(smap, expected.to(torch.int32))
    assert torch.equal(mask, smap >= 0)
    # the lazily derived start lists (reference modes) describe the same starts
    assert torch.equal(layout.start_mask(), torch.zeros_like(mask).index_put((layout.start_b, layout.start_t), torch.tensor(True)))
    assert torch.equal(layout.start_row.to(torch.int32), smap[layout.start_b, layout.start_t])


def test_layer_forward_takes_resets():
    torch.manual_seed(0)
    layer = ParaGRULayer(8, 2, mode="sequential").double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    R = torch.zeros(2, 7, dtype=torch.bool)
    R[0, 4] = True
    y, h = layer(x, resets=R)
    y_a, _ = layer(x[:1, :4])
    y_b, h_b = layer(x[:1, 4:])
    torch.testing.assert_close(y[0], torch.cat((y_a[0], y_b[0])), atol=1e-12, rtol=0)
    torch.testing.assert_close(h[0], h_b[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("bad, err, match", [
    (lambda R: R.long(), TypeError, "resets must be a bool tensor"),
    (lambda R: R[:, :-1], ValueError, r"resets must have shape \(B, T\)"),
    (lambda R: R[None], ValueError, r"resets must have shape \(B, T\)"),
    (lambda R: R.tolist(), TypeError, "resets must be a"),
])
def test_bad_resets_raise(bad, err, match):
    cell = ParaGRU()
    u, p, _ = _inputs(cell, 2, 5, 3, seed=0)
    with pytest.raises(err, match=match):
        parallel_rnn(cell, u, p, resets=bad(torch.zeros(2, 5, dtype=torch.bool)), mode="sequential")


def test_resets_and_cu_seqlens_are_exclusive():
    cell = ParaGRU()
    u, p, _ = _inputs(cell, 1, 5, 3, seed=0)
    with pytest.raises(ValueError, match="at most one of cu_seqlens"):
        parallel_rnn(cell, u, p, cu_seqlens=torch.tensor([0, 2, 5]), resets=torch.zeros(1, 5, dtype=torch.bool))
