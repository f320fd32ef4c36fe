"""The sequence mixers: ParaGRU / ParaLSTM (paper Fig. 9), Mamba2, attention. Registered by name.

Every mixer: ``forward(x (B, T, d), seq, cache, attn_mask) -> (B, T, d)``; with a cache it reads
its state (if a previous call left one) and writes the state after the chunk, so prefill runs the
parallel path and decoding continues from its final states with O(1) work per token. For decoding
with static buffers every mixer also has ``allocate_inference_state`` and a one-token ``step``
(models/inference.py); the recurrent mixers run that same step when the cache path gets one token, and
their ``step_constants`` (what the step reads that depends only on the weights) are computed once per
cached forward and kept in the cache and the state.

Init (DCLM / open_lm style, applied by ``ParaRNNLMPreTrainedModel._init_weights``): input-side projections truncated-normal (+-3 std)
with std = 1/sqrt(fan_in); residual-branch output projections additionally / sqrt(2 (layer_idx+1));
convs keep PyTorch's default; the cell layer keeps its own init (Kaiming-uniform input heads, small
Xavier recurrent gains clipped to the bound); Mamba2's dt_bias / A_log / D as in Mamba2.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import flex_attention, is_block_mask
from .engine import make_cell_layer
from .inference import InferenceState, RecurrentState, TokenPosition, compute_dtype
from .layers import CausalConv1d, GatedRMSNorm, RotaryEmbedding, apply_rope, mark_residual_output
from .registry import register_mixer
from .ssd import SSD_KERNELS, resolve_ssd_backend, ssd_chunked, ssd_step

log = logging.getLogger(__name__)


class ParaRNNMixer(nn.Module):
    """in_proj (d -> 2 di: x, z) -> causal conv + SiLU -> cell -> RMSNorm(y * silu(z)) -> out_proj.

    With ``config.bare_mixer`` only the cell layer remains (dim = hidden_size), as in the paper's
    keep-nth and parity experiments.
    """

    def __init__(self, kind: str, config, layer_idx: int) -> None:
        super().__init__()
        self.kind, self.layer_idx, self.bare = kind, layer_idx, config.bare_mixer
        d = config.hidden_size
        di = d if self.bare else config.rnn_inner_size
        self.cell = make_cell_layer(
            kind, di, config.rnn_heads, gain_bound=config.rnn_gain_bound, gain_norm=config.rnn_gain_norm,
            mode=config.rnn_mode,
            newton=config.rnn_newton, bias=config.rnn_bias, name=f"model.layers.{layer_idx}.mixer.cell",
        )
        if not self.bare:
            self.in_proj = nn.Linear(d, 2 * di, bias=False)
            self.conv = CausalConv1d(di, config.conv_kernel)
            self.norm = GatedRMSNorm(di, eps=config.rms_norm_eps)
            self.out_proj = mark_residual_output(nn.Linear(di, d, bias=False), layer_idx)

    def _run_cell(self, u: torch.Tensor, seq, h0: torch.Tensor | None,
                  y_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if seq.known_one_document_per_row:  # no document starts after t = 0: the compact start map
            return self.cell(u, seq.masked_initial(h0), y_dtype=y_dtype)
        # Documents may start inside rows: each start restarts from zero (the first step from the carried
        # state unless it starts a document). The engine reads ``resets`` on the device only (no host
        # sync, no packing into one row); h is each row's last step.
        return self.cell(u, h0, resets=seq.resets, y_dtype=y_dtype)

    def forward(self, x: torch.Tensor, seq, cache=None, attn_mask=None) -> torch.Tensor:
        state = cache.recurrent_layer(self.layer_idx) if cache is not None else None
        ctx, h0 = state.get_state() if state is not None else (None, None)
        if h0 is not None and x.shape[1] == 1:  # decoding: one step from the cached state, updated in place
            step_state = RecurrentState(ctx, h0, state.constants)
            return self.step(x[:, 0], step_state, TokenPosition(seq.positions[:, 0])).unsqueeze(1)
        if self.bare:
            y, h = self._run_cell(x, seq, h0)
            if state is not None:
                state.set_state(None, h, self.step_constants(x.dtype))
            return y
        # One GEMM per half of in_proj's weight (the values of in_proj(x).chunk(2)): the backward then
        # gets du and dz as two tensors and sums du W_u + dz W_z, where the chunk's backward would copy
        # both into one (.., 2 inner) gradient first.
        w_u, w_z = self.in_proj.weight.chunk(2)
        u, z = F.linear(x, w_u), F.linear(x, w_z)
        u, new_ctx = self.conv(u, seq.positions, ctx, silu=True)
        # The fused norm reads the recurrence's fp32 trajectory as it is: no rounded copy of y is written,
        # read, kept for the backward, or cast back in it.
        y, h = self._run_cell(u, seq, h0, compute_dtype(u.dtype) if self.norm.reads_fp32(z) else None)
        if state is not None:
            state.set_state(new_ctx, h, self.step_constants(x.dtype))
        return self.out_proj(self.norm(y, z))

    def step_constants(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What :meth:`step` reads that depends only on the weights: the gain-bounded recurrent
        parameters (P, inner) in the compute dtype (fp32, fp64 for fp64 models)."""
        return {"recurrent": self.cell.recurrent_params().detach().to(compute_dtype(dtype))}

    def allocate_inference_state(self, batch_size: int, max_length: int, dtype: torch.dtype,
                                 device: torch.device) -> RecurrentState:
        """The conv window (B, K-1, inner), the cell state (B, K, inner) in fp32 (fp64 for fp64) and
        the step's constants (refreshed from the weights at every ``load``)."""
        window = None if self.bare else self.conv.allocate_inference_state(batch_size, dtype, device)
        h = torch.zeros(batch_size, self.cell.state_size, self.cell.dim, dtype=compute_dtype(dtype), device=device)
        constants = {name: value.to(device).clone() for name, value in self.step_constants(dtype).items()}
        return RecurrentState(window, h, constants)

    def step(self, x_t: torch.Tensor, state: RecurrentState, position: TokenPosition) -> torch.Tensor:
        """One token (B, d) -> (B, d): the forward's operations, with the cell's single step (no Newton).
        Reads the recurrent parameters from ``state.constants`` (computed here where it has none)."""
        recurrent = state.constants.get("recurrent")
        if self.bare:
            y, h = self.cell.step(x_t, position.carried(state.state), recurrent)
            state.state.copy_(h.detach())
            return y
        u, z = self.in_proj(x_t).chunk(2, dim=-1)
        u = self.conv.step(u, state.conv_window, position.positions, silu=True)
        y, h = self.cell.step(u, position.carried(state.state), recurrent)
        state.state.copy_(h.detach())
        return self.out_proj(self.norm(y, z))


