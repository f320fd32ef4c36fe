"""The per-head (block-diagonal) input projection x -> pre-activations, without layout copies.

``torch.einsum("...hi,higj->...ghj", x, W)`` runs one batched GEMM over heads, but it must first
permute x to (heads, tokens, i) and then the result from (heads, tokens, g, j) to the cell's
(tokens, g, heads, j) layout - full copies of the largest tensor of the layer (H100, (8, 2048,
1024) bf16, 16 heads: 0.19 ms forward, of which the GEMM is 0.05 ms), and back in the backward.
Here the forward's GEMMs read x and write u in place through strided views (a head's block of x
is a (tokens, head_dim) matrix with leading dimension dim; gate g of a head's block of u one with
leading dimension G * dim), one GEMM per gate; the backward makes one head-major copy of du so
that dx and dW are single GEMMs over all gates, dx written in place. Under ``torch.compile`` the
einsum is used instead (the compiler plans its own layouts).
"""
from __future__ import annotations

import torch


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """(N, H * dh) with unit channel stride -> the (H, N, dh) view of its head blocks."""
    return t.unflatten(-1, (H, -1)).transpose(0, 1)


class _HeadProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        H, _, G, _ = weight.shape
        N, D = x.shape
        u = x.new_empty(N, G, D)
        xh = _heads(x, H)
        for g in range(G):
            torch.bmm(xh, weight[:, :, g, :], out=_heads(u[:, g], H))
        ctx.save_for_backward(x, weight)
        return u

    @staticmethod
    def backward(ctx, du: torch.Tensor):
        x, weight = ctx.saved_tensors
        H, dh, G, _ = weight.shape
        N = x.shape[0]
        # The gradient GEMMs reduce over all G gates at once (K = G * dh for dx, fp32 accumulation
        # inside one GEMM; one wide dW GEMM per head): that needs du head-major, one copy of it.
        du_heads = du.reshape(N, G, H, dh).permute(2, 0, 1, 3).reshape(H, N, G * dh)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            torch.bmm(du_heads, weight.view(H, dh, G * dh).transpose(1, 2), out=_heads(dx, H))
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(weight)
            torch.bmm(_heads(x, H).transpose(1, 2), du_heads, out=dw.view(H, dh, G * dh))
        return dx, dw


def head_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., H * dh), weight (H, dh, G, dh) -> u (..., G, H * dh): u[..., g, h*dh + j] =
    sum_i x[..., h*dh + i] * weight[h, i, g, j]. Same dtype as x (cast the weight first)."""
    H, dh, G, dh2 = weight.shape
    if dh != dh2 or x.shape[-1] != H * dh:
        raise ValueError(f"head_projection: x (..., {H * dh}) and weight (H, dh, G, dh) expected, "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if torch.compiler.is_compiling():
        return torch.einsum("...hi,higj->...ghj", x.unflatten(-1, (H, dh)), weight).flatten(-2)
    lead = x.shape[:-1]
    u = _HeadProjection.apply(x.reshape(-1, H * dh), weight)
    return u.view(*lead, G, H * dh)
