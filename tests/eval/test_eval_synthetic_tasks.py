"""Synthetic-task generators: every label checked by an independent, loop-based solver."""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.eval.synthetic import IGNORE_INDEX, TASKS, k_hop, keep_nth, make_splits, mqar, parity


# ---- independent solvers: plain Python over token lists, no tensors, written from the definitions ----

def solve_keep_nth(tokens: list[int], n: int, scoring: str = "dense") -> dict[int, int]:
    answer = tokens[n - 1]
    if scoring == "last":
        return {len(tokens) - 1: answer}
    return {i: answer for i in range(n, len(tokens))}  # every position after the n-th token


def solve_parity(tokens: list[int], scoring: str = "dense") -> dict[int, int]:
    ones, answers = 0, {}
    for i, t in enumerate(tokens):
        if t == 1:
            ones += 1
        answers[i] = ones % 2
    return answers if scoring == "dense" else {len(tokens) - 1: answers[len(tokens) - 1]}


def solve_mqar_dense(tokens: list[int], pairs: int) -> dict[int, int]:
    """From the first bound key read after the prefix on: the value of the most recent one."""
    binding = {tokens[2 * i]: tokens[2 * i + 1] for i in range(pairs)}
    answers, current = {}, None
    for pos in range(2 * pairs, len(tokens)):
        if tokens[pos] in binding:
            current = binding[tokens[pos]]
        if current is not None:
            answers[pos] = current
    return answers


