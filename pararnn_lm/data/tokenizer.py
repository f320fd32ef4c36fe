"""Tokenizers: train a byte-level BPE with ``tokenizers``, save/load it as a transformers tokenizer.

A trained tokenizer is saved as a ``PreTrainedTokenizerFast`` directory (``tokenizer.json`` +
``tokenizer_config.json``), so the exporter can copy it next to a model and ``AutoTokenizer`` loads it.
Byte-level BPE is lossless: ``decode(encode(text)) == text`` for any Unicode text, no unknown tokens.

Special tokens: ``<|endoftext|>`` (EOS, appended to every document: the document separator; also used as
padding) and ``<|startoftext|>`` (BOS, prepended only with ``data.add_bos``). Both are always in the
vocabulary (ids 0 and 1) so toggling ``add_bos`` does not need a new tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterable, Iterator, Optional

from ._cache import atomic_directory, cache_root, file_lock

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN)
TOKENIZER_FORMAT = "bytebpe-v1"  # bump when the training recipe changes: invalidates cached tokenizers


class TokenizerError(ValueError):
    """A tokenizer cannot be trained, found or used with the data."""


def _capped(texts: Iterable[str], max_chars: Optional[int]) -> Iterator[str]:
    total = 0
    for text in texts:
        if max_chars is not None and total >= max_chars:
            logger.info("tokenizer training stopped at %d characters (data.tokenizer_train_max_chars)", total)
            return
        total += len(text)
        yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2,
                    max_chars: Optional[int] = None, save_dir: Optional[str | os.PathLike] = None,
                    show_progress: bool = False):
    """Train a byte-level BPE on ``texts`` and return it as a ``PreTrainedTokenizerFast``.

    ``vocab_size`` counts the 256 byte tokens, the merges and the special tokens. With ``save_dir`` the
    tokenizer is also saved there (``save_pretrained``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                             f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    backend = Tokenizer(models.BPE())
    # add_prefix_space=False keeps the encoding lossless (no space invented at the start of a text).
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    seen = {"docs": 0}

    def counted() -> Iterator[str]:
        for text in _capped(texts, max_chars):
            seen["docs"] += 1
            yield text

    backend.train_from_iterator(counted(), trainer)
    if seen["docs"] == 0:
        raise TokenizerError("cannot train a tokenizer on an empty dataset (no documents)")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=BOS_TOKEN, pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False, model_max_length=1 << 30,
    )
    logger.info("trained a byte-level BPE tokenizer: %d tokens from %d documents", len(tokenizer), seen["docs"])
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_tokenizer(name_or_path: str):
    """Load a tokenizer directory or hub name with ``AutoTokenizer``; it must have an EOS token."""
    from transformers import AutoTokenizer

    expanded = os.path.expanduser(str(name_or_path))
    # Hub ids are "name" or "org/name"; anything else that is not a directory is a missing local path.
    looks_local = str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1 or os.path.isfile(expanded)
    if not os.path.isdir(expanded) and looks_local:
        raise TokenizerError(f"tokenizer directory not found: {expanded}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(expanded if os.path.isdir(expanded) else name_or_path)
    except Exception as err:  # OSError, ValueError, HF hub errors: all mean "could not load"
        if os.path.isdir(expanded):
            raise TokenizerError(f"cannot load the tokenizer in {expanded}: {err}") from err
        hint = ("offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE=1) and it is not in the local cache; "
                "run once with network or pass a local directory" if _offline()
                else "check the name and the network connection")
        raise TokenizerError(f"cannot load tokenizer {name_or_path!r} from the Hugging Face hub: {hint} ({type(err).__name__}: {err})") from err
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"tokenizer {name_or_path!r} has no EOS token; the data pipeline needs one as the document separator")
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids (vocab, merges, normalizer, pre-tokenizer, added tokens).

    Post-processor, padding and truncation settings are left out: they do not change the ids we store, and
    transformers rewrites the post-processor when it wraps a tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        payload = {k: spec.get(k) for k in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
    else:  # a slow (e.g. sentencepiece) tokenizer: its vocabulary is the best proxy we have
        payload = {"vocab": sorted(tokenizer.get_vocab().items()), "class": type(tokenizer).__name__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def get_or_train_tokenizer(source, vocab_size: int = 4096, cache_dir: str = "~/.cache/pararnn_lm/data", *,
                           min_frequency: int = 2, max_chars: Optional[int] = None):
    """The tokenizer trained on ``source`` with these settings: loaded from the cache when it exists.

    The cache key covers the source fingerprint and every training setting, so the bundled corpus with the
    same settings trains once and is reused afterwards (also across processes: a file lock serialises it).
    """
    key = hashlib.sha256(json.dumps(
        [TOKENIZER_FORMAT, source.fingerprint, vocab_size, min_frequency, max_chars, list(SPECIAL_TOKENS)]
    ).encode()).hexdigest()[:20]
    root = cache_root(cache_dir)
    directory = root / "tokenizers" / key
    with file_lock(root / "locks" / f"tokenizer-{key}.lock"):
        if (directory / "tokenizer.json").is_file():
            logger.info("reusing the cached tokenizer %s", directory)
            return load_tokenizer(str(directory))
        logger.info("training a %d-token byte-level BPE on %s", vocab_size, source.name)
        with atomic_directory(directory) as tmp:
            try:
                train_tokenizer(source.texts(), vocab_size, min_frequency=min_frequency, max_chars=max_chars, save_dir=tmp)
            except TokenizerError as err:
                raise TokenizerError(f"{err} in {source.name}") from err
            (tmp / "pararnn_data.json").write_text(json.dumps(
                {"format": TOKENIZER_FORMAT, "source": source.name, "source_fingerprint": source.fingerprint,
                 "vocab_size": vocab_size, "min_frequency": min_frequency, "max_chars": max_chars}, indent=2))
    return load_tokenizer(str(directory))
