"""The nn.Module layers: projection, gain bound, chunked processing, single-step decoding."""
import pytest
import torch

from pararnn_lm.kernels import NewtonConfig, ParaGRULayer, ParaLSTMLayer

LAYERS = {"paragru": ParaGRULayer, "paralstm": ParaLSTMLayer}


@pytest.fixture(params=list(LAYERS))
def layer(request):
    torch.manual_seed(0)
    return LAYERS[request.param](16, 4, mode="newton_torch", dtype=torch.float64)


def test_projection_is_block_diagonal_per_head(layer):
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    u = layer.project(x)
    G, H, hd = layer.cell.num_inputs, layer.num_heads, layer.head_dim
    # Dense equivalent: a (dim, G*dim) matrix that is zero outside each head's block.
    dense = torch.zeros(16, G, 16, dtype=torch.float64)
    for h in range(H):
        dense[h * hd:(h + 1) * hd, :, h * hd:(h + 1) * hd] = layer.weight[h]
    expected = torch.einsum("bti,igj->btgj", x, dense) + layer.bias
    torch.testing.assert_close(u, expected)


def test_gain_bound_holds_for_any_raw_parameters(layer):
    # Default: every gain |a_i| <= bound (the norm of diag(a)); gains within it pass unchanged.
    assert (layer.recurrent.abs() <= 0.5 + 1e-12).all()
    raw = torch.linspace(-2, 2, layer.recurrent.numel(), dtype=torch.float64).view_as(layer.recurrent)
    with torch.no_grad():
        layer.recurrent.copy_(raw)  # e.g. a large optimiser step
    torch.testing.assert_close(layer.recurrent_params(), raw.clamp(-0.5, 0.5), rtol=0, atol=1e-15)
    unbounded = LAYERS["paragru"](16, 4, gain_bound=None)
    with torch.no_grad():
        unbounded.recurrent.fill_(3.0)
    assert torch.equal(unbounded.recurrent_params(), unbounded.recurrent)


def test_row_gain_norm_bounds_each_parameter_row():
    torch.manual_seed(0)
    layer = ParaGRULayer(16, 4, gain_norm="row", dtype=torch.float64)
    assert torch.allclose(layer.recurrent.norm(dim=1), torch.full((3,), 0.5, dtype=torch.float64))
    raw = torch.randn(3, 16, dtype=torch.float64) * torch.tensor([[10.0], [0.01], [1.0]], dtype=torch.float64)
    with torch.no_grad():
        layer.recurrent.copy_(raw)
    row_norm = raw.pow(2).sum(1, keepdim=True).sqrt()
    expected = raw * torch.where(row_norm > 0.5, 0.5 / row_norm, torch.ones_like(row_norm))
    torch.testing.assert_close(layer.recurrent_params(), expected)
    with pytest.raises(ValueError, match="gain_norm"):
        ParaGRULayer(16, 4, gain_norm="spectral")


def test_chunked_processing_equals_one_pass(layer):
    x = torch.randn(2, 50, 16, dtype=torch.float64)
    y, h_last = layer(x)
    y1, h1 = layer(x[:, :17])
    y2, h2 = layer(x[:, 17:], h0=h1)
    torch.testing.assert_close(torch.cat((y1, y2), dim=1), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(h2, h_last, rtol=0, atol=1e-10)


def test_step_by_step_decoding_equals_parallel_forward(layer):
    x = torch.randn(3, 40, 16, dtype=torch.float64)
    y, h_last = layer(x)
    h, outs = None, []
    for t in range(x.shape[1]):
        y_t, h = layer.step(x[:, t], h)
        outs.append(y_t)
    torch.testing.assert_close(torch.stack(outs, dim=1), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(h, h_last, rtol=0, atol=1e-10)


def test_layer_gradients_match_sequential_mode(layer):
    x = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    layer.mode = "sequential"
    y_ref, _ = layer(x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *layer.parameters()])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def test_layer_reports_newton_stats_and_name():
    layer = ParaGRULayer(8, 2, name="model.layers.0.mixer", newton=NewtonConfig(max_iters=0, on_failure="raise"))
    with torch.no_grad():
        layer.recurrent.fill_(1.0)
    layer.gain_bound = None
    with pytest.raises(RuntimeError, match="model.layers.0.mixer"):
        layer(torch.randn(1, 30, 8))
    layer.newton = NewtonConfig()
    layer(torch.randn(1, 30, 8))
    assert layer.last_stats.converged and layer.last_stats.iterations >= 1
