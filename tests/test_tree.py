"""TokenTree, TreeBuilder and greedy acceptance: structure and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgespec.engine import _exact_part
from edgespec.tree import TokenTree, TreeBuilder
from edgespec.verify import Acceptance, SamplingParams, accept

GREEDY = SamplingParams()


@st.composite
def trees(draw: st.DrawFn, vocab: int = 6, max_nodes: int = 12) -> TokenTree:
    """Random trees: each node picks an earlier node as parent; tokens from a tiny vocab."""
    n = draw(st.integers(1, max_nodes))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = [draw(st.integers(0, vocab - 1)) for _ in range(n)]
    return TokenTree(tokens, parents)


def test_depth_children_and_paths() -> None:
    t = TokenTree([5, 6, 7, 8], [-1, 0, 1, 0])
    assert t.depth == [0, 1, 2, 1]
    assert t.children == [[1, 3], [2], [], []]
    assert t.path_to(2) == [0, 1, 2]
    assert sorted(tuple(t.path_to(leaf)) for leaf in t.leaves()) == [(0, 1, 2), (0, 3)]
    assert t.ancestor_mask()[2].tolist() == [True, True, True, False]


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, 0, 5]])
def test_rejects_malformed_parents(parents: list[int]) -> None:
    with pytest.raises(ValueError):
        TokenTree([1] * len(parents), parents)


@given(trees(), st.integers(0, 2**32 - 1))
def test_greedy_accepts_a_root_path_of_argmax_matches(tree: TokenTree, seed: int) -> None:
    logits = np.random.default_rng(seed).standard_normal((len(tree), 6))
    result = accept(tree, logits, GREEDY, lambda depth: np.random.default_rng(0))
    path = result.path
    assert path[0] == 0
    assert path == tree.path_to(path[-1])  # a root path of the tree
    for parent, child in zip(path, path[1:]):
        assert tree.tokens[child] == int(np.argmax(logits[parent]))
    assert result.next_token == int(np.argmax(logits[path[-1]]))
    assert tree.child_with_token(path[-1], result.next_token) is None  # longest such path


@given(trees(), st.data())
def test_prune_keeps_an_ancestor_closed_subtree(tree: TokenTree, data: st.DataObject) -> None:
    leaf = data.draw(st.integers(0, len(tree) - 1))
    keep = tree.path_to(leaf)
    pruned = tree.prune(keep)
    assert pruned.tokens == [tree.tokens[i] for i in keep]
    assert pruned.parents == [-1, *range(len(keep) - 1)]


def test_builder_merges_identical_continuations() -> None:
    b = TreeBuilder(1)
    a = b.add(0, 2, 0.5, "x")
    assert b.add(0, 2, 0.9, "y") == a
    b.add(a, 3, 0.4, "x")
    other = TokenTree([1, 2, 4], [-1, 0, 1], scores=[1.0, 0.3, 0.2])
    b.graft(other)
    t = b.build()
    assert t.tokens == [1, 2, 3, 4]
    assert t.parents == [-1, 0, 1, 1]
    assert t.scores[1] == 0.9 and t.sources[1] == "y"


def test_best_first_puts_the_likeliest_branch_first() -> None:
    t = TokenTree([0, 1, 2, 3, 4], [-1, 0, 0, 2, 1], scores=[1.0, 0.3, 0.8, 0.7, 0.2])
    order = t.best_first()
    assert order[:3] == [0, 2, 3]  # root, best child, its best child: the main branch
    assert sorted(order) == list(range(5))
    for leaf in t.leaves():
        path = t.path_to(leaf)
        assert [i for i in order if i in path] == path  # every branch in ancestor order


def test_a_step_ends_where_the_accepted_path_leaves_the_best_first_layout() -> None:
    """Only nodes on the best-first prefix have bit-exact logits (their KV sits where plain
    decoding puts it): an accepted path leaving it ends at its first node off the prefix,
    emitted as the next token, and nothing after that node is used."""
    t = TokenTree([10, 11, 12, 13, 14], [-1, 0, 0, 2, 1], scores=[1.0, 0.3, 0.8, 0.7, 0.2])
    assert t.best_first()[:3] == [0, 2, 3]
    assert _exact_part(t, Acceptance([0, 2, 3], 99)) == ([0, 2, 3], 99)  # the main branch
    assert _exact_part(t, Acceptance([0, 1, 4], 99)) == ([0], 11)  # off it at once
    assert _exact_part(t, Acceptance([0], 99)) == ([0], 99)
    u = TokenTree([10, 11, 12, 13], [-1, 0, 1, 1], scores=[1.0, 0.9, 0.8, 0.1])
    assert _exact_part(u, Acceptance([0, 1, 3], 99)) == ([0, 1], 13)  # off it at depth 2
