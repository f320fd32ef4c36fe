"""Generators for the ParaRNN paper's synthetic tasks (Table 6).

Every task produces a :class:`SyntheticBatch` of equal-length tensors

* ``input_ids`` (N, L) int64 - what the model reads,
* ``targets``   (N, L) int64 - the class to predict at each position (``IGNORE_INDEX`` where unscored),
* ``loss_mask`` (N, L) bool  - the scored positions (``targets != IGNORE_INDEX``).

The model emits logits (N, L, |V|) over the task vocabulary, and position ``t`` is scored against
``targets[:, t]`` (NOT the next input token: several tasks label a position with a token from the past).
Loss and accuracy are taken over the scored positions (token accuracy); which positions are scored is the
task option ``scoring``.

Task definitions (paper settings, arXiv 2510.21450 Table 6 and its appendix on the synthetic tasks: L = 100,
10k train / 100k test sequences). Where the paper leaves a detail open, the definitions below are our
reading of it and of the literature it cites; each is stated precisely so results are reproducible, and the
defaults (``pararnn_lm.eval.paper.TABLE6_TASKS``) say which reading Table 6 uses:

keep-nth (n=5, |V|=128)
    Tokens i.i.d. uniform over V. Target: the n-th token of the sequence (``input_ids[:, n-1]``).
    ``scoring="dense"`` (default): every position after it, t >= n (0-based); ``"last"``: the last
    position only (sequence accuracy). Solving it needs the model to know *when* the n-th token passes, i.e.
    to count: the paper adds a position encoding for the recurrent models here (impossible without, it says).
parity (|V|=2)
    Bits i.i.d. uniform. Target: the running (prefix) parity. ``scoring="dense"`` (default): every position;
    ``"last"``: only the XOR of all L bits, at the last position.

    Why dense: the paper's parity column has Transformer 53 % and Mamba2 52 %. Scored at the last position
    only, a model that has not learned parity sits at 50 % +- 0.16 % on a 100k test set, so 52-53 % is out
    of reach; scored at every position, a model that gets only the first few prefixes right (t = 0 is the
    current bit) scores 50 % + (a few)/L x 50 % - the published numbers. The same dense reading for keep-nth
    scores every position once its answer has been seen.
MQAR (|V|=128), multi-query associative recall (Arora et al. 2023, "Zoology"); ``num_pairs`` = D pairs
    A sequence starts with D key-value pairs ``k1 v1 ... kD vD`` (distinct keys); every key is then queried
    exactly once in the rest of the sequence (the query region). Two layouts:

    ``layout="zoology"`` (default; Zoology's ``multiquery_ar``): keys are distinct tokens of [1, |V|/2),
    values distinct tokens of [|V|/2, |V|). The i-th key's query sits at an even offset 2 g_i of the
    query region, the gaps g drawn without replacement from a power law P(g) ~ (g + 1)^(a - 1) with a =
    0.01 (queries crowd the start of the region: short recall distances, as between repeated bigrams in
    text). Every other position of the region is noise uniform over the WHOLE vocabulary - so noise may
    repeat a key - and nothing follows a query but noise: the "noise interleaved with the keys" of the
    paper. Zoology's vocabulary must exceed L (|V| = 128 > L = 100).

    ``layout="ours"``: keys are distinct tokens of [0, |V|/2), values uniform over [|V|/2, |V|) with
    replacement (two keys may share a value). Each key's query sits at a uniformly random even offset of
    the query region and is followed by its value (a language-model view of the task); the other
    positions are noise uniform over the VALUE half only, so the only keys after the prefix are the
    queries and no noise pair suggests a conflicting binding.

    ``scoring="query"`` (default): each planted query position, target its key's value. ``"dense"``: every
    position from the first query on, target the value of the most recent bound key read in the query
    region (a noise token that repeats a bound key counts as a query: the model cannot tell them apart),
    as keep-nth's dense reading holds its answer.
k-hop (1-hop |V|=10, 2-hop |V|=5), the hop_k task of Sanford, Hsu & Telgarsky (2024)
    Tokens i.i.d. uniform. ``find(i)`` = p + 1 where p < i is the last earlier position holding the
    same token as position i (undefined if there is none); so find(i) <= i. ``hop_k(i) =
    input_ids[find^k(i)]`` (find applied k times). 1-hop is the induction-head task ("what followed
    the previous occurrence of this token?"). Every position whose k-fold find is defined is scored.

All generators are deterministic functions of ``seed`` (a private ``torch.Generator``; the global RNG
is untouched) and vectorised, so the 100k-sequence test sets take well under a second.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..paper import TABLE6_TASKS

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class SyntheticBatch:
    input_ids: torch.Tensor  # (N, L) int64
    targets: torch.Tensor  # (N, L) int64, IGNORE_INDEX where unscored
    loss_mask: torch.Tensor  # (N, L) bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, idx: Any) -> "SyntheticBatch":
        return SyntheticBatch(self.input_ids[idx], self.targets[idx], self.loss_mask[idx])

    def to(self, device: torch.device | str) -> "SyntheticBatch":
        return SyntheticBatch(self.input_ids.to(device), self.targets.to(device), self.loss_mask.to(device))


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _finish(input_ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> SyntheticBatch:
    targets = torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX))
    return SyntheticBatch(input_ids.long().contiguous(), targets.long().contiguous(), mask.contiguous())


def _scoring(task: str, scoring: str, allowed: tuple[str, ...]) -> str:
    if scoring not in allowed:
        raise ValueError(f"{task}: scoring must be one of {'|'.join(allowed)}, got {scoring!r}")
    return scoring


def keep_nth(num: int, seq_len: int = 100, vocab_size: int = 128, n: int = 5, *, seed: int = 0,
             scoring: str = "dense") -> SyntheticBatch:
    """The n-th (1-based) token of the sequence, scored after it passes (dense) or at the end (module doc)."""
    _scoring("keep_nth", scoring, ("dense", "last"))
    if not 1 <= n < seq_len:
        raise ValueError(f"need 1 <= n < seq_len (some position must follow the n-th token), got n={n}, seq_len={seq_len}")
    x = torch.randint(0, vocab_size, (num, seq_len), generator=_gen(seed))
    targets = x[:, n - 1 : n].expand(num, seq_len).clone()
    mask = torch.zeros(num, seq_len, dtype=torch.bool)
    if scoring == "dense":
        mask[:, n:] = True
    else:
        mask[:, -1] = True
    return _finish(x, targets, mask)


def parity(num: int, seq_len: int = 100, vocab_size: int = 2, *, seed: int = 0,
           scoring: str = "dense") -> SyntheticBatch:
    """Running parity at every position (dense), or the XOR of all bits at the last position only."""
    _scoring("parity", scoring, ("dense", "last"))
    if vocab_size != 2:
        raise ValueError("parity is defined over bits: vocab_size must be 2")
    x = torch.randint(0, 2, (num, seq_len), generator=_gen(seed))
    running = torch.cumsum(x, dim=1) % 2  # prefix parity; the last column is the full parity
    mask = torch.zeros(num, seq_len, dtype=torch.bool)
    if scoring == "dense":
        mask[:] = True
    else:
        mask[:, -1] = True
    return _finish(x, running, mask)


ZOOLOGY_POWER_A = 0.01  # Zoology's default exponent of the query-gap power law


def mqar(num: int, seq_len: int = 100, vocab_size: int = 128, num_pairs: int = 2, *, seed: int = 0,
         layout: str = "zoology", scoring: str = "query") -> SyntheticBatch:
    """Multi-query associative recall in Zoology's layout or ours, scored at the queries or densely (module doc)."""
    _scoring("mqar", scoring, ("query", "dense"))
    layouts = {"zoology": _mqar_zoology, "ours": _mqar_ours}
    if layout not in layouts:
        raise ValueError(f"mqar: layout must be one of {'|'.join(layouts)}, got {layout!r}")
    x, keys, values, qpos = layouts[layout](num, seq_len, vocab_size, num_pairs, _gen(seed))
    rows = torch.arange(num)[:, None]
    targets = torch.zeros(num, seq_len, dtype=torch.long)
    mask = torch.zeros(num, seq_len, dtype=torch.bool)
    if scoring == "query":
        targets[rows, qpos] = values
        mask[rows, qpos] = True
        return _finish(x, targets, mask)
    # dense: from the first query on, the value of the most recent bound key read in the query region
    in_region = torch.arange(seq_len) >= 2 * num_pairs
    bound = (x[:, :, None] == keys[:, None, :]) & in_region[None, :, None]  # (num, L, D)
    value_here = values.gather(1, bound.to(torch.uint8).argmax(-1))  # the value of the key read at t, if any
    last_key = torch.where(bound.any(-1), torch.arange(seq_len), -1).cummax(dim=1).values
    return _finish(x, value_here.gather(1, last_key.clamp_min(0)), last_key >= 0)


