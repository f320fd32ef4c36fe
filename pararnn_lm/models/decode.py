"""Static-shape single-token decoding for ParaRNNLM models, capturable in one CUDA graph.

    from pararnn_lm.models import StaticDecoder
    dec = StaticDecoder(model, batch_size=1, max_length=2048)   # CUDA graph on CUDA, eager on CPU
    ids = dec.generate(prompt, max_new_tokens=256)                # == model.generate(..., do_sample=False)
    ids = dec.generate(prompt, 256, eos_token_id=2, pad_token_id=0)  # rows stop at EOS, as generate's
    logits = dec.prefill(prompt)                                  # (B, V) logits of the last prompt token
    logits = dec.step(next_ids)                                   # (B, V) teacher-forced, one token per row

``model.generate(..., cache_implementation="static")`` (or ``model.generation_config.cache_implementation =
"static"``) decodes through a StaticDecoder that the model keeps between calls (:class:`StaticDecoderSlot`;
on CUDA its step is compiled unless ``disable_compile=True``), with HF's logits processors, sampling,
stopping criteria and streamer on top of :meth:`StaticDecoder.prefill` / :meth:`StaticDecoder.step`, or,
for plain greedy decoding, through :meth:`StaticDecoder.generate` (modeling.py, ``_sample``).

Why: ``model.generate`` decodes through the HF loop and the model's general forward (positions,
masks, cache bookkeeping, a few hundred small kernels and host syncs per token). Here every layer's
state lives in buffers allocated once by its mixer (``allocate_inference_state``, models/inference.py:
per row the causal conv window and the ParaRNN cell state or the Mamba2 SSM state in fp32; for
attention ``max_length`` key/value slots and their validity mask), and one decode step is a fixed
sequence of tensor ops - each block's ``step``, i.e. each mixer's one-token ``step`` - that reads the
current token from ``self.token`` and writes the logits, the greedy next token (back into
``self.token``) and the generated-token buffer. Nothing in the step depends on host values, so on CUDA
the whole step (embedding -> all layers -> head -> argmax) is captured once with
``torch.cuda.CUDAGraph`` and replayed: no Python work, no allocator calls and no host sync per token
(the graph's intermediates live in its private memory pool). On CPU the same step runs eagerly. This
module knows no mixer: a mixer registered with ``register_mixer`` that has ``allocate_inference_state``
and ``step`` decodes here as is.

Numerics: the mixers' steps are the operations of their forward for one token (the cell's and the SSD's
single step instead of the parallel solve); the model's cached decoding path runs the same steps for the
recurrent mixers, with the same weight-derived constants (computed once per prefill: the decoder's
buffers follow the weights of its latest prefill). In eager mode the decoder therefore reproduces
``model.generate`` (greedy tokens exactly, logits to rounding). ``compile=True`` additionally runs the
step through ``torch.compile`` (inductor fuses the elementwise chains: RMSNorms, conv taps, the cell
step) before graph capture; fused arithmetic then differs from eager in the last bits, and in bf16 a
near-tie between the top two logits can go the other way (``scripts/bench_kernels.py decode
--check-divergence`` tells such a flip from a real difference).

Scope: every mixer with an inference state (paragru, paralstm, mamba2, attention) and hybrid stacks;
padded prompts (``attention_mask``) work as in ``model.generate`` (the prefill runs the model's parallel
path and its cache provides each row's position and, for attention, which cached keys belong to the
current document). Greedy :meth:`StaticDecoder.generate` stops rows at EOS as HF's ``generate`` does (a
finished row's later tokens are the pad token, decoding stops once every row has finished) while checking
for that only every ``check_every`` tokens (one host sync each). Not supported: ``bare_mixer`` models,
position encodings added to the embeddings, beams.
"""
from __future__ import annotations

import logging

import torch

from .inference import TokenPosition

log = logging.getLogger(__name__)


# Stop tokens a greedy decode compares against in its captured step (a fixed-size buffer; unused slots -1).
MAX_STOP_TOKENS = 8


