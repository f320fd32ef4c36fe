"""torch.compile(fullgraph=True) through aot_eager, keeping the forward and backward graphs: shows which
library ops a compiled function calls (the custom ops' fakes are traced, nothing runs as eager fallback)."""
from __future__ import annotations

import torch


def compiled_with_graphs(fn):
    """(compiled fn, list that receives the forward graph and then, at the first backward, the backward graph)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep)), graphs


def called_ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
