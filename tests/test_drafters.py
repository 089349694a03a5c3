"""Drafters on synthetic sequences: what they propose and how they learn."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgespec.drafting import FusedDrafter, PromptLookupDrafter, TokenRecyclingDrafter, make_drafter
from edgespec.drafting.base import AcceptanceStats, ShadowLog
from edgespec.tree import TokenTree


def _logits_favouring(rows: list[list[int]], vocab: int) -> np.ndarray:
    """Logits whose ranking puts ``rows[i]`` first, in order, for node ``i``."""
    out = np.zeros((len(rows), vocab), dtype=np.float32)
    for i, ranked in enumerate(rows):
        out[i, ranked] = np.arange(len(ranked), 0, -1, dtype=np.float32)
    return out


def test_recycling_matrix_rows_hold_the_targets_top_k() -> None:
    d = TokenRecyclingDrafter(vocab_size=50, k=4)
    tree = TokenTree([7, 9], [-1, 0])
    d.observe(tree, _logits_favouring([[3, 1, 4, 2], [5, 6, 7, 8]], 50), accepted=[0])
    assert d.matrix[7].tolist() == [3, 1, 4, 2]
    assert d.matrix[9].tolist() == [5, 6, 7, 8]
    assert (d.matrix[8] == -1).all()  # untouched rows stay unknown


def test_recycling_drafts_best_first_along_the_matrix() -> None:
    d = TokenRecyclingDrafter(vocab_size=50, k=4)
    d.matrix[1] = [2, 3, 4, 5]
    d.matrix[2] = [6, 7, 8, 9]
    tree = d.draft([0, 1], budget=4)
    assert tree.tokens[0] == 1
    assert tree.tokens[1] == 2  # rank 0 of the root's row comes first
    assert len(tree) == 4
    assert all(a >= b for a, b in zip(tree.scores, tree.scores[1:]))


def test_recycling_learns_from_the_text_that_followed_even_unverified_drafts() -> None:
    d = TokenRecyclingDrafter(vocab_size=20, k=2)
    d.matrix[1], d.matrix[2] = [2, 3], [1, 3]
    context = [1]
    before = d.draft(context, budget=2).scores[1]
    for _ in range(20):  # the text alternates 1, 2, 1, 2: rank 0 is always right
        context.append(3 - context[-1])
        d.draft(context, budget=2)  # nothing verified: the proposals are judged by the text
    assert d.draft(context, budget=2).scores[1] > before + 0.3


def test_recycling_idles_while_its_nodes_are_never_verified() -> None:
    """Unwanted, it drafts and updates its matrix on one step in eight; one of its nodes
    being verified wakes it for good."""
    d = TokenRecyclingDrafter(vocab_size=50, k=2)
    d.matrix[1] = [2, 3]
    plain = TokenTree.root(1)
    for _ in range(40):  # the policy verifies none of its drafts
        d.draft([0, 1], budget=4)
        d.observe(plain, _logits_favouring([[4, 5]], 50), accepted=[0])
    awake = []
    for step in range(16):
        tree = d.draft([0, 1], budget=4)
        d.observe(plain, _logits_favouring([[10 + step, 30 + step]], 50), accepted=[0])
        awake.append(len(tree) > 1)
    assert sum(awake) == 2
    last = max(i for i, a in enumerate(awake) if a)
    assert d.matrix[1].tolist() == [10 + last, 30 + last]  # idle steps left it alone
    tree = d.draft([0, 1], budget=4)
    while len(tree) == 1:
        tree = d.draft([0, 1], budget=4)
    d.observe(tree, _logits_favouring([[8, 9]] * len(tree), 50), accepted=[0])
    assert all(len(d.draft([0, 1], budget=4)) > 1 for _ in range(16))


def _cycle_recycler() -> TokenRecyclingDrafter:
    """A recycling drafter whose matrix has learned the cycle 7 → 8 → 9 → 7."""
    d = TokenRecyclingDrafter(vocab_size=12, k=2)
    d.matrix[[7, 8, 9]] = [[8, 1], [9, 1], [7, 1]]
    return d


@pytest.mark.parametrize("make", [PromptLookupDrafter, _cycle_recycler],
                         ids=["lookup", "recycling"])
def test_below_the_entry_score_a_drafter_proposes_nothing_but_keeps_learning(make) -> None:
    """A draft too weak to pay yields the bare root; its first node still reaches the
    shadow log, so once the text keeps repeating, the estimate rises past the entry score."""
    d = make()
    context = [7, 8, 9] * 2
    assert len(d.draft(context, budget=4, entry_score=0.99)) == 1
    weak = d.draft(context, budget=4).scores[1]
    for _ in range(30):
        context.append(context[-3])  # the text continues the repetition
        d.draft(context, budget=4, min_score=0.9, entry_score=0.99)
    assert d.draft(context, budget=4).scores[1] > weak + 0.3
    assert len(d.draft(context, budget=4, entry_score=0.5)) > 1


def test_shadow_log_judges_every_node_against_the_continuation() -> None:
    stats = AcceptanceStats(prior=0.5)
    log = ShadowLog(stats, "x")
    tree = TokenTree([9, 1, 2, 3], [-1, 0, 1, 0], ["root", "x/a", "x/b", "x/c"])
    log.propose([5, 9], tree)
    log.propose([5, 9, 1], TokenTree.root(1))  # too short to judge depth 2 yet
    assert stats.rate("x/a") == 0.5
    log.propose([5, 9, 1, 4], TokenTree.root(4))  # 1 followed 9, then 4 (not 2)
    assert stats.rate("x/a") > 0.5 > stats.rate("x/b")
    assert stats.rate("x/c") < 0.5  # a sibling that lost


def test_a_probe_is_judged_by_the_token_that_followed_and_dropped_after_a_rewind() -> None:
    stats = AcceptanceStats(prior=0.5)
    log = ShadowLog(stats, "x")
    log.probe([5, 9], 1, "x/hit")
    log.probe([5, 9, 1], 2, "x/miss")  # judges the first probe: 1 did follow 9
    log.probe([5, 9, 1, 3], 4, "x/moot")  # 3 followed, not 2
    log.probe([7, 7], 4, "x/new")  # the context was replaced: the pending probe is moot
    log.probe([7, 7, 4], 4, "x/new")
    assert stats.rate("x/hit") > 0.5 > stats.rate("x/miss")
    assert stats.rate("x/moot") == 0.5 and stats.rate("x/new") > 0.5


@given(st.lists(st.integers(0, 9), min_size=4, max_size=60), st.integers(2, 12))
def test_lookup_proposes_what_followed_the_longest_earlier_match(seq: list[int],
                                                                 budget: int) -> None:
    d = PromptLookupDrafter(max_ngram=3, max_branches=1)
    tree = d.draft(seq, budget)
    assert tree.tokens[0] == seq[-1] and len(tree) <= budget
    if len(tree) == 1:
        return
    chain = tree.tokens[1:]
    # the proposal must be a real continuation of an earlier occurrence of some suffix
    found = False
    for n in range(3, 0, -1):
        suffix = seq[-n:]
        for start in range(n, len(seq)):
            if seq[start - n:start] == suffix and start < len(seq) and \
                    seq[start:start + len(chain)] == chain:
                found = True
    assert found


def test_lookup_copies_a_repeated_phrase_and_follows_rewinds() -> None:
    d = PromptLookupDrafter()
    text = [1, 2, 3, 4, 5, 6, 9, 9, 1, 2, 3]
    assert d.draft(text, budget=4).tokens == [3, 4, 5, 6]
    rewound = [7, 7, 7, 1, 2, 3]  # not an extension of the indexed context: index rebuilt
    assert d.draft(rewound, budget=4).tokens == [3]


def test_lookup_learns_ambiguous_matches_apart_from_unique_ones() -> None:
    """An n-gram that has been followed by different tokens is a worse bet than one always
    followed by the same token; the two kinds must not share an acceptance estimate."""
    d = PromptLookupDrafter(max_ngram=2)
    unique = [1, 2, 3, 8, 1, 2]
    assert d.draft(unique, budget=2).sources[1].split("/")[2] == "u"
    context = [5, 6, 7, 9, 5, 6, 4]  # "5 6" is ambiguous: followed by 7, then by 4
    for _ in range(20):  # ... and each time the text goes on with something new
        context += [5, 6]
        tree = d.draft(context, budget=8)
        firsts = [tree.sources[i] for i in range(1, len(tree)) if tree.parents[i] == 0]
        assert [s.split("/")[2] for s in firsts] == ["n", "o"]
        context.append(10 + len(context))
    d.draft(context, budget=8)  # judge the last proposal
    d2 = PromptLookupDrafter(max_ngram=2)
    d2.stats = d.stats
    assert d2.draft(unique, budget=2).scores[1] > d.draft(context + [5, 6], budget=8).scores[1]


def test_fused_merges_both_drafters_into_one_tree() -> None:
    lookup, recycling = PromptLookupDrafter(), TokenRecyclingDrafter(vocab_size=20, k=2)
    recycling.matrix[3] = [4, 8]
    fused = FusedDrafter([lookup, recycling])
    tree = fused.draft([1, 2, 3, 4, 5, 1, 2, 3], budget=8)
    assert tree.tokens[:3] == [3, 4, 5]  # lookup chain; recycling's "4" merged into it
    assert 8 in tree.tokens
    assert tree.tokens.count(4) == 1 or tree.parents[tree.tokens.index(4)] == 0


def test_make_drafter_none_is_plain_decoding(tiny_gguf) -> None:
    from runtimes.reference import ReferenceBackend

    assert make_drafter("none", ReferenceBackend(tiny_gguf)) is None
