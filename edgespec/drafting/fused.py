"""Tree fusion (as in RASD): one tree holding both the lookup copy and the recycled guesses.

Where both drafters propose the same continuation the branches merge, so the fused tree
costs no more to verify than the larger of the two and accepts whichever is right.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgespec.drafting.base import Drafter
from edgespec.tree import TokenTree, TreeBuilder
from edgespec.verify import Sampling


class FusedDrafter:
    """Merges the trees of several drafters; each keeps learning from its own nodes."""

    name = "fused"

    def __init__(self, drafters: Sequence[Drafter]) -> None:
        self.drafters = list(drafters)

    def draft(
        self, context: Sequence[int], budget: int, min_score: float = 0.0,
        entry_score: float = 0.0, sampling: Sampling | None = None,
    ) -> TokenTree:
        trees = [tree for drafter in self.drafters
                 if len(tree := drafter.draft(context, budget, min_score, entry_score,
                                              sampling)) > 1]
        if len(trees) < 2:  # most steps: nothing, or one drafter's tree, to merge
            return trees[0] if trees else TokenTree.root(context[-1])
        builder = TreeBuilder(context[-1])
        for tree in trees:
            builder.graft(tree)
        return builder.build()

    def observe(self, tree: TokenTree, logits: np.ndarray, accepted: Sequence[int]) -> None:
        for drafter in self.drafters:
            drafter.observe(tree, logits, accepted)

    def close(self) -> None:
        for drafter in self.drafters:
            drafter.close()