class StaticDecoder:
    """Greedy / teacher-forced batch decoding of a :class:`ParaRNNLMForCausalLM` with static buffers.

    Args:
        model: the causal LM (any dtype; put it in eval mode and on its device first).
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
        if cfg.position_encoding is not None:
            raise NotImplementedError(f"StaticDecoder does not add position_encoding={cfg.position_encoding!r} "
                                      "to the embeddings; use model.generate")
        self.model = model
        self.config = cfg
        self.B, self.max_length = batch_size, max_length
        self.device = model.lm_head.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        if compile not in (False, True, "block", "step"):
            raise ValueError(f"compile must be False, True, 'block' or 'step', got {compile!r}")
        self.compile = "block" if compile is True else compile
        self._block_fn = self._block
        dev, B = self.device, batch_size
        self.token = torch.zeros(B, dtype=torch.long, device=dev)  # input of the next step / greedy output
        # The token of the next step: its position in its document and its slot in the KV buffers.
        self.position = TokenPosition(positions=torch.zeros(B, dtype=torch.long, device=dev),
                                      slot=torch.zeros(1, dtype=torch.long, device=dev))
        # EOS handling inside the step: rows that emitted a stop token emit the pad token from then on.
        self.stop_ids = torch.full((MAX_STOP_TOKENS,), -1, dtype=torch.long, device=dev)
        self.pad_id = torch.zeros((), dtype=torch.long, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.gen_idx = torch.zeros(1, dtype=torch.long, device=dev)  # next column of self.generated
        self.logits = torch.zeros(B, cfg.vocab_size, dtype=self.dtype, device=dev)
        # ring buffer of greedy tokens (generate() reads its first n-1 columns; >= 8 for warm-up + capture)
        self.generated = torch.zeros(B, max(max_new_tokens, 8), dtype=torch.long, device=dev)
        self.states = [self._allocate(block) for block in model.model.layers]
        bounded = [state.capacity for state in self.states if state.capacity is not None]
        self.capacity = min(bounded) if bounded else None  # tokens the buffers hold (KV slots), None: any
        if self.capacity is not None and self.capacity < 8:  # the graph warm-up writes slots 0..3
            raise ValueError(f"max_length must be >= 8 (KV slots), got {max_length}")
        self._filled = 0  # tokens in the buffers (host-side mirror of self.position.slot)
        self._stops = False  # whether stop_ids holds any EOS token (host-side)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._step_fn = None

    # ------------------------------------------------------------------ buffers
    def _allocate(self, block):
        mixer = block.mixer
        if not (hasattr(mixer, "allocate_inference_state") and hasattr(mixer, "step")):
            raise NotImplementedError(f"StaticDecoder: mixer {block.mixer_type!r} has no allocate_inference_state "
                                      "and step (models/inference.py)")
        return mixer.allocate_inference_state(self.B, self.max_length, self.dtype, self.device)

    def _mutable_buffers(self) -> list[torch.Tensor]:
        out = [self.token, self.position.positions, self.position.slot, self.position.continues, self.gen_idx,
               self.logits, self.generated, self.finished]
        for state in self.states:
            out += state.buffers()
        return out

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt through the model's parallel path and load its final states into the buffers.

        Returns the logits of the last prompt token (B, V) (a view of ``self.logits``) and leaves the
        greedy next token in ``self.token``. The layers' weight-derived constants are refreshed here.
        """
        B, T = input_ids.shape
        if B != self.B:
            raise ValueError(f"this decoder was built for batch_size={self.B}, got {B} rows")
        if self.capacity is not None and T >= self.capacity:
            raise ValueError(f"prompt of {T} tokens does not fit max_length={self.max_length}")
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask, use_cache=True,
                         logits_to_keep=1)
        cache = out.state
        for i, state in enumerate(self.states):
            state.load(cache, i)
        self.position.positions.copy_(cache.last_positions)
        self.position.slot.fill_(T)
        self._filled = T
        self.gen_idx.zero_()
        self.logits.copy_(out.logits[:, -1])
        self.token.copy_(self.logits.argmax(-1))
        self.finished.copy_(self._is_stop(self.token))
        return self.logits

    # ------------------------------------------------------------------ one step
    def _block(self, block, state, x: torch.Tensor) -> torch.Tensor:
        return block.step(x, state, self.position)

    def _is_stop(self, token: torch.Tensor) -> torch.Tensor:
        return (token.unsqueeze(1) == self.stop_ids).any(1)

    def _step_body(self) -> None:
        """One token for every row: reads self.token, writes logits, the greedy token and its column."""
        self.position.advance()
        x = self.model.model.embed_tokens(self.token)
        for block, state in zip(self.model.model.layers, self.states):
            x = self._block_fn(block, state, x)
        logits = self.model.lm_head(self.model.model.norm(x))
        self.logits.copy_(logits)
        self.token.copy_(torch.where(self.finished, self.pad_id, logits.argmax(-1)))
        self.finished.logical_or_(self._is_stop(self.token))
        self.generated.index_copy_(1, self.gen_idx, self.token.unsqueeze(1))
        self.gen_idx.add_(1).remainder_(self.generated.shape[1])
        self.position.slot.add_(1)

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
        self.position.slot.zero_()  # warm-up writes KV slots 0..3 whatever the prompt length (restored below)
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
        if self.capacity is not None and self._filled >= self.capacity:  # host-side count: no device sync
            raise RuntimeError(f"KV buffer full (max_length={self.max_length})")
        self._ensure_step()()
        self._filled += 1

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced step: ``input_ids`` (B,) or (B, 1) -> logits (B, V) (a view of ``self.logits``)."""
        self.token.copy_(input_ids.reshape(self.B))
        self.decode_one()
        return self.logits

    def set_stop_tokens(self, eos_token_id: int | list[int] | torch.Tensor | None, pad_token_id: int | None) -> None:
        """Which greedy tokens finish a row (None: none) and what a finished row emits afterwards."""
        ids = [] if eos_token_id is None else torch.as_tensor(eos_token_id).reshape(-1).tolist()
        if len(ids) > MAX_STOP_TOKENS:
            raise ValueError(f"at most {MAX_STOP_TOKENS} EOS tokens, got {len(ids)}")
        if ids and pad_token_id is None:
            raise ValueError("stopping at EOS needs a pad_token_id for the rows that finished first")
        self.stop_ids.fill_(-1)
        self.stop_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.pad_id.fill_(0 if pad_token_id is None else int(pad_token_id))
        self._stops = bool(ids)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | list[int] | torch.Tensor | None = None, pad_token_id: int | None = None,
                 check_every: int = 32) -> torch.Tensor:
        """Greedy decoding: (B, T) prompt -> (B, T + new), as ``model.generate(do_sample=False)``.

        Without ``eos_token_id``: ``max_new_tokens`` new tokens, one host sync at the end. With it: a row
        that emitted an EOS token emits ``pad_token_id`` afterwards, and decoding ends once every row has
        finished - the output is then as long as the longest row (HF's semantics); every ``check_every``
        tokens one host sync asks whether all rows have finished."""
        if max_new_tokens < 1:
            return input_ids
        if self.capacity is not None and input_ids.shape[1] + max_new_tokens > self.capacity:
            raise ValueError(f"prompt + max_new_tokens = {input_ids.shape[1] + max_new_tokens} exceeds "
                             f"max_length={self.max_length}")
        if max_new_tokens - 1 > self.generated.shape[1]:  # grow the output buffer (re-captures the graph)
            self.generated = torch.zeros(self.B, max_new_tokens, dtype=torch.long, device=self.device)
            self._graph = self._step_fn = None
        self.set_stop_tokens(eos_token_id, pad_token_id)
        self.prefill(input_ids, attention_mask)
        first = self.token.clone()
        fn = self._ensure_step()
        done = 1  # tokens generated so far
        while done < max_new_tokens:
            chunk = min(check_every, max_new_tokens - done) if self._stops else max_new_tokens - done
            for _ in range(chunk):
                fn()
            done += chunk
            self._filled += chunk
            if self._stops and bool(self.finished.all()):
                break
        new = torch.cat((first.unsqueeze(1), self.generated[:, : done - 1]), dim=1)
        if self._stops:  # HF stops at the token that finishes the last row: drop the checks' overshoot
            stop = self._is_stop(new.reshape(-1)).view_as(new)
            if bool(stop.any(1).all()):
                new = new[:, : int(stop.int().argmax(1).max()) + 1]
        return torch.cat((input_ids.to(self.device), new), dim=1)


class StaticDecoderSlot:
    """The StaticDecoder a model keeps between ``generate(cache_implementation="static")`` calls.

    Building a decoder allocates its buffers and captures (and maybe compiles) its step, so consecutive
    calls reuse it while it fits: same batch size and compile setting, enough KV slots (attention), and the
    same parameter storage - the captured step reads the weights at their addresses, so a model moved or
    cast since (``.to()``, ``load_state_dict(assign=True)``) gets a new decoder. Weights changed in place
    need nothing: the constants derived from them are recomputed at every prefill. Copies and pickles of
    the model get an empty slot (a captured graph cannot be copied).
    """

    # KV slots are allocated in multiples of this, so that growing prompts reuse the decoder for a while.
    SLOT_GRANULE = 256

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.decoder: StaticDecoder | None = None

    def __deepcopy__(self, memo) -> "StaticDecoderSlot":
        return StaticDecoderSlot()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def clear(self) -> None:
        """Drop the decoder (its buffers and graph pool are freed once nothing else holds it)."""
        self.decoder = self.key = None

    def get(self, model, batch_size: int, max_length: int, compile: bool | str) -> StaticDecoder:
        """A decoder for ``batch_size`` rows of up to ``max_length`` tokens (prompt + new)."""
        weights = tuple(p.data_ptr() for p in model.parameters())
        dec = self.decoder
        if (dec is not None and self.key == (batch_size, compile, weights)
                and (dec.capacity is None or dec.capacity >= max_length)):
            return dec
        self.clear()  # free the old buffers and graph pool before allocating new ones
        slots = -(-max_length // self.SLOT_GRANULE) * self.SLOT_GRANULE
        dec = StaticDecoder(model, batch_size=batch_size, max_length=slots, compile=compile)
        if compile:
            try:  # compile (and capture) now, so that a step torch.compile cannot build falls back here
                with torch.no_grad():
                    dec._ensure_step()
            except Exception as err:  # noqa: BLE001 - any compiler failure: decode uncompiled instead
                log.warning("StaticDecoder: compiling the step failed (%s: %s); decoding with the uncompiled step",
                            type(err).__name__, err)
                dec = StaticDecoder(model, batch_size=batch_size, max_length=slots, compile=False)
        self.decoder, self.key = dec, (batch_size, compile, weights)
        return dec