def _mqar_zoology(num: int, seq_len: int, vocab_size: int, num_pairs: int, g: torch.Generator):
    """Zoology's layout: (inputs, keys, values, query positions), each key queried once (module doc)."""
    half, context = vocab_size // 2, 2 * num_pairs
    space = (seq_len - context) // 2  # even offsets of the query region where a query may sit
    if not 1 <= num_pairs < half or space < num_pairs or vocab_size <= seq_len:
        raise ValueError(f"mqar (zoology): num_pairs={num_pairs} does not fit seq_len={seq_len}, vocab_size="
                         f"{vocab_size} (needs 1 <= num_pairs < |V|/2, 4 num_pairs <= seq_len and |V| > seq_len)")
    keys = 1 + torch.rand(num, half - 1, generator=g).argsort(dim=1)[:, :num_pairs]
    values = half + torch.rand(num, vocab_size - half, generator=g).argsort(dim=1)[:, :num_pairs]
    x = torch.randint(0, vocab_size, (num, seq_len), generator=g)  # noise over the whole vocabulary
    x[:, 0:context:2] = keys
    x[:, 1:context:2] = values
    # gap g (0-based) has weight (g + 1)^(a - 1); multinomial without replacement draws them one after another
    weights = torch.arange(1, space + 1, dtype=torch.float64) ** (ZOOLOGY_POWER_A - 1)
    gaps = torch.multinomial(weights.expand(num, space), num_pairs, replacement=False, generator=g)
    qpos = context + 2 * gaps  # key i is queried at qpos[:, i]
    x[torch.arange(num)[:, None], qpos] = keys
    return x, keys, values, qpos


