"""models/engine.py: the reference cell layer - what exported models run where the project is not
installed - computes what the engine's layer computes, with the same parameters."""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.models.engine import CELLS, ReferenceCellLayer, is_cell_layer, make_cell_layer

D, HEADS = 12, 3


def _pair(kind: str, mode: str):
    torch.manual_seed(0)
    engine = make_cell_layer(kind, D, HEADS, gain_bound=0.5, mode=mode, newton=None, bias=True, name="x").double()
    with torch.no_grad():  # a nonzero bias, so a dropped or doubled bias shows
        engine.bias.normal_()
    reference = ReferenceCellLayer(CELLS[kind](), D, HEADS).double()
    reference.load_state_dict(engine.state_dict())
    return engine, reference


def _assert_same(engine, reference, *args, **kwargs):
    x = args[0]
    outs = []
    for layer in (engine, reference):
        layer.zero_grad()
        xg = x.detach().requires_grad_()
        y, h = layer(xg, *args[1:], **kwargs)
        (y.square().sum() + h.sum()).backward()
        outs.append((y, h, xg.grad, [p.grad for p in layer.parameters()]))
    (y_e, h_e, gx_e, gp_e), (y_r, h_r, gx_r, gp_r) = outs
    torch.testing.assert_close(y_r, y_e, atol=1e-10, rtol=0)
    torch.testing.assert_close(h_r, h_e, atol=1e-10, rtol=0)
    torch.testing.assert_close(gx_r, gx_e, atol=1e-9, rtol=0)
    for g_r, g_e in zip(gp_r, gp_e):
        torch.testing.assert_close(g_r, g_e, atol=1e-9, rtol=0)
    return y_r


@pytest.mark.parametrize("mode", ["sequential", "newton_torch"])
@pytest.mark.parametrize("kind", ["paragru", "paralstm"])
def test_reference_layer_equals_engine_layer(kind, mode):
    engine, reference = _pair(kind, mode)
    assert is_cell_layer(engine) and is_cell_layer(reference)
    K = engine.state_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, D, dtype=torch.float64, generator=g)
    h0 = torch.randn(3, K, D, dtype=torch.float64, generator=g)
    _assert_same(engine, reference, x)
    _assert_same(engine, reference, x, h0)
    # packed documents (one of them empty), per-document and shared initial states
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    _assert_same(engine, reference, x[:1], torch.randn(3, K, D, dtype=torch.float64, generator=g), cu)
    _assert_same(engine, reference, x[:1], h0[:1], cu)
    # documents starting inside rows: the state restarts from zero there
    resets = torch.zeros(3, 9, dtype=torch.bool)
    resets[0, 0] = resets[0, 4] = resets[1, 2] = resets[1, 3] = True
    y_reset = _assert_same(engine, reference, x, h0, resets=resets)
    y_plain, _ = reference(x, h0)
    assert (y_plain[:2] - y_reset[:2]).abs().max() > 1e-3 and torch.equal(y_plain[2], y_reset[2])
    # the single decoding step is the shared base class's
    torch.testing.assert_close(reference.step(x[:, 0], h0), engine.step(x[:, 0], h0), atol=1e-12, rtol=0)
