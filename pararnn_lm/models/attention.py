"""Document-masked causal attention through FlexAttention, for packed rows (documents inside a row).

The plain SDPA path (``models.mixers.AttentionMixer``) needs a dense boolean (B, 1, T, S) causal &
same-document mask for packed rows, and SDPA then cannot use its flash kernel (400M on an H100:
143k tokens/s packed against 184k with one document per row). FlexAttention
(``torch.nn.attention.flex_attention``, torch >= 2.5) takes the same mask as a ``mask_mod``
``causal & doc[b, q] == doc[b, kv]`` and a block-sparse ``BlockMask``: a fused kernel that skips
the blocks between documents.

- The ``BlockMask`` is built once per forward by the model (``ParaRNNLMModel._attention_mask``) and
  handed to every attention layer as their ``attn_mask``; ``create_block_mask`` on device tensors
  reads nothing back to the host (sums and argsorts only).
- Which path runs is decided by ``ParaRNNLMConfig.attention_impl`` (see :func:`use_flex`): ``auto``
  takes flex only for CUDA tensors without a cache whose rows are not known to hold one document
  each; plain causal rows keep SDPA's ``is_causal`` flash path; the cache (decoding, prefill)
  and CPU keep the dense-mask SDPA path, which stays the reference and the fallback on a torch
  without FlexAttention (the HF export imports this module with only torch + transformers).
- Numerics equal the SDPA path's: default scale 1/sqrt(head_dim), no dropout, no softcap; GQA via
  ``enable_gqa=True``, whose query-head -> kv-head map (h // (H / Hkv)) is ``repeat_interleave``'s.

The attention mixer (``models.mixers.AttentionMixer``) takes this path when the model hands it a
``BlockMask``; this module holds the FlexAttention helpers and imports nothing from the mixers.
"""
from __future__ import annotations

import torch

_API: tuple | bool | None = None  # (flex_attention, create_block_mask, BlockMask), False when unavailable
_COMPILED_FLEX = None


def flex_api() -> tuple | None:
    """(flex_attention, create_block_mask, BlockMask), or None on a torch without FlexAttention."""
    global _API
    if _API is None:
        try:
            from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
            _API = (flex_attention, create_block_mask, BlockMask)
        except ImportError:  # torch < 2.5
            _API = False
    return _API or None


def flex_available() -> bool:
    return flex_api() is not None


def is_block_mask(mask) -> bool:
    api = flex_api()
    return api is not None and isinstance(mask, api[2])


def use_flex(impl: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, has_cache: bool,
             one_document_per_row: bool) -> bool:
    """Whether a forward runs its attention layers through FlexAttention (never syncs).

    ``sdpa``: never. ``flex``: whenever there is no cache (forced; also rows of one document, and CPU,
    where only the forward is supported by torch). ``auto``: CUDA, no cache, rows not known to hold
    one document each (packed position_ids / cu_seqlens / padding: deciding whether they really
    contain document starts would read the positions back, a host sync), fp16/bf16/fp32, and a
    head dim the flex kernel takes without padding (power of two >= 16).
    """
    if impl == "sdpa" or has_cache or not flex_available():
        return False
    if impl == "flex":
        return True
    return (device.type == "cuda" and not one_document_per_row
            and dtype in (torch.float16, torch.bfloat16, torch.float32)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0)


def _document_causal_mask_mod(doc_ids: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


def document_block_mask(doc_ids: torch.Tensor):
    """BlockMask of causal & same-document attention for (B, T) document ids (no cached prefix).

    Built eagerly on ``doc_ids``' device: the (B, 1, T, T) mask is evaluated once per forward (as
    large as the dense SDPA mask, freed right away) and reduced to per-block counts and indices
    (sums, argsort: no host sync); every attention layer then shares it.
    """
    B, T = doc_ids.shape
    create_block_mask = flex_api()[1]
    return create_block_mask(_document_causal_mask_mod(doc_ids), B, None, T, T, device=doc_ids.device)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, enable_gqa: bool) -> torch.Tensor:
    """(B, H, T, hd) x (B, Hkv, T, hd) -> (B, H, T, hd) under ``block_mask``.

    Inside torch.compile (training compiles every decoder block: pararnn_lm/training/build.py compile_blocks)
    ``flex_attention`` is traced into the block's graph and lowered to the fused kernel. Called
    eagerly it would run PyTorch's unfused reference (it materialises the full score matrix, slower
    than the SDPA dense-mask path), so on CUDA eager callers go through one module-level
    ``torch.compile(flex_attention)``, the usage PyTorch documents; new shapes recompile it (then it
    goes dynamic). On CPU (only reached with ``attention_impl="flex"``) the eager reference runs:
    torch has no flex backward there, and compiling would only slow the tests.
    """
    flex = flex_api()[0]
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        global _COMPILED_FLEX
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex)
        flex = _COMPILED_FLEX
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return flex(q, k, v, block_mask=block_mask, **kwargs)
