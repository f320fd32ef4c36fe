"""One ``PretrainedConfig`` for every architecture: ParaGRU, ParaLSTM, Mamba2, Transformer and hybrids.

The architecture is the mixer name (``mixer``), optionally overridden per layer by ``layer_pattern``
(e.g. ``["paragru"] * 5 + ["attention"]`` for an RNN stack with some attention layers). Standard HF
names are used where they exist (``hidden_size``, ``num_hidden_layers``, ``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``, ``rope_theta``, ``rms_norm_eps``, ...).

Validation happens at construction, so a bad config fails with a message naming the field.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .registry import MIXERS

# The built-in mixers, listed here so that a config validates before the mixer modules are imported
# (exports load the config first; ``models/__init__`` asserts the registry holds exactly these). Mixers
# registered later with ``register_mixer`` are accepted too (:func:`known_mixers`).
KNOWN_MIXERS = ("paragru", "paralstm", "mamba2", "attention")
RNN_MIXERS = ("paragru", "paralstm")
ATTENTION_IMPLS = ("auto", "sdpa", "flex")
SSD_BACKENDS = ("auto", "torch", "fla", "mamba_ssm")  # models.ssd asserts its kernels agree
POSITION_ENCODINGS = (None, "sinusoidal")


def known_mixers() -> tuple[str, ...]:
    """The built-in mixers and those registered since."""
    return KNOWN_MIXERS + tuple(name for name in MIXERS if name not in KNOWN_MIXERS)


class ParaRNNLMConfig(PretrainedConfig):
    """Configuration of :class:`ParaRNNLMForCausalLM`.

    Args (beyond the usual HF ones):
        mixer: default mixer of every layer: ``paragru`` | ``paralstm`` | ``mamba2`` | ``attention``.
        layer_pattern: optional list of mixer names, one per layer (hybrid stacks).
        intermediate_size: SwiGLU hidden width; 0 disables the MLP sub-block (Mamba2 stacks, bare models).
        num_attention_heads: heads of attention layers and (unless ``rnn_num_heads`` is set) of the
            ParaRNN cells' block-diagonal input projection (the paper's "heads" column for RNNs).
        rnn_num_heads: ParaRNN heads when they differ from the attention heads (hybrid stacks).
        rnn_expand: ParaRNN inner width = rnn_expand * hidden_size.
        rnn_gain_bound: bound on the cell's recurrent gains (paper: 0.5 for LMs, 0.9 synthetic); None = no bound.
        rnn_gain_norm: "channel" (each gain |a_i| <= bound; default) or "row" (the L2 norm of each parameter
            row over all channels is bounded, so per-channel gains shrink as bound / sqrt(width)).
        rnn_mode: ``kernels.parallel_rnn`` mode (``auto``, ``sequential``, ``newton_torch``, ...).
        rnn_newton: dict of ``kernels.NewtonConfig`` fields (max_iters, tol, damping, on_failure, validate).
        conv_kernel: width of the short causal depthwise conv (ParaRNN and Mamba2 mixers).
        mamba_expand, mamba_headdim, mamba_d_state, mamba_ngroups, mamba_chunk_size: Mamba2 layer shape.
        mamba_dt_min, mamba_dt_max, mamba_dt_init_floor, mamba_A_init_range: Mamba2 parameter init.
        attention_impl: kernel of the attention layers without a cache: ``auto`` (FlexAttention with a
            block-sparse causal & same-document mask for packed rows on CUDA, SDPA otherwise) | ``sdpa``
            (SDPA always; packed rows get a dense boolean mask) | ``flex`` (FlexAttention for every
            forward without a cache; needs torch >= 2.5). Cached forwards always use SDPA. See
            models/attention.py.
        ssd_backend: ``auto`` (on CUDA the first installed Triton kernel: fla-core's chunk kernel, then
            mamba_ssm's; else PyTorch) | ``torch`` | ``fla`` | ``mamba_ssm``.
        bare_mixer: the mixer of the paper's keep-nth / parity models (Table 6): no conv / norm / gate (the cell
            layer for RNNs, in_proj -> SSD -> out_proj for Mamba2, a "linear recurrence control") and no
            residual around it: embedding -> mixer -> lm_head (``model.norm`` is an Identity) unless
            ``bare_mixer_norms`` adds the two norms. The embedding is initialised with std 1. A residual stream
            makes a 1-layer ParaGRU fail short parity (the last token's embedding bypasses the cell).
        bare_mixer_norms: with ``bare_mixer``, an RMSNorm before the mixer and one before the head, still
            without a residual: embedding -> RMSNorm -> mixer -> RMSNorm -> lm_head, the paper's one-layer
            models of Table 6 (its appendix on the synthetic setup).
        position_encoding: None | ``sinusoidal``: a fixed sin/cos table of each token's position inside its
            document (no parameters) added to the token embeddings, at the embeddings' init scale (the paper
            adds one on some synthetic tasks). Attention layers apply RoPE either way.
        z_loss: coefficient of mean(logsumexp(logits)^2), added to the loss in training mode only.
        fused_cross_entropy: compute the loss chunk by chunk from the hidden states without
            materialising the full fp32 logits (logits are then not returned when labels are given).
        ce_chunk_size: tokens per chunk of the fused cross-entropy.
        init_std: base std of DCLM-style init; None = 1/sqrt(fan_in) per matrix (see modeling.py).
        tokenizer_vocab_size: if given (e.g. ``len(tokenizer)``), must be <= vocab_size.
        pad_vocab_size_multiple: round vocab_size up to a multiple of this (the extra rows are never
            targets). An odd vocabulary (GPT-NeoX's 50,277) makes cuBLAS pick slow unaligned kernels for
            the embedding-gradient and LM-head GEMMs (~4 ms each at 400M, batch 4 x 2048 on an H200);
            the paper-size presets pad to 64. Idempotent, so a saved config reloads unchanged.
    """

    model_type = "pararnn_lm"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 50277,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        intermediate_size: int = 768,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        mixer: str = "paragru",
        layer_pattern: list[str] | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        rnn_num_heads: int | None = None,
        rnn_expand: int = 1,
        rnn_gain_bound: float | None = 0.5,
        rnn_gain_norm: str = "channel",
        rnn_mode: str = "auto",
        rnn_newton: dict[str, Any] | None = None,
        rnn_bias: bool = True,
        conv_kernel: int = 4,
        mamba_expand: int = 2,
        mamba_headdim: int = 64,
        mamba_d_state: int = 128,
        mamba_ngroups: int = 1,
        mamba_chunk_size: int = 64,
        mamba_dt_min: float = 1e-3,
        mamba_dt_max: float = 0.1,
        mamba_dt_init_floor: float = 1e-4,
        mamba_A_init_range: tuple[float, float] = (1.0, 16.0),
        ssd_backend: str = "auto",
        attention_impl: str = "auto",
        bare_mixer: bool = False,
        bare_mixer_norms: bool = False,
        position_encoding: str | None = None,
        z_loss: float = 0.0,
        fused_cross_entropy: bool = False,
        ce_chunk_size: int = 4096,
        init_std: float | None = None,
        tokenizer_vocab_size: int | None = None,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_vocab_size_multiple: int = 1,
        **kwargs: Any,
    ) -> None:
        if not isinstance(pad_vocab_size_multiple, int) or pad_vocab_size_multiple < 1:
            raise ValueError(f"pad_vocab_size_multiple must be a positive integer, got {pad_vocab_size_multiple!r}")
        self.pad_vocab_size_multiple = pad_vocab_size_multiple
        self.vocab_size = -(-vocab_size // pad_vocab_size_multiple) * pad_vocab_size_multiple
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.mixer = mixer
        self.layer_pattern = list(layer_pattern) if layer_pattern is not None else None
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.rnn_num_heads = rnn_num_heads
        self.rnn_expand = rnn_expand
        self.rnn_gain_bound = rnn_gain_bound
        self.rnn_gain_norm = rnn_gain_norm
        self.rnn_mode = rnn_mode
        self.rnn_newton = dict(rnn_newton or {})
        self.rnn_bias = rnn_bias
        self.conv_kernel = conv_kernel
        self.mamba_expand = mamba_expand
        self.mamba_headdim = mamba_headdim
        self.mamba_d_state = mamba_d_state
        self.mamba_ngroups = mamba_ngroups
        self.mamba_chunk_size = mamba_chunk_size
        self.mamba_dt_min = mamba_dt_min
        self.mamba_dt_max = mamba_dt_max
        self.mamba_dt_init_floor = mamba_dt_init_floor
        self.mamba_A_init_range = list(mamba_A_init_range)
        self.ssd_backend = ssd_backend
        self.attention_impl = attention_impl
        self.bare_mixer = bare_mixer
        self.bare_mixer_norms = bare_mixer_norms
        self.position_encoding = position_encoding
        self.z_loss = z_loss
        self.fused_cross_entropy = fused_cross_entropy
        self.ce_chunk_size = ce_chunk_size
        self.init_std = init_std
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs,
        )
        self.validate_fields()

    # ------------------------------------------------------------------ helpers
    @property
    def mixers(self) -> list[str]:
        """The mixer of every layer."""
        return list(self.layer_pattern) if self.layer_pattern is not None else [self.mixer] * self.num_hidden_layers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rnn_heads(self) -> int:
        return self.rnn_num_heads if self.rnn_num_heads is not None else self.num_attention_heads

    @property
    def rnn_inner_size(self) -> int:
        return self.rnn_expand * self.hidden_size

    @property
    def mamba_inner_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_num_heads(self) -> int:
        return self.mamba_inner_size // self.mamba_headdim

    def validate_fields(self) -> None:
        """Raise ``ValueError`` naming the offending field(s)."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"ParaRNNLMConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "conv_kernel"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        need(isinstance(self.intermediate_size, int) and self.intermediate_size >= 0,
             f"intermediate_size must be an int >= 0 (0 = no MLP), got {self.intermediate_size!r}")
        known = known_mixers()
        need(self.mixer in known, f"unknown mixer {self.mixer!r}; known mixers: {', '.join(known)}")
        if self.layer_pattern is not None:
            need(len(self.layer_pattern) == self.num_hidden_layers,
                 f"layer_pattern has {len(self.layer_pattern)} entries but num_hidden_layers={self.num_hidden_layers}")
            bad = sorted({m for m in self.layer_pattern if m not in known})
            need(not bad, f"unknown mixer(s) {bad} in layer_pattern; known mixers: {', '.join(known)}")
        used = set(self.mixers)
        if "attention" in used:
            need(self.hidden_size % self.num_attention_heads == 0,
                 f"num_attention_heads={self.num_attention_heads} does not divide hidden_size={self.hidden_size}")
            need(self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}")
            need(self.head_dim % 2 == 0, f"attention head_dim={self.head_dim} must be even for RoPE")
        if used & set(RNN_MIXERS):
            need(self.rnn_expand >= 1, f"rnn_expand must be >= 1, got {self.rnn_expand}")
            need(self.rnn_heads > 0 and self.rnn_inner_size % self.rnn_heads == 0,
                 f"{'rnn_num_heads' if self.rnn_num_heads is not None else 'num_attention_heads'}={self.rnn_heads} "
                 f"(ParaRNN heads) does not divide the RNN width "
                 f"{self.rnn_inner_size} (= rnn_expand * hidden_size)")
            need(self.rnn_gain_bound is None or self.rnn_gain_bound > 0,
                 f"rnn_gain_bound must be > 0 or None, got {self.rnn_gain_bound}")
            need(self.rnn_gain_norm in ("channel", "row"),
                 f"rnn_gain_norm must be 'channel' or 'row', got {self.rnn_gain_norm!r}")
        if "mamba2" in used:
            need(self.mamba_inner_size % self.mamba_headdim == 0,
                 f"mamba_headdim={self.mamba_headdim} does not divide mamba_expand*hidden_size={self.mamba_inner_size}")
            need(self.mamba_num_heads % self.mamba_ngroups == 0,
                 f"mamba_ngroups={self.mamba_ngroups} must divide the Mamba2 head count {self.mamba_num_heads}")
            need(self.mamba_chunk_size > 0, f"mamba_chunk_size must be > 0, got {self.mamba_chunk_size}")
        need(self.ssd_backend in SSD_BACKENDS,
             f"ssd_backend must be one of {'|'.join(SSD_BACKENDS)}, got {self.ssd_backend!r}")
        need(self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl must be one of {'|'.join(ATTENTION_IMPLS)}, got {self.attention_impl!r}")
        need(self.position_encoding in POSITION_ENCODINGS,
             f"position_encoding must be None or 'sinusoidal', got {self.position_encoding!r}")
        need(not self.bare_mixer_norms or self.bare_mixer, "bare_mixer_norms needs bare_mixer=True")
        if self.position_encoding == "sinusoidal":
            need(self.hidden_size % 2 == 0, f"a sinusoidal position encoding needs an even hidden_size, got {self.hidden_size}")
        need(self.z_loss >= 0, f"z_loss must be >= 0, got {self.z_loss}")
        need(self.ce_chunk_size > 0, f"ce_chunk_size must be > 0, got {self.ce_chunk_size}")
        if self.tokenizer_vocab_size is not None:
            need(self.tokenizer_vocab_size <= self.vocab_size,
                 f"the tokenizer has {self.tokenizer_vocab_size} tokens but vocab_size={self.vocab_size}: "
                 "token ids would index past the embedding table")
