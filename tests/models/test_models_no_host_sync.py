"""A training step of every mixer makes no host sync when the batch is one document per row.

A host sync (``bool(t)``, ``t.item()``, ``t.tolist()``) inside forward/backward breaks CUDA-graph capture
(the synthetic trainer replays whole steps as graphs) and stalls the GPU in every step. The fused RNN
kernels run here in Triton's CPU interpreter, the same code path as on a GPU; the tensor methods that
read values back are replaced by a function that raises, so any sync fails the test with its stack.
"""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.models import build_synthetic_model


class HostSync(AssertionError):
    pass


@pytest.fixture
def forbid_host_sync(monkeypatch):
    def sync(*_args, **_kwargs):
        raise HostSync("a tensor value was read on the host during the step")

    def start():
        for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, sync)

    return start


@pytest.mark.parametrize("mixer", ["paragru", "paralstm", "attention", "mamba2"])
@pytest.mark.parametrize("bare", [True, False])
def test_training_step_has_no_host_sync(mixer, bare, forbid_host_sync):
    mode = {"rnn_mode": "fused"} if mixer.startswith("para") else {}
    model = build_synthetic_model(mixer, vocab_size=10, bare_mixer=bare, d_model=32, num_heads=4, **mode)
    ids = torch.randint(0, 10, (2, 12))
    forbid_host_sync()
    loss = model(ids).logits.float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("mixer", ["paragru", "paralstm"])
@pytest.mark.parametrize("bare", [True, False])
def test_packed_training_step_of_rnn_mixers_has_no_host_sync(mixer, bare, forbid_host_sync, monkeypatch):
    # Documents packed inside rows (position_ids restart at 0): the RNN mixers hand the starts to the
    # fused kernels as a device-side start map; nothing reads them back (no nonzero, no bool()), and
    # the cell layer sees the (B, T) batch, not a (1, B*T) packed row.
    import pararnn_lm.kernels.layers as cell_layers

    model = build_synthetic_model(mixer, vocab_size=10, bare_mixer=bare, d_model=32, num_heads=4, rnn_mode="fused")
    ids = torch.randint(0, 10, (2, 12))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 0, 1, 2, 3, 4], [5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    seen = []
    engine = cell_layers.parallel_rnn

    def spy(cell, u, *args, **kwargs):
        seen.append((tuple(u.shape[:2]), kwargs.get("resets") is not None, args[2] if len(args) > 2 else None))
        return engine(cell, u, *args, **kwargs)

    monkeypatch.setattr(cell_layers, "parallel_rnn", spy)
    forbid_host_sync()

    def nonzero(*_args, **_kwargs):
        raise HostSync("torch.nonzero (a host sync) during the step")

    monkeypatch.setattr(torch, "nonzero", nonzero)
    monkeypatch.setattr(torch.Tensor, "nonzero", nonzero)
    loss = model(ids, position_ids=pos).logits.float().pow(2).mean()
    loss.backward()
    monkeypatch.undo()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert seen and all(s == ((2, 12), True, None) for s in seen), seen


def test_packed_position_ids_still_detect_document_starts():
    # the exemption above is only for positions the model builds itself; given positions are inspected
    model = build_synthetic_model("paragru", vocab_size=10, bare_mixer=True, d_model=32, num_heads=4).eval()
    ids = torch.randint(0, 10, (1, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits
        first, second = model(ids[:, :5]).logits, model(ids[:, 5:]).logits
    torch.testing.assert_close(packed, torch.cat([first, second], 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", ["paragru", "attention"])
def test_compiled_blocks_share_one_graph(mixer):
    # train.compile compiles every decoder block; a per-layer constant reaching the trace (the cell's
    # name once did) recompiles each layer, and past dynamo's recompile limit the rest run eagerly.
    import torch._dynamo

    from pararnn_lm.models import ParaRNNLMForCausalLM, config_for

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    mode = {"rnn_mode": "fused"} if mixer.startswith("para") else {}
    model = ParaRNNLMForCausalLM(config_for(mixer, "debug", num_hidden_layers=3, **mode))
    for block in model.model.layers:
        block.compile(backend=counting_backend)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 identical blocks"