def _mqar_ours(num: int, seq_len: int, vocab_size: int, num_pairs: int, g: torch.Generator):
    """Our layout: (inputs, keys, values, query positions), each query followed by its value (module doc)."""
    half = vocab_size // 2
    query_len = seq_len - 2 * num_pairs
    slots = query_len // 2  # even offsets of the query region where a (key, value) pair fits
    if num_pairs < 1 or num_pairs > half or slots < num_pairs:
        raise ValueError(f"mqar (ours): num_pairs={num_pairs} does not fit seq_len={seq_len}, vocab_size={vocab_size}")
    rows = torch.arange(num)[:, None]
    keys = torch.rand(num, half, generator=g).argsort(dim=1)[:, :num_pairs]  # distinct keys per row
    values = torch.randint(half, vocab_size, (num, num_pairs), generator=g)
    x = torch.randint(half, vocab_size, (num, seq_len), generator=g)  # value-token noise, overwritten below
    x[:, 0 : 2 * num_pairs : 2] = keys
    x[:, 1 : 2 * num_pairs : 2] = values
    # Each key queried once, in a random order, at random distinct slots of the query region.
    order = torch.rand(num, num_pairs, generator=g).argsort(dim=1)
    slot = torch.rand(num, slots, generator=g).argsort(dim=1)[:, :num_pairs]
    qpos = 2 * num_pairs + 2 * slot  # (num, D) positions of the query keys, key order[:, i] at qpos[:, i]
    qkeys, qvals = keys.gather(1, order), values.gather(1, order)
    x[rows, qpos] = qkeys
    x[rows, qpos + 1] = qvals
    return x, qkeys, qvals, qpos


