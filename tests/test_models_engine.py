"""The export's stand-in cell layer (pure PyTorch, sequential) equals the kernels/ layer it replaces."""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.kernels import ParaGRULayer, ParaLSTMLayer
from pararnn_lm.kernels.cells import ParaGRU, ParaLSTM
from pararnn_lm.models.standalone_engine import SequentialCellLayer


@pytest.mark.parametrize("cell_cls, layer_cls", [(ParaGRU, ParaGRULayer), (ParaLSTM, ParaLSTMLayer)])
def test_standalone_layer_equals_kernels_layer(cell_cls, layer_cls):
    torch.manual_seed(0)
    ref = layer_cls(12, 3, mode="sequential").double()
    ours = SequentialCellLayer(cell_cls(), 12, 3).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    h0 = torch.randn(2, ref.state_size, 12, dtype=torch.float64)
    for args in ((x,), (x, h0)):
        y_ref, h_ref = ref(*args)
        y, h = ours(*args)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(h, h_ref)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    xp = x[:1]
    h0d = torch.randn(3, ref.state_size, 12, dtype=torch.float64)
    y_ref, h_ref = ref(xp, h0d, cu)
    y, h = ours(xp, h0d, cu)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    yt_ref, ht_ref = ref.step(x[:, 0], h0)
    yt, ht = ours.step(x[:, 0], h0)
    torch.testing.assert_close(yt, yt_ref)
    torch.testing.assert_close(ht, ht_ref)
