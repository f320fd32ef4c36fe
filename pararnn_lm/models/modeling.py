"""The causal LM shared by all architectures: embeddings -> blocks (pre-norm mixer + pre-norm SwiGLU) -> norm -> head.

Sequence structure (padding, packed documents, decoding) is reduced once per forward to per-token
positions (``models.packing.SequenceInfo``) that every mixer consumes, see ``_sequence``.
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field, make_dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.utils import ModelOutput

from .cache import ParaRNNCache
from .configuration import ParaRNNLMConfig
from .decode import StaticDecoderSlot
from .engine import is_cell_layer
from .layers import RMSNorm, SwiGLU, output_std, trunc_normal_init_
from .loss import lm_loss_chunked, lm_loss_from_logits
from .mixers import AttentionMixer, Mamba2Mixer, ParaRNNMixer  # noqa: F401  (registers the mixers)
from .attention import document_block_mask, flex_available, use_flex
from .packing import SequenceInfo, positions_from_attention_mask, positions_from_cu_seqlens
from .registry import MIXERS, build_mixer

log = logging.getLogger(__name__)

# transformers renamed generate()'s cache kwarg/output from ``past_key_values`` to ``cache`` during 5.x; the
# model accepts both names and returns the one the installed generate() reads back.
_GENERATE_USES_CACHE_NAME = "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


# The output's cache field carries the name the installed generate() reads back (transformers >= 5.2x:
# ``cache``, whose ModelOutput maps ``past_key_values`` onto it; older: ``past_key_values``).
_CACHE_FIELD = "cache" if _GENERATE_USES_CACHE_NAME else "past_key_values"
ParaRNNLMOutput = make_dataclass(
    "ParaRNNLMOutput",
    [("loss", Optional[torch.Tensor], field(default=None)),
     ("logits", Optional[torch.Tensor], field(default=None)),
     (_CACHE_FIELD, Optional[ParaRNNCache], field(default=None)),
     ("hidden_states", Optional[tuple], field(default=None)),
     ("ce_loss", Optional[torch.Tensor], field(default=None)),
     ("z_loss_term", Optional[torch.Tensor], field(default=None))],
    bases=(ModelOutput,),
    namespace={
        "__doc__": "``loss`` = ``ce_loss`` + z_loss * ``z_loss_term`` in training (``ce_loss`` in eval); "
                   "``state`` is the generation cache under either name.",
        "state": property(lambda self: getattr(self, _CACHE_FIELD)),
        "__module__": __name__,
    },
)


@dataclass
class ParaRNNLMModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    cache: ParaRNNCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def embedding_init_std(config: ParaRNNLMConfig) -> float:
    """Init std of the token embeddings: ``init_std``, else 1/sqrt(hidden_size), else 1 for bare-mixer models.

    A bare mixer without norms reads the embedding directly: unit scale there (PyTorch's default), so the
    cell's pre-activations are O(1) and its gates can depend on the token."""
    return config.init_std or (1.0 if config.bare_mixer else 1.0 / math.sqrt(config.hidden_size))


def sinusoidal_position_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed position table of Vaswani et al. (2017) at per-token ``positions`` (B, T) -> (B, T, dim) fp32:
    sin(p w_i) in the first half of the channels, cos(p w_i) in the second, w_i = 10000^(-2i/dim).

    Computed per call from the positions (no buffer: a model built on the meta device keeps nothing
    uninitialised), so packed documents and decoding continue each document's own positions."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
    angles = positions.to(torch.float32).unsqueeze(-1) * (1.0 / 10000.0 ** exponent)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class ParaRNNLMBlock(nn.Module):
    """Pre-norm residual mixer (+ pre-norm residual SwiGLU when ``intermediate_size > 0``).

    With ``config.bare_mixer`` the block is the mixer without a residual, ``x -> mixer(x)``, or
    ``x -> mixer(norm(x))`` with ``bare_mixer_norms`` (the paper's bare-mixer setting for keep-nth and parity,
    see ``ParaRNNLMConfig``).
    """

    def __init__(self, config: ParaRNNLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_type = config.mixers[layer_idx]
        self.bare = config.bare_mixer
        has_norm = not self.bare or config.bare_mixer_norms
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if has_norm else None
        self.mixer = build_mixer(self.mixer_type, config, layer_idx)
        if config.intermediate_size > 0:
            self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias, layer_idx=layer_idx)
        else:
            self.mlp_norm = self.mlp = None

    def forward(self, x: torch.Tensor, seq: SequenceInfo, cache, attn_mask) -> torch.Tensor:
        mixed = self.mixer(x if self.mixer_norm is None else self.mixer_norm(x), seq, cache, attn_mask)
        x = mixed if self.bare else x + mixed
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x

    def step(self, x_t: torch.Tensor, state, position) -> torch.Tensor:
        """One token (B, hidden) through the block: :meth:`forward` with the mixer's one-token ``step``,
        which updates the mixer's inference ``state`` in place (models/inference.py)."""
        mixed = self.mixer.step(x_t if self.mixer_norm is None else self.mixer_norm(x_t), state, position)
        x_t = mixed if self.bare else x_t + mixed
        if self.mlp is not None:
            x_t = x_t + self.mlp(self.mlp_norm(x_t))
        return x_t


def _all_loaded(module: nn.Module) -> bool:
    """True when every parameter below ``module`` came from a checkpoint (HF marks them)."""
    params = list(module.parameters())
    return bool(params) and all(getattr(p, "_is_hf_initialized", False) for p in params)


class ParaRNNLMPreTrainedModel(PreTrainedModel):
    config_class = ParaRNNLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ParaRNNLMBlock"]
    _supports_sdpa = True
    _is_stateful = True  # recurrent layers: no cache cropping / assisted decoding

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model builds its own ParaRNNCache on the first call.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """DCLM / open_lm-style init of one module (HF calls this for every module with parameters).

        Linear: truncated normal (+-3 std), std = init_std or 1/sqrt(fan_in); projections writing into
        the residual stream (tagged by ``mark_residual_output``) / sqrt(2 (layer_idx + 1)).
        Embedding and head: std = init_std or 1/sqrt(hidden_size). Norms: 1. Convs: PyTorch default.
        Cell layers: their own init (kernels). Mamba2: dt_bias / A_log / D as in Mamba2.
        Modules whose parameters all came from a checkpoint are left alone.
        """
        if _all_loaded(module):
            return
        base = self.config.init_std
        if isinstance(module, nn.Linear):
            std = base or 1.0 / math.sqrt(module.in_features)
            layer = getattr(module, "_residual_output_of_layer", None)
            trunc_normal_init_(module.weight, std if layer is None else output_std(std, layer))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            trunc_normal_init_(module.weight, embedding_init_std(self.config))
        elif isinstance(module, nn.Conv1d):
            module.reset_parameters()
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Mamba2Mixer):
            module.init_ssm_params()
        elif is_cell_layer(module):
            module.reset_parameters()


