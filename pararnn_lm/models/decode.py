"""Static-shape single-token decoding for ParaRNNLM models, capturable in one CUDA graph.

    from pararnn_lm.models import StaticDecoder
    dec = StaticDecoder(model, batch_size=1, max_length=2048)   # CUDA graph on CUDA, eager on CPU
    ids = dec.generate(prompt, max_new_tokens=256)                # == model.generate(..., do_sample=False)
    logits = dec.prefill(prompt)                                  # (B, V) logits of the last prompt token
    logits = dec.step(next_ids)                                   # (B, V) teacher-forced, one token per row

Why: ``model.generate`` decodes through the HF loop and the model's general forward (positions,
masks, cache bookkeeping, a few hundred small kernels and host syncs per token). Here every layer's
state lives in a buffer allocated once (per row: the causal conv window of the last K-1 inputs, the
ParaRNN cell state (K, D) or the Mamba2 SSM state (H, P, N) in fp32, and for attention layers a static
KV buffer of ``max_length`` slots with a key-validity mask), and one decode step is a fixed sequence
of tensor ops that reads the current token from ``self.token`` and writes the logits, the greedy next
token (back into ``self.token``) and the generated-token buffer. Nothing in the step depends on host
values, so on CUDA the whole step (embedding -> all layers -> head -> argmax) is captured once with
``torch.cuda.CUDAGraph`` and replayed: no Python work, no allocator calls and no host sync per token
(the graph's intermediates live in its private memory pool). On CPU the same step runs eagerly.

Numerics: the step calls the model's own modules (norms, projections, ``cell.project``/``cell.step``,
``ssd_step``, RoPE, SDPA) in the model's operation order, so in eager mode it reproduces the model's
cached decoding path (greedy tokens exactly, logits to rounding). ``compile=True`` additionally runs the
step through ``torch.compile`` (inductor fuses the elementwise chains: RMSNorms, conv taps, the cell
step) before graph capture; fused fp32 arithmetic then differs from eager in the last bits.

Scope: every mixer (paragru, paralstm, mamba2, attention) and hybrid stacks; padded prompts
(``attention_mask``) work as in ``model.generate`` (the prefill runs the model's parallel path and its
cache provides each row's position and, for attention, which cached keys belong to the current
document). Not supported: ``bare_mixer`` models, sampling, beams, stopping at EOS (generation always
runs ``max_new_tokens`` steps; ``generate`` of HF would pad after EOS instead).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import apply_rope
from .ssd import ssd_step


@dataclass
class _ConvState:
    weight: torch.Tensor  # (C, K) in the activation dtype
    bias: torch.Tensor  # (C,)
    window: torch.Tensor  # (B, K-1, C): the last K-1 inputs


@dataclass
class _RNNLayerState:
    conv: _ConvState
    h: torch.Tensor  # (B, K_state, D) fp32 (fp64 for fp64 models)
    p: torch.Tensor  # (P, D) recurrent parameters after the gain bound, compute dtype


@dataclass
class _MambaLayerState:
    conv: _ConvState
    S: torch.Tensor  # (B, H, P, N) compute dtype
    dt_bias: torch.Tensor  # (H,) compute dtype
    A: torch.Tensor  # (H,) = -exp(A_log)
    D: torch.Tensor  # (H,)


@dataclass
class _AttnLayerState:
    k: torch.Tensor  # (B, Hkv, L, hd)
    v: torch.Tensor  # (B, Hkv, L, hd)


class StaticDecoder:
    """Greedy / teacher-forced batch decoding of a :class:`ParaRNNLMForCausalLM` with static buffers.

    Args:
        model: the causal LM (any dtype; put it in eval mode and on its device first; weights must not
            change while the decoder is used: recurrent parameters and SSM constants are cached).
        batch_size: rows decoded together (fixed: buffers and the captured graph have this shape).
        max_length: KV slots per attention layer (prompt + generated tokens); unused without attention.
        cuda_graph: capture the step in a CUDA graph (default: when the model is on CUDA).
        compile: ``True``/``"block"``: one ``torch.compile``d block function (a single graph reused by
            every layer of the same mixer, short compilation); ``"step"``: the whole step as one graph.
        max_new_tokens: capacity of the generated-token buffer (``generate`` grows it when needed,
            which re-captures the graph).
    """

    def __init__(self, model, batch_size: int = 1, max_length: int = 2048, cuda_graph: bool | None = None,
                 compile: bool = False, max_new_tokens: int = 1024) -> None:
        cfg = model.config
        if cfg.bare_mixer:
            raise NotImplementedError("StaticDecoder does not support bare_mixer models; use model.generate")
        self.model = model
        self.config = cfg
        self.B, self.max_length = batch_size, max_length
        self.device = model.lm_head.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        if "attention" in cfg.mixers and max_length < 8:
            raise ValueError(f"max_length must be >= 8 (KV slots), got {max_length}")
        self.compute = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        if compile not in (False, True, "block", "step"):
            raise ValueError(f"compile must be False, True, 'block' or 'step', got {compile!r}")
        self.compile = "block" if compile is True else compile
        self._block_fn = self._block
        dev, B = self.device, batch_size
        self.token = torch.zeros(B, dtype=torch.long, device=dev)  # input of the next step / greedy output
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)  # position of the last processed token
        self.cur = torch.zeros(1, dtype=torch.long, device=dev)  # KV slot of the next token
        self.gen_idx = torch.zeros(1, dtype=torch.long, device=dev)  # next column of self.generated
        self.logits = torch.zeros(B, cfg.vocab_size, dtype=self.dtype, device=dev)
        # ring buffer of greedy tokens (generate() reads its first n-1 columns; >= 8 for warm-up + capture)
        self.generated = torch.zeros(B, max(max_new_tokens, 8), dtype=torch.long, device=dev)
        self.has_attention = "attention" in cfg.mixers
        self.valid = torch.zeros(B, max_length if self.has_attention else 1, dtype=torch.bool, device=dev)
        self.states: list = []
        self._filled = 0  # tokens in the KV buffers (host-side mirror of self.cur)
        with torch.no_grad():
            for block in model.model.layers:
                self.states.append(self._make_state(block))
        self._graph: torch.cuda.CUDAGraph | None = None
        self._step_fn = None

    # ------------------------------------------------------------------ buffers
    def _conv_state(self, conv) -> _ConvState:
        K, C = conv.kernel, conv.conv.weight.shape[0]
        return _ConvState(weight=conv.conv.weight[:, 0, :].detach().to(self.dtype).clone(),
                          bias=conv.conv.bias.detach().to(self.dtype).clone(),
                          window=torch.zeros(self.B, K - 1, C, dtype=self.dtype, device=self.device))

    def _make_state(self, block):
        kind, mixer = block.mixer_type, block.mixer
        if kind in ("paragru", "paralstm"):
            cell = mixer.cell
            return _RNNLayerState(
                conv=self._conv_state(mixer.conv),
                h=torch.zeros(self.B, cell.state_size, cell.dim, dtype=self.compute, device=self.device),
                p=cell.recurrent_params().detach().to(self.compute).clone())
        if kind == "mamba2":
            return _MambaLayerState(
                conv=self._conv_state(mixer.conv),
                S=torch.zeros(self.B, mixer.H, mixer.P, mixer.N, dtype=self.compute, device=self.device),
                dt_bias=mixer.dt_bias.detach().to(self.compute).clone(),
                A=(-torch.exp(mixer.A_log.detach().to(self.compute))).clone(),
                D=mixer.D.detach().to(self.compute).clone())
        if kind == "attention":
            shape = (self.B, mixer.Hkv, self.max_length, mixer.hd)
            return _AttnLayerState(k=torch.zeros(shape, dtype=self.dtype, device=self.device),
                                   v=torch.zeros(shape, dtype=self.dtype, device=self.device))
        raise NotImplementedError(f"StaticDecoder: no single-step path for mixer {kind!r}")

    def _mutable_buffers(self) -> list[torch.Tensor]:
        out = [self.token, self.pos, self.cur, self.gen_idx, self.logits, self.generated, self.valid]
        for st in self.states:
            if isinstance(st, _RNNLayerState):
                out += [st.conv.window, st.h]
            elif isinstance(st, _MambaLayerState):
                out += [st.conv.window, st.S]
            else:
                out += [st.k, st.v]
        return out

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt through the model's parallel path and load its final states into the buffers.

        Returns the logits of the last prompt token (B, V) (a view of ``self.logits``) and leaves the
        greedy next token in ``self.token``.
        """
        B, T = input_ids.shape
        if B != self.B:
            raise ValueError(f"this decoder was built for batch_size={self.B}, got {B} rows")
        if self.has_attention and T >= self.max_length:
            raise ValueError(f"prompt of {T} tokens does not fit max_length={self.max_length}")
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask, use_cache=True,
                         logits_to_keep=1)
        cache = out.state
        for i, st in enumerate(self.states):
            layer = cache.layers[i]
            if isinstance(st, _AttnLayerState):
                S = layer.keys.shape[2]
                st.k[:, :, :S].copy_(layer.keys)
                st.v[:, :, :S].copy_(layer.values)
                continue
            ctx, state = layer.get_state()
            st.conv.window.copy_(ctx)
            (st.h if isinstance(st, _RNNLayerState) else st.S).copy_(state)
        self.pos.copy_(cache.last_positions)
        self.cur.fill_(T)
        self._filled = T
        self.gen_idx.zero_()
        if self.has_attention:
            self.valid.zero_()
            doc = cache.doc_ids
            self.valid[:, :T].copy_(doc == doc[:, -1:])
        self.logits.copy_(out.logits[:, -1])
        self.token.copy_(self.logits.argmax(-1))
        return self.logits

    # ------------------------------------------------------------------ one step
    def _conv_step(self, st: _ConvState, x: torch.Tensor) -> torch.Tensor:
        """The model's CausalConv1d for one token (same operation order), updating the window."""
        K = st.weight.shape[1]
        xx = torch.cat((st.window, x.unsqueeze(1)), dim=1)  # (B, K, C)
        w = st.weight
        y = x * w[:, K - 1]
        for j in range(1, K):
            tap = xx[:, K - 1 - j] * (self.pos >= j).unsqueeze(-1).to(x.dtype)
            y = y + tap * w[:, K - 1 - j]
        y = y + st.bias
        st.window.copy_(xx[:, 1:])
        return y

    def _rnn_mixer(self, mixer, st: _RNNLayerState, x: torch.Tensor) -> torch.Tensor:
        u, z = mixer.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self._conv_step(st.conv, u))
        layer = mixer.cell
        h = layer.cell.step(st.h, layer.project(u).to(self.compute), st.p)
        st.h.copy_(h)
        y = layer.cell.output(h).to(u.dtype)
        return mixer.out_proj(mixer.norm(y, z))

    def _mamba_mixer(self, mixer, st: _MambaLayerState, x: torch.Tensor) -> torch.Tensor:
        B, c = x.shape[0], self.compute
        z, xBC, dt = mixer.in_proj(x).split([mixer.di, mixer.conv_dim, mixer.H], dim=-1)
        xBC = F.silu(self._conv_step(st.conv, xBC))
        xs, Bm, Cm = xBC.split([mixer.di, mixer.G * mixer.N, mixer.G * mixer.N], dim=-1)
        xs = xs.reshape(B, mixer.H, mixer.P)
        Bm, Cm = Bm.reshape(B, mixer.G, mixer.N), Cm.reshape(B, mixer.G, mixer.N)
        dt = F.softplus(dt.to(c) + st.dt_bias)
        y, S = ssd_step(st.S, xs.to(c), dt, st.A, Bm.to(c), Cm.to(c))
        st.S.copy_(S)
        y = y + xs.to(c) * st.D[:, None]
        y = y.reshape(B, mixer.di).to(x.dtype)
        return mixer.out_proj(mixer.norm(y, z))

    def _attn_mixer(self, mixer, st: _AttnLayerState, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        q = mixer.q_proj(x).view(B, mixer.H, 1, mixer.hd)
        k = mixer.k_proj(x).view(B, mixer.Hkv, 1, mixer.hd)
        v = mixer.v_proj(x).view(B, mixer.Hkv, 1, mixer.hd)
        cos, sin = mixer.rope(self.pos.unsqueeze(1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        st.k.index_copy_(2, self.cur, k)
        st.v.index_copy_(2, self.cur, v)
        keys, values = st.k, st.v
        if mixer.Hkv != mixer.H:
            keys = keys.repeat_interleave(mixer.H // mixer.Hkv, dim=1)
            values = values.repeat_interleave(mixer.H // mixer.Hkv, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.valid[:, None, None, :])
        return mixer.o_proj(out.reshape(B, mixer.H * mixer.hd))

    def _block(self, block, st, x: torch.Tensor) -> torch.Tensor:
        h = block.mixer_norm(x)
        if isinstance(st, _RNNLayerState):
            h = self._rnn_mixer(block.mixer, st, h)
        elif isinstance(st, _MambaLayerState):
            h = self._mamba_mixer(block.mixer, st, h)
        else:
            h = self._attn_mixer(block.mixer, st, h)
        x = x + h
        if block.mlp is not None:
            x = x + block.mlp(block.mlp_norm(x))
        return x

    def _step_body(self) -> None:
        """One token for every row: reads self.token, writes logits, the greedy token and its column."""
        self.pos.add_(1)
        if self.has_attention:
            self.valid.index_fill_(1, self.cur, True)
        x = self.model.model.embed_tokens(self.token)
        for block, st in zip(self.model.model.layers, self.states):
            x = self._block_fn(block, st, x)
        logits = self.model.lm_head(self.model.model.norm(x))
        self.logits.copy_(logits)
        self.token.copy_(logits.argmax(-1))
        self.generated.index_copy_(1, self.gen_idx, self.token.unsqueeze(1))
        self.gen_idx.add_(1).remainder_(self.generated.shape[1])
        self.cur.add_(1)

    def _ensure_step(self):
        if self._step_fn is not None:
            return self._step_fn
        body = self._step_body
        if self.compile == "block":  # one compiled block function, reused by every layer of the same kind
            self._block_fn = torch.compile(self._block, dynamic=False)
        elif self.compile == "step":  # the whole step as one graph (longer compilation)
            body = torch.compile(self._step_body, dynamic=False)
        if not self.cuda_graph:
            self._step_fn = body
            return body
        # Warm-up (compilation, cuBLAS workspaces) and capture mutate the buffers: save and restore them.
        saved = [b.clone() for b in self._mutable_buffers()]
        self.cur.zero_()  # warm-up writes KV slots 0..3 whatever the prompt length (restored below)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        for b, s in zip(self._mutable_buffers(), saved):
            b.copy_(s)
        torch.cuda.synchronize(self.device)
        self._graph = graph
        self._step_fn = graph.replay
        return self._step_fn

    @torch.no_grad()
    def decode_one(self) -> None:
        """Advance every row by the token in ``self.token`` (the greedy token after prefill/step)."""
        if self.has_attention and self._filled >= self.max_length:  # host-side count: no device sync
            raise RuntimeError(f"KV buffer full (max_length={self.max_length})")
        self._ensure_step()()
        self._filled += 1

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced step: ``input_ids`` (B,) or (B, 1) -> logits (B, V) (a view of ``self.logits``)."""
        self.token.copy_(input_ids.reshape(self.B))
        self.decode_one()
        return self.logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding: (B, T) prompt -> (B, T + max_new_tokens), as ``model.generate(do_sample=False)``
        (without EOS stopping). One host sync at the end, none per token."""
        if max_new_tokens < 1:
            return input_ids
        if self.has_attention and input_ids.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(f"prompt + max_new_tokens = {input_ids.shape[1] + max_new_tokens} exceeds "
                             f"max_length={self.max_length}")
        if max_new_tokens - 1 > self.generated.shape[1]:  # grow the output buffer (re-captures the graph)
            self.generated = torch.zeros(self.B, max_new_tokens, dtype=torch.long, device=self.device)
            self._graph = self._step_fn = None
        self.prefill(input_ids, attention_mask)
        first = self.token.clone()
        fn = self._ensure_step()
        for _ in range(max_new_tokens - 1):
            fn()
        self._filled += max_new_tokens - 1
        new = torch.cat((first.unsqueeze(1), self.generated[:, : max_new_tokens - 1]), dim=1)
        return torch.cat((input_ids.to(self.device), new), dim=1)
