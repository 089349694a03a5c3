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


@runtime_checkable
class Drafter(Protocol):
    """Proposes continuations of ``context`` (whose last token is the pending root)."""

    name: str

    def draft(self, context: Sequence[int], budget: int) -> TokenTree:
        """A tree rooted at ``context[-1]`` with at most ``budget`` nodes, scored."""

    def observe(self, tree: TokenTree, logits: np.ndarray, accepted: Sequence[int]) -> None:
        """Learn from a verification: ``logits[i]`` is the target's output at node ``i``."""


class AcceptanceStats:
    """Beta-smoothed acceptance rate per feature key (e.g. ``lookup/m3/d2``).

    A node counts as *tried* when its parent was accepted (only then could it be), and as
    a success when it was accepted too. The estimate is conditional on the parent, so a
    path's probability is the product of its nodes' estimates.
    """

    def __init__(self, prior: float, weight: float = 4.0) -> None:
        self._prior, self._weight = prior, weight
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
                counts = self._counts.setdefault(source, [0.0, 0.0])
                counts[0] += i in on_path
                counts[1] += 1.0

    def decay(self, factor: float) -> None:
        """Fade old evidence so estimates follow the text being generated now."""
        for counts in self._counts.values():
            counts[0] *= factor
            counts[1] *= factor
