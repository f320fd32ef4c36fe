"""Bad input gets a clear error before any work is done."""
import pytest
import torch
from cells_for_tests import make_inputs

from pararnn_lm.kernels import NewtonConfig, ParaGRU, ParaGRULayer, ParaLSTM, parallel_rnn


@pytest.fixture
def gru_inputs():
    cell = ParaGRU()
    u, p, h0 = make_inputs(cell, 2, 10, 4, dtype=torch.float32, requires_grad=False)
    return cell, u, p, h0


def test_wrong_rank_of_u(gru_inputs):
    cell, u, p, _ = gru_inputs
    with pytest.raises(ValueError, match=r"u must be a 4-D tensor \(B, T, G=3, D\) for ParaGRU, got \(2, 10, 12\)"):
        parallel_rnn(cell, u.flatten(2), p)


def test_wrong_number_of_gates(gru_inputs):
    cell, u, p, _ = gru_inputs
    with pytest.raises(ValueError, match="u has 2 pre-activations per channel .* takes G=3"):
        parallel_rnn(cell, u[:, :, :2], p)


def test_wrong_parameter_shape(gru_inputs):
    cell, u, p, _ = gru_inputs
    with pytest.raises(ValueError, match=r"p must have shape \(P=3, D=4\) for ParaGRU, got \(3, 5\)"):
        parallel_rnn(cell, u, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="needs parameters p"):
        parallel_rnn(cell, u, None)


def test_wrong_h0_shape(gru_inputs):
    cell, u, p, h0 = gru_inputs
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 1, 4\) for ParaGRU, got \(2, 2, 4\)"):
        parallel_rnn(cell, u, p, h0.expand(2, 2, 4))


def test_integer_u_rejected(gru_inputs):
    cell, u, p, _ = gru_inputs
    with pytest.raises(TypeError, match="floating-point"):
        parallel_rnn(cell, u.long(), p)


def test_not_a_cell(gru_inputs):
    _, u, p, _ = gru_inputs
    with pytest.raises(TypeError, match="kernels.Cell instance"):
        parallel_rnn(lambda h, u, p: h, u, p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_caught_and_check_is_configurable(gru_inputs, bad):
    cell, u, p, _ = gru_inputs
    u = u.clone()
    u[1, 3, 0, 2] = bad
    with pytest.raises(ValueError, match="u contains NaN or Inf values"):
        parallel_rnn(cell, u, p)
    p_bad = p.clone()
    p_bad[0, 0] = bad
    with pytest.raises(ValueError, match="p contains NaN or Inf"):
        parallel_rnn(cell, u.nan_to_num(), p_bad)
    # With validation off the call goes through (the caller asked for speed over checks).
    y, _ = parallel_rnn(cell, u, p, mode="sequential", newton=NewtonConfig(validate=False))
    assert y.shape == (2, 10, 4)


def test_cu_seqlens_must_cover_T():
    cell = ParaLSTM()
    u, p, _ = make_inputs(cell, 1, 10, 4, requires_grad=False)
    with pytest.raises(ValueError, match="end at T=10, got 0..8"):
        parallel_rnn(cell, u, p, cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="start at 0"):
        parallel_rnn(cell, u, p, cu_seqlens=torch.tensor([1, 3, 10]))
    with pytest.raises(ValueError, match="non-decreasing"):
        parallel_rnn(cell, u, p, cu_seqlens=torch.tensor([0, 6, 3, 10]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        parallel_rnn(cell, u, p, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match="at least 2 entries"):
        parallel_rnn(cell, u, p, cu_seqlens=torch.tensor([0]))


def test_cu_seqlens_needs_batch_of_one():
    cell = ParaGRU()
    u, p, _ = make_inputs(cell, 2, 10, 4, requires_grad=False)
    with pytest.raises(ValueError, match="B == 1, got B=2"):
        parallel_rnn(cell, u, p, cu_seqlens=torch.tensor([0, 4, 10]))


def test_cu_seqlens_h0_rows_must_match_documents():
    cell = ParaGRU()
    u, p, _ = make_inputs(cell, 1, 10, 4, requires_grad=False)
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 1, 4\) or \(2, 1, 4\)"):
        parallel_rnn(cell, u, p, torch.zeros(3, 1, 4), cu_seqlens=torch.tensor([0, 4, 10]))


def test_layer_dim_must_divide_into_heads():
    with pytest.raises(ValueError, match=r"dim \(10\) must be a positive multiple of num_heads \(4\)"):
        ParaGRULayer(10, 4)


def test_layer_input_width_checked():
    layer = ParaGRULayer(8, 2)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, T, dim\) with dim=8, got \(2, 5, 6\)"):
        layer(torch.zeros(2, 5, 6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_iters": -1}, "max_iters"),
        ({"tol": 0.0}, "tol"),
        ({"damping": 0.0}, "damping"),
        ({"damping": 1.5}, "damping"),
        ({"on_failure": "ignore"}, "on_failure"),
    ],
)
def test_bad_newton_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NewtonConfig(**kwargs)
