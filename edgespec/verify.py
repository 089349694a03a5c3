"""Which drafted path the target accepts, without changing what the target would say.

Greedy: follow the tree from the root while a child carries the target's argmax.
Sampling: draw the target's token at each node; if a drafted child carries it, descend.
For a deterministic drafter (its proposal is one-hot, q(x) = 1) this *is* the
multi-candidate rejection rule of SpecInfer, so every emitted token is an exact draw
from the target's (temperature / top-k / top-p processed) distribution. A draft model
proposes the winner of the same race the target runs at that position (:func:`race`), so
it is right whenever its distribution is close enough, while each emitted token stays the
target's own draw: a seed gives the same text with or without speculation. For a drafter
that samples children from a distribution q, :func:`multi_candidate` applies the general
rule (recursive rejection sampling without replacement), which is exact too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgespec.tree import TokenTree

Draws = Callable[[int], np.random.Generator]
"""The randomness for choosing the child of a node at depth ``d`` (the token at d + 1)."""


class PositionDraws:
    """Randomness keyed by a token's position in the text.

    The token at position i is drawn with the generator of (seed, i), whatever was drafted
    before it and however many draws a rejected tree used: a seed gives the same text with
    or without speculation, and whatever the drafters learnt from earlier requests. With a
    deterministic drafter the accepted token *is* the target's own draw, so sampled
    speculative output is token for token the plain sampled output.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = np.random.SeedSequence().entropy if seed is None else seed

    def at(self, position: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, position))


@dataclass(frozen=True)
class SamplingParams:
    """How the target's logits become a distribution; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Acceptance:
    """The accepted root path (node indices) and the target's token after it."""

    path: list[int]
    next_token: int

    @property
    def n_accepted_drafts(self) -> int:
        return len(self.path) - 1


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The processed next-token distribution: temperature, then top-k, then top-p."""
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # max first: a tiny temperature gives -inf, not nan
        z = (z - z.max()) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return p


@dataclass(frozen=True)
class Sampling:
    """What a drafter needs to propose the target's own draws when sampling."""

    params: SamplingParams
    draws: PositionDraws


def pick(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from one row of logits: argmax when greedy, else a draw (:func:`race`)."""
    if params.greedy:
        return int(np.argmax(logits))
    return race(probabilities(logits, params), rng)[0]


def race(p: np.ndarray, rng: np.random.Generator, k: int = 1) -> list[int]:
    """The first ``k`` tokens to arrive when token i arrives after an Exp(1) wait over p(i).

    The first is a draw from ``p`` (the exponential race, i.e. the Gumbel-max trick). A
    draft model that races its own q with the same waits (``rng``: the same position's
    generator) arrives first with the same token with probability at least
    (1 − TV(p, q)) / (1 + TV(p, q)), whatever the vocabulary's order: it proposes the
    target's draw without seeing p.
    """
    # float32 from the generator's raw bits, in place, as llama.cpp samples in float32:
    # numpy's own exponentials and temporaries cost more than rng.choice over 49k tokens
    bits = rng.bit_generator.random_raw((p.size + 1) // 2).view(np.uint32)[: p.size]
    bits >>= 9  # 23 bits: a float32 uniform exactly
    log_u = bits.astype(np.float32)
    log_u += np.float32(0.5)
    log_u *= np.float32(2.0**-23)  # in (0, 1), never 0 or 1
    np.log(log_u, out=log_u)
    arrival = p.astype(np.float32)
    arrival /= log_u  # −p/wait, with wait = −log u ~ Exp(1): the first to arrive is the least
    if k == 1:
        return [int(np.argmin(arrival))]
    first = np.argpartition(arrival, k - 1)[:k]
    return [int(t) for t in first[np.argsort(arrival[first], kind="stable")]]


def accept(tree: TokenTree, logits: np.ndarray, params: SamplingParams, draws: Draws
           ) -> Acceptance:
    """Walk down ``tree`` while the target's own choice at a node was drafted as a child.

    At a node whose children came from a drafter's distribution (``tree.draft_probs``),
    sampling uses :func:`multi_candidate` instead of a plain draw; greedy ignores q.
    ``draws(depth)`` is the randomness for a node at that depth (:class:`PositionDraws`).
    """
    node, path = 0, [0]
    while True:
        q = tree.draft_probs.get(node)
        if params.greedy:
            token = int(np.argmax(logits[node]))
        elif q is None:
            token = pick(logits[node], params, draws(tree.depth[node]))
        else:
            children = [tree.tokens[c] for c in tree.children[node]]
            token = multi_candidate(probabilities(logits[node], params), q, children,
                                    draws(tree.depth[node]))
        child = tree.child_with_token(node, token)
        if child is None:
            return Acceptance(path, token)
        node = child
        path.append(child)


def multi_candidate(
    p: np.ndarray, q: np.ndarray, candidates: list[int], rng: np.random.Generator
) -> int:
    """One exact draw from ``p`` that lands on a drafted candidate as often as possible.

    ``candidates`` must have been drawn from ``q`` one after another *without replacement*
    (each from q with the earlier ones removed). Candidate x is accepted with probability
    min(1, p(x)/q(x)); on rejection the target becomes norm(max(0, p − q)) — the mass q
    over-proposed is taken out — and q loses x. If every candidate is rejected, the draw
    comes from what is left of p, which gives rejected candidates zero mass. Each step is
    the two-token speculative sampling identity, so the returned token is distributed
    exactly as ``p`` (SpecInfer; Jeon et al., recursive speculative decoding).
    """
    p, q = p.astype(np.float64), q.astype(np.float64)
    for x in candidates:
        if q[x] <= 0.0:
            raise ValueError(f"candidate {x} has draft probability 0; it cannot have been drawn")
        if rng.random() * q[x] < p[x]:
            return x
        residual = np.maximum(p - q, 0.0)
        if residual.sum() <= 0.0:  # p == q up to rounding: a rejection had probability 0
            return x
        p = residual / residual.sum()
        q[x] = 0.0
        if q.sum() > 0.0:
            q /= q.sum()
    return int(rng.choice(p.size, p=p))
