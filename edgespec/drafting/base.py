"""The Drafter protocol and the acceptance statistics every drafter keeps.

A drafter proposes a tree of continuations and scores each node with its estimate of
the probability that the target accepts the path down to it. The speculation policy
turns those scores and the device's measured verify cost into a decision of how much of
the tree (if any) to verify; the drafter learns from every verification through
:meth:`Drafter.observe`, so its scores track how well it is really doing on this text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from edgespec.tree import TokenTree
from edgespec.verify import Sampling


@runtime_checkable
class Drafter(Protocol):
    """Proposes continuations of ``context`` (whose last token is the pending root)."""

    name: str

    def draft(
        self, context: Sequence[int], budget: int, min_score: float = 0.0,
        entry_score: float = 0.0, sampling: Sampling | None = None,
    ) -> TokenTree:
        """A tree rooted at ``context[-1]`` with at most ``budget`` nodes, scored.

        Nodes scoring below ``min_score`` cannot pay for their verification on this device;
        a drafter should not spend time proposing them. A tree whose best node would score
        below ``entry_score`` cannot pay at all: the drafter should return the bare root
        (after whatever cheap probe keeps its estimates learning). ``sampling``: how the
        target samples, when it does (None: greedy), for a drafter that can propose the
        target's own draws (a draft model: :func:`edgespec.verify.race`).
        """

    def observe(self, tree: TokenTree, logits: np.ndarray, accepted: Sequence[int]) -> None:
        """Learn from a verification: ``logits[i]`` is the target's output at node ``i``."""

    def close(self) -> None:
        """Release what the drafter holds (a draft model's engine); called once, last."""


class AcceptanceStats:
    """Beta-smoothed, exponentially fading acceptance rate per feature key (``lookup/m3/d2``).

    A node counts as *tried* when its parent was accepted (only then could it be), and as
    a success when it was accepted too. The estimate is conditional on the parent, so a
    path's probability is the product of its nodes' estimates. Old evidence fades
    (``memory`` ≈ how many recent trials count), so estimates follow the current text.
    """

    def __init__(self, prior: float, weight: float = 4.0, memory: float = 32.0) -> None:
        self._prior, self._weight = prior, weight
        self._keep = 1.0 - 1.0 / memory
        self._counts: dict[str, list[float]] = {}

    def rate(self, key: str, prior: float | None = None) -> float:
        hit, tried = self._counts.get(key, (0.0, 0.0))
        p0 = self._prior if prior is None else prior
        return (hit + p0 * self._weight) / (tried + self._weight)

    def record(self, tree: TokenTree, accepted: Sequence[int], prefix: str) -> None:
        """Count the tried nodes of ``tree`` whose source starts with ``prefix``."""
        on_path = set(accepted)
        for i in range(1, len(tree)):
            source = tree.sources[i]
            if tree.parents[i] in on_path and source.startswith(prefix):
                self.count(source, i in on_path)

    def count(self, key: str, accepted: bool) -> None:
        """One trial of ``key``: fade the old evidence, add this one."""
        counts = self._counts.setdefault(key, [0.0, 0.0])
        counts[0] = counts[0] * self._keep + accepted
        counts[1] = counts[1] * self._keep + 1.0


class ShadowLog:
    """Judges every proposed tree against the text that really followed, verified or not.

    The policy verifies only the nodes it expects to pay, so learning from verified nodes
    alone would never revise a pessimistic estimate. But once the target has produced the
    tokens after a proposal, the drafter can see (in its next ``context``) exactly which
    proposed nodes the target would have accepted — for greedy decoding this *is* the
    verification result, for sampling an unbiased draw of it — and learn from all of them.
    """

    def __init__(self, stats: AcceptanceStats, prefix: str) -> None:
        self.stats, self.prefix = stats, prefix
        self._pending: list[tuple[int, int, TokenTree]] = []  # (position, root token, tree)
        self._probe: tuple[int, int, int, str] | None = None  # (position, root, token, key)

    def propose(self, context: Sequence[int], tree: TokenTree) -> None:
        """Remember ``tree``, drafted after ``context``; judge older proposals now decidable."""
        self._resolve(context)
        if len(tree) > 1:
            self._pending.append((len(context), context[-1], tree))

    def probe(self, context: Sequence[int], token: int, source: str) -> None:
        """Propose the single node ``token`` (feature ``source``) after ``context``.

        This is how a gated drafter keeps learning about the draft it did not make, on
        most steps; it is judged by the next call without building a tree, which matters
        because every step's Python runs cache-cold after the engine's decode.
        """
        self._resolve(context)
        self._probe = (len(context), context[-1], token, source)

    def _resolve(self, context: Sequence[int]) -> None:
        if self._probe is not None:
            pos, root, token, source = self._probe
            if len(context) < pos or context[pos - 1] != root:
                self._probe = None  # the context was rewound or replaced: moot
            elif len(context) > pos:
                self.stats.count(source, context[pos] == token)
                self._probe = None
        still = []
        for pos, root, tree in self._pending:
            if pos > len(context) or context[pos - 1] != root:
                continue  # the context was rewound or replaced: the proposal is moot
            if len(context) - pos < tree.max_depth:
                still.append((pos, root, tree))
                continue
            self.stats.record(tree, _followed(tree, context[pos:]), self.prefix)
        self._pending = still


def _followed(tree: TokenTree, continuation: Sequence[int]) -> list[int]:
    """The root path of ``tree`` that spells out ``continuation``."""
    path = [0]
    for token in continuation:
        child = tree.child_with_token(path[-1], token)
        if child is None:
            break
        path.append(child)
    return path


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