class ParaRNNLMModel(ParaRNNLMPreTrainedModel):
    def __init__(self, config: ParaRNNLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ParaRNNLMBlock(config, i) for i in range(config.num_hidden_layers))
        # Bare-mixer models without their norms: embedding -> mixer(s) -> head, no final norm.
        bare_without_norms = config.bare_mixer and not config.bare_mixer_norms
        self.norm = nn.Identity() if bare_without_norms else RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.has_attention = "attention" in config.mixers
        if self.has_attention and config.attention_impl == "flex" and not flex_available():
            raise RuntimeError(f"attention_impl='flex' needs torch.nn.attention.flex_attention (torch >= 2.5); "
                               f"this is torch {torch.__version__}: use attention_impl='auto' or 'sdpa'")
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @staticmethod
    def _sequence(B, T, device, attention_mask, position_ids, cu_seqlens, cache) -> SequenceInfo:
        """Per-token positions inside documents (B, T): the one description of sequence structure.

        Where the positions are built here as one document per row (no position_ids, cu_seqlens or
        padding mask), the absence of document starts inside a row is known without looking at the
        values: no host sync, so a training step stays capturable in a CUDA graph.
        """
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens needs a packed batch of one row, got batch size {B}")
            return SequenceInfo(positions_from_cu_seqlens(cu_seqlens.to(device), T))
        if position_ids is not None:
            if position_ids.shape[-1] != T:
                raise ValueError(f"position_ids has length {position_ids.shape[-1]} but the input has {T} tokens")
            return SequenceInfo(position_ids.to(device=device, dtype=torch.long).expand(B, T))
        if cache is not None and cache.last_positions is not None:  # continue each row's document
            return SequenceInfo.one_document_per_row(cache.last_positions[:, None] + 1 + torch.arange(T, device=device))
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            return SequenceInfo(positions_from_attention_mask(attention_mask.to(device))[:, -T:])
        return SequenceInfo.one_document_per_row(torch.arange(T, device=device).expand(B, T))

    def _attention_mask(self, seq: SequenceInfo, cache, x: torch.Tensor):
        """What the attention layers mask with, shared by all of them, and the query document ids.

        None: plain causal suffices (one document per row, no cached prefix; SDPA's flash path).
        A FlexAttention ``BlockMask`` (causal & same-document) where ``use_flex`` picks that path:
        decided without reading values (no host sync), see models/attention.py.
        Otherwise a boolean (B, 1, T, S) causal & same-document mask for SDPA (over the cached keys
        too when decoding).
        """
        past = cache.doc_ids if cache is not None else None
        offset = past[:, -1] if past is not None else None
        doc_q = seq.doc_ids(offset)
        if self.has_attention and use_flex(
                self.config.attention_impl, device=x.device, dtype=x.dtype, head_dim=self.config.head_dim,
                has_cache=cache is not None, one_document_per_row=seq.known_one_document_per_row):
            return document_block_mask(doc_q), doc_q
        if past is None and not seq.has_inner_resets:
            return None, doc_q
        doc_k = doc_q if past is None else torch.cat((past, doc_q), dim=1)
        T, S = doc_q.shape[1], doc_k.shape[1]
        q_idx = torch.arange(T, device=doc_q.device) + (S - T)
        causal = torch.arange(S, device=doc_q.device)[None, :] <= q_idx[:, None]
        mask = causal[None] & (doc_k[:, None, :] == doc_q[:, :, None])
        return mask.unsqueeze(1), doc_q

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: ParaRNNCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ParaRNNLMModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = ParaRNNCache(self.config)
        if cache is not None and not isinstance(cache, ParaRNNCache):
            raise TypeError(f"cache must be a ParaRNNCache (built by the model), got {type(cache).__name__}")
        seq = self._sequence(B, T, x.device, attention_mask, position_ids, cu_seqlens, cache)
        if self.config.position_encoding == "sinusoidal":
            table = sinusoidal_position_encoding(seq.positions, self.config.hidden_size)
            x = x + (embedding_init_std(self.config) * table).to(x.dtype)
        attn_mask, doc_ids = self._attention_mask(seq, cache, x) if (self.has_attention or cache is not None) else (None, None)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = self._gradient_checkpointing_func(layer.__call__, x, seq, None, attn_mask)
            else:
                x = layer(x, seq, cache, attn_mask)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.advance(seq.positions, doc_ids)
        x = self.norm(x)
        return ParaRNNLMModelOutput(last_hidden_state=x, cache=cache,
                                    hidden_states=tuple(hidden) if hidden is not None else None)