def _find(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """find(i) = 1 + last p < i with x[p] == x[i], or -1 (vectorised over rows, loop over time)."""
    num, seq_len = x.shape
    rows = torch.arange(num)
    last = torch.full((num, vocab_size), -1, dtype=torch.long)
    prev = torch.empty_like(x)
    for t in range(seq_len):
        tok = x[:, t]
        prev[:, t] = last[rows, tok]
        last[rows, tok] = t
    return torch.where(prev >= 0, prev + 1, torch.full_like(prev, -1))


def k_hop(num: int, seq_len: int = 100, vocab_size: int = 10, k: int = 1, *, seed: int = 0) -> SyntheticBatch:
    """hop_k of Sanford et al. (2024) at every position where it is defined (see module doc)."""
    if k < 1:
        raise ValueError("k must be >= 1")
    x = torch.randint(0, vocab_size, (num, seq_len), generator=_gen(seed))
    find = _find(x, vocab_size)
    idx = torch.arange(seq_len).expand(num, seq_len)
    valid = torch.ones(num, seq_len, dtype=torch.bool)
    for _ in range(k):
        idx = find.gather(1, idx.clamp_min(0))
        valid &= idx >= 0
    targets = x.gather(1, idx.clamp_min(0))
    return _finish(x, targets, valid)


@dataclass(frozen=True)
class TaskSpec:
    """A Table-6 column: its generator and its options (``kwargs``: the paper's, as we read it; the model each
    architecture uses on it is :mod:`pararnn_lm.eval.synthetic.models`' business)."""

    name: str
    fn: Callable[..., SyntheticBatch]
    vocab_size: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    title: str = ""

    def options(self, **overrides: Any) -> dict[str, Any]:
        """The generator options a run uses: ``kwargs`` updated by ``overrides`` (recorded in result files)."""
        known = set(inspect.signature(self.fn).parameters) - {"num", "seq_len", "vocab_size", "seed"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{self.name}: unknown task option(s) {unknown}")
        return {**self.kwargs, **overrides}

    def generate(self, num: int, seq_len: int = 100, *, seed: int = 0, **overrides: Any) -> SyntheticBatch:
        return self.fn(num, seq_len, self.vocab_size, seed=seed, **self.options(**overrides))


TASKS: dict[str, TaskSpec] = {
    "keep_nth": TaskSpec("keep_nth", keep_nth, 128, TABLE6_TASKS["keep_nth"], title="keep-nth (n=5,|V|=128)"),
    "parity": TaskSpec("parity", parity, 2, TABLE6_TASKS["parity"], title="parity (|V|=2)"),
    "mqar": TaskSpec("mqar", mqar, 128, TABLE6_TASKS["mqar"], title="MQAR (|V|=128)"),
    "hop1": TaskSpec("hop1", k_hop, 10, TABLE6_TASKS["hop1"], title="1-hop (|V|=10)"),
    "hop2": TaskSpec("hop2", k_hop, 5, TABLE6_TASKS["hop2"], title="2-hop (|V|=5)"),
}


def make_splits(task: str | TaskSpec, *, seed: int = 0, seq_len: int = 100, n_train: int = 10_000,
                n_test: int = 100_000, n_val: int = 0, **overrides: Any) -> dict[str, SyntheticBatch]:
    """Train / (val) / test splits, each from its own seed stream derived from ``seed``."""
    spec = TASKS[task] if isinstance(task, str) else task
    # Distinct, fixed offsets keep the splits independent yet reproducible from one seed.
    out = {"train": spec.generate(n_train, seq_len, seed=1_000_003 * seed + 1, **overrides),
           "test": spec.generate(n_test, seq_len, seed=1_000_003 * seed + 2, **overrides)}
    if n_val:
        out["val"] = spec.generate(n_val, seq_len, seed=1_000_003 * seed + 3, **overrides)
    log.debug("generated %s: %s", spec.name, {k: len(v) for k, v in out.items()})
    return out
