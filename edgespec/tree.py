"""TokenTree: the candidate continuations verified in one backend call.

Node 0 is the *root*: the token the target has already chosen but not yet evaluated
(it is certain to be accepted). Every other node is a drafted guess whose parent
comes before it, so a tree is always in topological order and ``parents[i] < i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenTree:
    """Tokens with parent links; depth, children and masks are derived from them."""

    tokens: list[int]
    parents: list[int]
    sources: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    # draft_probs[node] is the distribution q a sampling drafter drew node's children from,
    # without replacement, in ``children[node]`` order. verify.accept then applies the
    # multi-candidate rejection rule with q; nodes without an entry use the one-hot rule.
    # prune() and TreeBuilder drop it, which is safe: the one-hot rule is lossless for any
    # children, it merely accepts less often.
    draft_probs: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.parents) or self.parents[0] != -1:
            raise ValueError("a tree needs a root (parent -1) and one parent per token")
        for i, p in enumerate(self.parents[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}; parents must precede children")
        if not self.sources:
            self.sources = ["root"] + ["draft"] * (len(self.tokens) - 1)
        if not self.scores:
            self.scores = [1.0] * len(self.tokens)
        depth = [0] * len(self.tokens)
        children: list[list[int]] = [[] for _ in self.tokens]
        for i, p in enumerate(self.parents[1:], start=1):
            depth[i] = depth[p] + 1
            children[p].append(i)
        self.depth = depth
        self.children = children

    @classmethod
    def root(cls, token: int) -> TokenTree:
        """A tree that only evaluates the pending token: plain decoding."""
        return cls([token], [-1], ["root"])

    @classmethod
    def chain(cls, root: int, draft: Sequence[int], source: str = "draft") -> TokenTree:
        """A single branch ``root → draft[0] → draft[1] …``."""
        n = len(draft)
        return cls([root, *draft], list(range(-1, n)), ["root"] + [source] * n)

    def prune(self, keep: Sequence[int]) -> TokenTree:
        """The subtree of the nodes in ``keep`` (which must contain each kept node's parent)."""
        order = sorted(set(keep) | {0})
        new_index = {old: new for new, old in enumerate(order)}
        return TokenTree(
            [self.tokens[i] for i in order],
            [-1] + [new_index[self.parents[i]] for i in order[1:]],
            [self.sources[i] for i in order],
            [self.scores[i] for i in order],
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def child_with_token(self, node: int, token: int) -> int | None:
        """The child of ``node`` that carries ``token``, if one was drafted."""
        for c in self.children[node]:
            if self.tokens[c] == token:
                return c
        return None

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root down to ``node``."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def leaves(self) -> list[int]:
        return [i for i, c in enumerate(self.children) if not c]

    def best_first(self) -> list[int]:
        """Nodes depth-first, best-scored child first.

        The likeliest branch is the prefix up to the first leaf. Backends lay a tree out in
        this order so that, when that branch is accepted, its KV already sits in
        consecutive cells after the context, as plain decoding would have written it
        (attention sums over cells in cell order; bit-exactness depends on it). Each
        root-to-leaf path still appears in ancestor order.
        """
        order, stack = [], [0]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(sorted(self.children[node], key=lambda c: (self.scores[c], -c)))
        return order

    def ancestor_mask(self) -> np.ndarray:
        """``mask[i, j]`` is true when node ``i`` may attend to node ``j`` (itself included)."""
        n = len(self.tokens)
        mask = np.zeros((n, n), dtype=bool)
        for i in range(n):
            mask[i, self.path_to(i)] = True
        return mask

    @property
    def max_depth(self) -> int:
        return max(self.depth)


class TreeBuilder:
    """Grows a tree as a trie: adding a token a parent already has merges the two drafts.

    Drafters use it to merge their own candidates and the fused drafter to merge theirs; the
    merged node keeps the higher acceptance estimate and the source that gave it.
    """

    def __init__(self, root: int) -> None:
        self.tokens, self.parents = [root], [-1]
        self.sources, self.scores = ["root"], [1.0]
        self._index: dict[tuple[int, int], int] = {}

    def add(self, parent: int, token: int, score: float, source: str) -> int:
        """Add ``token`` under ``parent`` (or merge with the existing child); returns its index."""
        key = (parent, token)
        node = self._index.get(key)
        if node is None:
            node = len(self.tokens)
            self._index[key] = node
            self.tokens.append(token)
            self.parents.append(parent)
            self.sources.append(source)
            self.scores.append(score)
        elif score > self.scores[node]:
            self.scores[node], self.sources[node] = score, source
        return node

    def graft(self, tree: TokenTree) -> None:
        """Merge every drafted node of ``tree`` (whose root must be ours) into this tree."""
        mapped = [0] * len(tree)
        for i in range(1, len(tree)):
            mapped[i] = self.add(mapped[tree.parents[i]], tree.tokens[i], tree.scores[i],
                                 tree.sources[i])

    def build(self) -> TokenTree:
        return TokenTree(self.tokens, self.parents, self.sources, self.scores)