@register_mixer("paragru")
def _paragru(config, layer_idx: int) -> nn.Module:
    return ParaRNNMixer("paragru", config, layer_idx)


@register_mixer("paralstm")
def _paralstm(config, layer_idx: int) -> nn.Module:
    return ParaRNNMixer("paralstm", config, layer_idx)


@register_mixer("mamba2")
class Mamba2Mixer(nn.Module):
    """Standard Mamba2 layer: in_proj -> (z, xBC, dt); causal conv + SiLU on xBC; SSD with D skip;
    RMSNorm(y * silu(z)); out_proj. ``bare_mixer``: in_proj -> (x, B, C, dt) -> SSD -> out_proj."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx, self.bare = config, layer_idx, config.bare_mixer
        d = config.hidden_size
        self.di, self.H, self.P = config.mamba_inner_size, config.mamba_num_heads, config.mamba_headdim
        self.G, self.N = config.mamba_ngroups, config.mamba_d_state
        self.conv_dim = self.di + 2 * self.G * self.N
        self.in_proj = nn.Linear(d, (0 if self.bare else self.di) + self.conv_dim + self.H, bias=False)
        if not self.bare:
            self.conv = CausalConv1d(self.conv_dim, config.conv_kernel)
            self.norm = GatedRMSNorm(self.di, eps=config.rms_norm_eps)
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        self.out_proj = mark_residual_output(nn.Linear(self.di, d, bias=False), layer_idx)
        self.backend = config.ssd_backend
        self.init_ssm_params()

    def init_ssm_params(self) -> None:
        c = self.config
        with torch.no_grad():
            # dt ~ log-uniform in [dt_min, dt_max], stored through the inverse softplus.
            u = torch.rand(self.H, device=self.dt_bias.device) if self.dt_bias.device.type != "meta" else None
            if u is not None:
                dt = torch.exp(u * (math.log(c.mamba_dt_max) - math.log(c.mamba_dt_min)) + math.log(c.mamba_dt_min))
                dt = dt.clamp(min=c.mamba_dt_init_floor)
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                lo, hi = c.mamba_A_init_range
                self.A_log.copy_(torch.log(torch.empty(self.H, device=u.device).uniform_(lo, hi)))
                self.D.fill_(1.0)

    def kernel_backend(self, x: torch.Tensor) -> str:
        """``torch`` (chunked PyTorch SSD) or the ``SSD_KERNELS`` entry that runs this input. ``auto``
        keeps fp64 (reference runs) on the PyTorch SSD: the Triton kernels compute in fp32."""
        if self.backend == "auto" and x.dtype == torch.float64:
            return "torch"
        return resolve_ssd_backend(self.backend, x.device)

    def _split(self, proj: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """in_proj's output -> z (None when bare), xBC (before the conv), dt (before the softplus)."""
        if self.bare:
            xBC, dt = proj.split([self.conv_dim, self.H], dim=-1)
            return None, xBC, dt
        return proj.split([self.di, self.conv_dim, self.H], dim=-1)

    def step_constants(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The SSM parameters as the recurrence reads them, in the compute dtype (fp32, fp64 for fp64
        models): ``dt_bias``, the decay rates ``A`` = -exp(A_log) and the skip ``D``. The forward
        differentiates through them; :meth:`step` reads the copies its state keeps."""
        compute = compute_dtype(dtype)
        return {"dt_bias": self.dt_bias.to(compute), "A": -torch.exp(self.A_log.to(compute)), "D": self.D.to(compute)}

    @staticmethod
    def _step_sizes(dt: torch.Tensor, constants: dict[str, torch.Tensor]) -> torch.Tensor:
        """softplus(dt + dt_bias) in the compute dtype."""
        dt_bias = constants["dt_bias"]
        return F.softplus(dt.to(dt_bias.dtype) + dt_bias)

    def _output(self, y: torch.Tensor, xs: torch.Tensor, z: torch.Tensor | None, dtype: torch.dtype,
                D: torch.Tensor) -> torch.Tensor:
        """SSD output (..., H, P) + D skip -> gated norm (unless bare) -> out_proj."""
        y = (y + xs * D[:, None]).reshape(*y.shape[:-2], self.di)
        if self.bare or not self.norm.reads_fp32(z):
            y = y.to(dtype)
        return self.out_proj(y if self.bare else self.norm(y, z))

    def forward(self, x: torch.Tensor, seq, cache=None, attn_mask=None) -> torch.Tensor:
        B, T, _ = x.shape
        state = cache.recurrent_layer(self.layer_idx) if cache is not None else None
        ctx, S0 = state.get_state() if state is not None else (None, None)
        if S0 is not None and T == 1:  # decoding: one step from the cached state, updated in place
            step_state = RecurrentState(ctx, S0, state.constants)
            return self.step(x[:, 0], step_state, TokenPosition(seq.positions[:, 0])).unsqueeze(1)
        z, xBC, dt = self._split(self.in_proj(x))
        new_ctx = None
        if not self.bare:
            xBC, new_ctx = self.conv(xBC, seq.positions, ctx, silu=True)
        xs, Bm, Cm = xBC.split([self.di, self.G * self.N, self.G * self.N], dim=-1)
        compute = compute_dtype(x.dtype)
        xs = xs.reshape(B, T, self.H, self.P)
        Bm, Cm = Bm.reshape(B, T, self.G, self.N), Cm.reshape(B, T, self.G, self.N)
        constants = self.step_constants(x.dtype)
        dt, A = self._step_sizes(dt, constants), constants["A"]
        if (backend := self.kernel_backend(x)) != "torch":
            kernel = SSD_KERNELS[backend][1]
            y, S = kernel(xs, dt, A, Bm, Cm, None if S0 is None else S0.float(), seq.resets, seq)
            y, S = y.to(compute), S.to(compute)
        else:
            y, S = ssd_chunked(xs.to(compute), dt, A, Bm.to(compute), Cm.to(compute),
                               None if S0 is None else S0.to(compute), seq.resets, self.config.mamba_chunk_size)
        if state is not None:
            state.set_state(new_ctx, S, constants)
        return self._output(y, xs.to(compute), z, x.dtype, constants["D"])

    def allocate_inference_state(self, batch_size: int, max_length: int, dtype: torch.dtype,
                                 device: torch.device) -> RecurrentState:
        """The conv window (B, K-1, conv_dim), the SSM state (B, H, P, N) in fp32 (fp64 for fp64) and
        the step's constants (refreshed from the weights at every ``load``)."""
        window = None if self.bare else self.conv.allocate_inference_state(batch_size, dtype, device)
        S = torch.zeros(batch_size, self.H, self.P, self.N, dtype=compute_dtype(dtype), device=device)
        constants = {name: value.detach().to(device).clone() for name, value in self.step_constants(dtype).items()}
        return RecurrentState(window, S, constants)

    def step(self, x_t: torch.Tensor, state: RecurrentState, position: TokenPosition) -> torch.Tensor:
        """One token (B, d) -> (B, d): the forward's operations with the SSD's single step. Reads the SSM
        constants from ``state.constants`` (computed here where it has none)."""
        B, compute = x_t.shape[0], compute_dtype(x_t.dtype)
        constants = state.constants or self.step_constants(x_t.dtype)
        z, xBC, dt = self._split(self.in_proj(x_t))
        if not self.bare:
            xBC = self.conv.step(xBC, state.conv_window, position.positions, silu=True)
        xs, Bm, Cm = xBC.split([self.di, self.G * self.N, self.G * self.N], dim=-1)
        xs = xs.reshape(B, self.H, self.P).to(compute)
        Bm, Cm = Bm.reshape(B, self.G, self.N).to(compute), Cm.reshape(B, self.G, self.N).to(compute)
        dt = self._step_sizes(dt, constants)
        y, S = ssd_step(position.carried(state.state).to(compute), xs, dt, constants["A"], Bm, Cm)
        state.state.copy_(S.detach())
        return self._output(y, xs, z, x_t.dtype, constants["D"])


@dataclass
class KVState(InferenceState):
    """An attention layer's decoding buffers: ``max_length`` key/value slots and which of them the
    current token may attend to (the keys of its own document)."""

    keys: torch.Tensor  # (B, Hkv, max_length, head_dim)
    values: torch.Tensor  # (B, Hkv, max_length, head_dim)
    valid: torch.Tensor  # (B, max_length) bool
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # RoPE's inv_freq (from the config alone)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def load(self, cache, layer_idx: int) -> None:
        layer = cache.layers[layer_idx]
        S = layer.keys.shape[2]
        self.keys[:, :, :S].copy_(layer.keys)
        self.values[:, :, :S].copy_(layer.values)
        doc = cache.doc_ids
        self.valid.zero_()
        self.valid[:, :S].copy_(doc == doc[:, -1:])


@register_mixer("attention")
class AttentionMixer(nn.Module):
    """Causal multi-head attention with RoPE (positions restart per document) and optional GQA.

    Paths: SDPA ``is_causal`` (one document per row), FlexAttention with a ``BlockMask`` (packed rows in
    training; models/attention.py), SDPA with a dense boolean mask (cache, CPU, no FlexAttention)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.H, self.Hkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(d, self.H * self.hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.Hkv * self.hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.Hkv * self.hd, bias=config.attention_bias)
        self.o_proj = mark_residual_output(nn.Linear(self.H * self.hd, d, bias=config.attention_bias), layer_idx)
        self.rope = RotaryEmbedding(self.hd, config.rope_theta)

    def forward(self, x: torch.Tensor, seq, cache=None, attn_mask=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.Hkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.Hkv, self.hd).transpose(1, 2)
        cos, sin = self.rope(seq.positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if is_block_mask(attn_mask):  # packed rows, no cache: FlexAttention's block-sparse document mask
            if cache is not None:
                raise ValueError("the FlexAttention path takes no cache (the model keeps SDPA for cached forwards)")
            out = flex_attention(q, k, v, attn_mask, enable_gqa=self.Hkv != self.H)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.hd))
        if cache is not None:
            k, v = cache.layers[self.layer_idx].update(k, v)
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        if attn_mask is None:  # one document per row, no cached prefix: plain causal (flash path on GPU)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.hd))

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        """GQA: (B, Hkv, S, hd) -> (B, H, S, hd), query head h reading kv head h // (H / Hkv)."""
        return t if self.Hkv == self.H else t.repeat_interleave(self.H // self.Hkv, dim=1)

    def allocate_inference_state(self, batch_size: int, max_length: int, dtype: torch.dtype,
                                 device: torch.device) -> KVState:
        shape = (batch_size, self.Hkv, max_length, self.hd)
        return KVState(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                       torch.zeros(batch_size, max_length, dtype=torch.bool, device=device),
                       {"inv_freq": self.rope.inv_freq(device)})

    def step(self, x_t: torch.Tensor, state: KVState, position: TokenPosition) -> torch.Tensor:
        """One token (B, d) -> (B, d): its key and value go to slot ``position.slot``; it attends to the
        valid slots (SDPA with the boolean mask over all ``max_length`` slots: static shapes)."""
        B = x_t.shape[0]
        q = self.q_proj(x_t).view(B, self.H, 1, self.hd)
        k = self.k_proj(x_t).view(B, self.Hkv, 1, self.hd)
        v = self.v_proj(x_t).view(B, self.Hkv, 1, self.hd)
        cos, sin = self.rope(position.positions.unsqueeze(1), state.constants.get("inv_freq"))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        state.keys.index_copy_(2, position.slot, k)
        state.values.index_copy_(2, position.slot, v)
        state.valid.logical_and_(position.continues.unsqueeze(1))  # a new document sees no earlier key
        state.valid.index_fill_(1, position.slot, True)
        out = F.scaled_dot_product_attention(q, self._repeat_kv(state.keys), self._repeat_kv(state.values),
                                             attn_mask=state.valid[:, None, None, :])
        return self.o_proj(out.reshape(B, self.H * self.hd))