class ParaRNNLMForCausalLM(ParaRNNLMPreTrainedModel, GenerationMixin):
    """The causal LM. ``generate()`` decodes through the model's cache (the HF loop) by default; with
    ``cache_implementation="static"`` (argument or ``model.generation_config``) greedy and sampled
    decoding run on a :class:`~pararnn_lm.models.decode.StaticDecoder` kept by the model between calls
    (static buffers, one CUDA graph per token on CUDA, its step ``torch.compile``d on CUDA unless
    ``disable_compile=True``), see :meth:`_sample`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ParaRNNLMConfig) -> None:
        super().__init__(config)
        self.model = ParaRNNLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.static_decoder_slot = StaticDecoderSlot()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: ParaRNNCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        past_key_values: ParaRNNCache | None = None,
        **kwargs,
    ):
        """HF causal LM forward; ``labels`` are shifted inside (token t predicts labels[t+1]).

        Packed batches: pass ``position_ids`` restarting at 0 at every document start, or a single
        row with ``cu_seqlens``. ``past_key_values`` is accepted as an alias of ``cache``.
        """
        cache = cache if cache is not None else past_key_values
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        logits = loss = ce = z = None
        if labels is not None and self.config.fused_cross_entropy:
            ce, z, _ = lm_loss_chunked(h, self.lm_head.weight, labels, self.config.ce_chunk_size)
        else:
            keep = h if (logits_to_keep == 0 or labels is not None) else h[:, -logits_to_keep:]
            logits = self.lm_head(keep)
            if labels is not None:
                ce, z, _ = lm_loss_from_logits(logits, labels)
        if ce is not None:
            loss = ce + self.config.z_loss * z if (self.training and self.config.z_loss > 0) else ce
        return ParaRNNLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, ce_loss=ce, z_loss_term=z,
                               **{_CACHE_FIELD: out.cache})


    # ------------------------------------------------------------------ generate(cache_implementation="static")
    @staticmethod
    def _static_requested(generation_config) -> bool:
        return generation_config is not None and generation_config.cache_implementation == "static"

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if self._static_requested(generation_config):
            return  # the StaticDecoder holds every layer's state; HF would only warn that it builds no cache
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def _static_unsupported(self, generation_config, synced_gpus: bool, model_kwargs: dict) -> str | None:
        """Why this call cannot decode through the StaticDecoder (None: it can)."""
        if self.config.bare_mixer or self.config.position_encoding is not None:
            return "bare_mixer models and position encodings are not supported by the StaticDecoder"
        if synced_gpus:
            return "synced_gpus is not supported"
        if generation_config.return_dict_in_generate:
            return "return_dict_in_generate is not supported"
        if model_kwargs.get("inputs_embeds") is not None:
            return "inputs_embeds is not supported"
        if model_kwargs.get("cache") is not None or model_kwargs.get("past_key_values") is not None:
            return "a cache passed in is not supported"
        return None

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus: bool = False,
                streamer=None, **model_kwargs):
        """HF's greedy / sampling loop (``GenerationMixin._sample``), or with ``cache_implementation="static"``
        the same decoding on the model's StaticDecoder: same logits processors, sampling, EOS/pad and
        stopping criteria and streamer, greedy tokens equal to the default path's (fp32; bf16 to rounding).

        Plain greedy decoding (no logits processor, no streamer, stopping at max_length / EOS only) runs
        entirely in the decoder's captured step, with a host sync every 32 tokens to see whether every row
        has finished; otherwise each token is one replay of the captured step followed by HF's processors
        and stopping criteria on its logits, as in HF's loop.
        """
        why_not = self._static_unsupported(generation_config, synced_gpus, model_kwargs) \
            if self._static_requested(generation_config) else "not requested"
        if why_not is not None:
            if why_not != "not requested":
                log.warning("cache_implementation='static': %s; decoding through the model's cache instead", why_not)
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        device = self.lm_head.weight.device
        input_ids = input_ids.to(device)
        attention_mask = model_kwargs.get("attention_mask")
        B, T = input_ids.shape
        max_length = generation_config.max_length
        compile = "block" if device.type == "cuda" and not generation_config.disable_compile else False
        decoder = self.static_decoder_slot.get(self, B, max_length, compile)
        eos_criteria = [c for c in stopping_criteria if isinstance(c, EosTokenCriteria)]
        pad = generation_config._pad_token_tensor
        if (not generation_config.do_sample and len(logits_processor) == 0 and streamer is None
                and all(isinstance(c, (MaxLengthCriteria, EosTokenCriteria)) for c in stopping_criteria)):
            eos = torch.cat([c.eos_token_id.reshape(-1) for c in eos_criteria]) if eos_criteria else None
            return decoder.generate(input_ids, max_length - T, attention_mask, eos_token_id=eos,
                                    pad_token_id=None if pad is None else int(pad))
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        unfinished = torch.ones(B, dtype=torch.bool, device=device)
        logits = decoder.prefill(input_ids, attention_mask)
        while True:
            scores = logits_processor(input_ids, logits.to(dtype=torch.float32, copy=True))
            if generation_config.do_sample:
                next_tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = scores.argmax(-1)
            if has_eos:
                next_tokens = torch.where(unfinished, next_tokens, pad.to(device))
            input_ids = torch.cat((input_ids, next_tokens[:, None]), dim=1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished &= ~stopping_criteria(input_ids, scores)
            if not bool(unfinished.any()):
                break
            logits = decoder.step(next_tokens)
        if streamer is not None:
            streamer.end()
        return input_ids


def check_tokenizer(config: ParaRNNLMConfig, tokenizer) -> None:
    """Raise if ``tokenizer`` produces ids outside the embedding table."""
    n = len(tokenizer)
    if n > config.vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's vocab_size is {config.vocab_size}")


def build_synthetic_model(mixer: str, *, vocab_size: int, bare_mixer: bool, d_model: int = 64, num_heads: int = 4,
                          **extra) -> ParaRNNLMForCausalLM:
    """One-layer model of the paper's synthetic tasks (Table 6): d=64, 4 heads by default, no MLP unless
    ``intermediate_size`` is given, recurrent gains bounded at 0.9 (the paper's synthetic setting) unless
    ``rnn_gain_bound`` is given (None: unbounded).

    ``bare_mixer``: the mixer without conv / norm / gate and without a residual (``ParaRNNLMConfig.bare_mixer``;
    ``bare_mixer_norms=True`` puts the paper's RMSNorms around it); otherwise the language model's block.
    ``extra``: any further ``ParaRNNLMConfig`` field (the per-task choices of
    :mod:`pararnn_lm.eval.synthetic.models`: position encoding, MLP width, Mamba2's layer shape, ...).
    """
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; registered mixers: {', '.join(sorted(MIXERS))}")
    kw = dict(
        vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=1, num_attention_heads=num_heads,
        mixer=mixer, bare_mixer=bare_mixer, intermediate_size=0, rnn_gain_bound=0.9, max_position_embeddings=4096,
        use_cache=False,  # scored by full forwards; generate() still builds its cache
    )
    kw.update(extra)
    return ParaRNNLMForCausalLM(ParaRNNLMConfig(**kw))