def solve_mqar_ours(tokens: list[int], vocab: int, pairs: int) -> dict[int, int]:
    """Our layout: every key after the prefix is a query (noise holds values only)."""
    binding = {tokens[2 * i]: tokens[2 * i + 1] for i in range(pairs)}
    return {pos: binding[tokens[pos]] for pos in range(2 * pairs, len(tokens)) if tokens[pos] < vocab // 2}


def solve_hop(tokens: list[int], k: int) -> dict[int, int]:
    def find(i: int) -> int | None:
        # walk backwards from i-1 looking for the same token as position i
        p = i - 1
        while p >= 0:
            if tokens[p] == tokens[i]:
                return p + 1
            p -= 1
        return None

    answers = {}
    for i in range(len(tokens)):
        j: int | None = i
        for _ in range(k):
            j = find(j)
            if j is None:
                break
        if j is not None:
            answers[i] = tokens[j]
    return answers


def labels_of(batch, row: int) -> dict[int, int]:
    t, m = batch.targets[row].tolist(), batch.loss_mask[row].tolist()
    return {i: t[i] for i in range(len(t)) if m[i]}


def check_row_common(batch, row: int, vocab: int) -> None:
    assert batch.input_ids.dtype == torch.long and batch.targets.dtype == torch.long
    assert batch.loss_mask.dtype == torch.bool
    x = batch.input_ids[row]
    assert int(x.min()) >= 0 and int(x.max()) < vocab
    tg, m = batch.targets[row], batch.loss_mask[row]
    assert bool((tg[~m] == IGNORE_INDEX).all()) and bool((tg[m] >= 0).all()) and bool((tg[m] < vocab).all())


@pytest.mark.parametrize("scoring", ["dense", "last"])
@pytest.mark.parametrize("seq_len", [100, 17, 6])
def test_keep_nth_solver(seq_len, scoring):
    b = keep_nth(200, seq_len, 128, n=5, seed=3, scoring=scoring)
    for r in range(len(b)):
        check_row_common(b, r, 128)
        assert labels_of(b, r) == solve_keep_nth(b.input_ids[r].tolist(), 5, scoring)
    assert int(b.loss_mask.sum()) == 200 * ((seq_len - 5) if scoring == "dense" else 1)
    assert torch.equal(b.input_ids, keep_nth(200, seq_len, 128, n=5, seed=3).input_ids)  # scoring moves labels only
    if scoring == "dense":  # Table 6's reading (module doc) is the default
        assert torch.equal(b.loss_mask, keep_nth(200, seq_len, 128, n=5, seed=3).loss_mask)


def test_keep_nth_needs_a_position_after_the_nth_token():
    with pytest.raises(ValueError, match="n < seq_len"):
        keep_nth(4, 5, 128, n=5)


@pytest.mark.parametrize("scoring", ["dense", "last"])
@pytest.mark.parametrize("seq_len", [100, 9])
def test_parity_solver(seq_len, scoring):
    b = parity(300, seq_len, seed=4, scoring=scoring)
    for r in range(len(b)):
        check_row_common(b, r, 2)
        assert labels_of(b, r) == solve_parity(b.input_ids[r].tolist(), scoring)
    # labels are balanced, so chance is 50 %
    assert 0.4 < b.targets[:, -1].float().mean().item() < 0.6


def test_parity_dense_is_running_parity():
    b = parity(20, 30, seed=5)  # dense is the default (module doc)
    for r in range(len(b)):
        toks = b.input_ids[r].tolist()
        assert labels_of(b, r) == {i: sum(toks[: i + 1]) % 2 for i in range(30)}


@pytest.mark.parametrize("pairs", [2, 8])
def test_mqar_our_layout_solver(pairs):
    b = mqar(300, 100, 128, num_pairs=pairs, seed=6, layout="ours")
    for r in range(len(b)):
        check_row_common(b, r, 128)
        toks = b.input_ids[r].tolist()
        keys = toks[0 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(k < 64 for k in keys) and all(v >= 64 for v in toks[1 : 2 * pairs : 2])
        got = labels_of(b, r)
        assert got == solve_mqar_ours(toks, 128, pairs)
        assert sorted(toks[p] for p in got) == sorted(keys)  # each key queried exactly once
        assert all((p - 2 * pairs) % 2 == 0 and toks[p + 1] == v for p, v in got.items())  # its value follows


@pytest.mark.parametrize("pairs", [2, 8])
def test_mqar_zoology_layout(pairs):
    """Zoology's multiquery_ar: distinct keys in [1, |V|/2) and values in [|V|/2, |V|), each key queried once at an
    even offset of the query region, noise over the whole vocabulary and no value after a query."""
    n, L, V = 400, 100, 128
    b = mqar(n, L, V, num_pairs=pairs, seed=6)  # the default layout
    assert torch.equal(b.input_ids, mqar(n, L, V, num_pairs=pairs, seed=6, layout="zoology").input_ids)
    context, offsets, followers, noise = 2 * pairs, [], [], []
    for r in range(n):
        check_row_common(b, r, V)
        toks = b.input_ids[r].tolist()
        keys, values = toks[0:context:2], toks[1:context:2]
        assert len(set(keys)) == pairs and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == pairs and all(V // 2 <= v < V for v in values)
        got = labels_of(b, r)
        assert len(got) == pairs and sorted(toks[p] for p in got) == sorted(keys)  # each key queried once
        for p, v in got.items():
            assert p >= context and (p - context) % 2 == 0 and v == values[keys.index(toks[p])]
            offsets.append((p - context) // 2)
            followers.append(toks[p + 1])
        noise += [t for p, t in enumerate(toks[context:], context) if p not in got]
    assert any(t < V // 2 for t in followers) and len(set(noise)) == V  # noise (keys too) follows a query
    # gaps follow Zoology's power law P(g) ~ (g + 1)^-0.99: short recall distances are the most frequent
    space = (L - context) // 2
    first_slot = sum(o == 0 for o in offsets) / len(offsets)
    assert max(offsets) < space and first_slot > 2 / space  # uniform offsets would give 1 / space


@pytest.mark.parametrize("layout", ["zoology", "ours"])
def test_mqar_dense_scoring_holds_the_last_recalled_value(layout):
    b = mqar(300, 100, 128, num_pairs=2, seed=8, layout=layout, scoring="dense")
    queried = mqar(300, 100, 128, num_pairs=2, seed=8, layout=layout)
    assert torch.equal(b.input_ids, queried.input_ids)  # scoring moves labels only
    for r in range(len(b)):
        check_row_common(b, r, 128)
        got = labels_of(b, r)
        assert got == solve_mqar_dense(b.input_ids[r].tolist(), 2)
        assert labels_of(queried, r).items() <= got.items()  # every query is scored densely too


def test_task_options_are_checked():
    for bad, match in [(dict(scoring="all"), "scoring"), (dict(layout="mad"), "layout")]:
        with pytest.raises(ValueError, match=match):
            mqar(4, 100, 128, **bad)
    with pytest.raises(ValueError, match="scoring"):
        keep_nth(4, 10, 8, scoring="query")
    with pytest.raises(ValueError, match="zoology"):
        mqar(4, 100, 64, num_pairs=2)  # Zoology's layout needs |V| > L
    with pytest.raises(ValueError, match="unknown task option"):
        TASKS["parity"].generate(4, dense=True)  # the option before scoring
    assert TASKS["mqar"].options(num_pairs=8) == {"num_pairs": 8, "layout": "zoology", "scoring": "query"}


@pytest.mark.parametrize("k,vocab", [(1, 10), (2, 5), (3, 4)])
def test_k_hop_solver(k, vocab):
    b = k_hop(100, 100, vocab, k=k, seed=7)
    for r in range(len(b)):
        check_row_common(b, r, vocab)
        assert labels_of(b, r) == solve_hop(b.input_ids[r].tolist(), k)


def test_k_hop_hand_example():
    # a b a c b a: 1-hop at i=2 (a) -> after the previous a (pos 0) comes b; i=4 (b) -> a; i=5 (a) -> c
    x = [0, 1, 0, 2, 1, 0]
    assert solve_hop(x, 1) == {2: 1, 4: 0, 5: 2}
    # 2-hop at i=4: find(4)=2, find(2)=1 -> b; at i=5: find(5)=3 (c) has no earlier c -> unscored
    assert solve_hop(x, 2) == {4: 1}
    from pararnn_lm.eval.synthetic.tasks import _find
    assert _find(torch.tensor([x]), 3).tolist() == [[-1, -1, 1, -1, 2, 3]]


def test_deterministic_and_splits_differ():
    for name, spec in TASKS.items():
        a = spec.generate(50, seed=11)
        b = spec.generate(50, seed=11)
        c = spec.generate(50, seed=12)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets), name
        assert not torch.equal(a.input_ids, c.input_ids), name
    s = make_splits("hop1", seed=0, n_train=64, n_test=128, n_val=32)
    assert {k: len(v) for k, v in s.items()} == {"train": 64, "test": 128, "val": 32}
    assert not torch.equal(s["train"].input_ids, s["test"].input_ids[:64])


def test_global_rng_untouched():
    torch.manual_seed(0)
    ref = torch.rand(3)
    torch.manual_seed(0)
    TASKS["mqar"].generate(10, seed=1)
    assert torch.equal(torch.rand(3), ref)


def test_paper_settings():
    assert {n: s.vocab_size for n, s in TASKS.items()} == {"keep_nth": 128, "parity": 2, "mqar": 128, "hop1": 10, "hop2": 5}
    assert {n: s.options() for n, s in TASKS.items()} == {
        "keep_nth": {"n": 5, "scoring": "dense"}, "parity": {"scoring": "dense"},
        "mqar": {"num_pairs": 2, "layout": "zoology", "scoring": "query"}, "hop1": {"k": 1}, "hop2": {"k": 2}}
