"""Model drafts: a model with the target's vocabulary drafts a chain, a forward pass a token.

The model is a :class:`DraftSource`: a second engine (:class:`SecondEngine`, usually the
target's own first layers or a lower-bit copy of it that ``edgespec export --with-draft``
writes), or the target itself cut after a layer (:mod:`edgespec.drafting.early_exit`).

Unlike lookup and recycling, every drafted token costs a forward pass, so the drafter prices
it in the target's own currency, the verify cost of one token (``token_seconds``): it goes a
token deeper only while the next token's expected acceptance is worth more than the pass,
and drafts at all only while its first tokens are accepted often enough to pay. Idle, it
still probes a token now and then so the estimate can recover, but a probe must first
feed the draft every token since the last one, which costs as much per token as drafting
does: probes are rationed to :data:`EXPLORE` of the idle steps' time, and there are none
while the price alone says that even a draft that is always right could not pay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from edgespec.drafting.base import AcceptanceStats, ShadowLog, common_prefix
from edgespec.drafting.token_recycling import top_k
from edgespec.tree import TokenTree, TreeBuilder
from edgespec.verify import Sampling, probabilities, race
from runtimes.base import Backend

EXPLORE = 0.05  # the share of idle steps' time that probing may take
_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.97)  # the draft's own probability, bucketed
_RUNNER_UP = 0.8  # below this confidence the draft's second choice is proposed too


class DraftSource(Protocol):
    """Where a model draft's next-token logits come from."""

    def logits_after(self, context: Sequence[int]) -> np.ndarray:
        """The logits after ``context`` (its last token is the pending root)."""

    def extend(self, token: int) -> np.ndarray:
        """The logits after one more drafted token: one forward pass."""

    def close(self) -> None:
        """Release what the source holds."""


class SecondEngine:
    """A separate draft model on its own engine, whose KV cache follows the target's context:
    cut back to the prefix the two share (the drafted tokens the target rejected go), the
    rest fed in one call."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._cached: list[int] = []  # the tokens in the draft's KV cache

    def logits_after(self, context: Sequence[int]) -> np.ndarray:
        keep = min(common_prefix(self._cached, context), len(context) - 1)
        self.backend.truncate(keep)
        del self._cached[keep:]
        return self._feed(context[keep:])

    def extend(self, token: int) -> np.ndarray:
        return self._feed([token])

    def close(self) -> None:
        self.backend.close()

    def _feed(self, tokens: Sequence[int]) -> np.ndarray:
        logits = self.backend.prefill(tokens)
        self._cached.extend(tokens)
        return logits


class ModelDrafter:
    """Chains of a draft model's tokens (and runners-up where it hesitates), each node
    scored by how often tokens of that draft confidence were accepted lately. Greedy, its
    likeliest tokens; sampling, the winners of the races the target runs at those positions
    (:func:`edgespec.verify.race`), which are the target's draws where the two agree."""

    def __init__(self, source: DraftSource, token_seconds: Callable[[], float],
                 name: str = "model") -> None:
        self.source = source
        self.name = name
        self._token_seconds = token_seconds
        self.stats = AcceptanceStats(prior=0.5)
        self._shadow = ShadowLog(self.stats, self.name)
        self.pass_s = 0.0  # seconds of one draft pass of one token (moving average)
        self.first = 0.5  # moving average of the first drafted node's estimate
        self._idle_s = 0.0  # what the target's steps took while the drafter stood idle
        self._probing_s = 0.0  # what probing took meanwhile

    def draft(
        self, context: Sequence[int], budget: int, min_score: float = 0.0,
        entry_score: float = 0.0, sampling: Sampling | None = None,
    ) -> TokenTree:
        token_s = self._token_seconds()
        kind = "" if sampling is None else "s"  # a race's winners are accepted at other rates
        price = self.pass_s / max(token_s, 1e-9)  # one pass, in verified tokens
        if self.first < entry_score + price:
            self._idle_s += token_s
            hopeless = entry_score + price >= 1.0  # not even a draft always right would pay
            if not hopeless and self._probing_s <= EXPLORE * self._idle_s:
                start = time.perf_counter()
                token, q = _top(self.source.logits_after(context), 1, sampling, len(context))[0]
                self._probing_s += time.perf_counter() - start
                key = self._key(q, kind)
                self._shadow.probe(context, token, key)
                self.first += 0.1 * (self.stats.rate(key, q) - self.first)
            return TokenTree.root(context[-1])
        builder = TreeBuilder(context[-1])
        logits, parent, score = self.source.logits_after(context), 0, 1.0
        position = len(context)  # the text position of parent's children
        while len(builder.tokens) < budget:
            (token, q), (other, q2) = _top(logits, 2, sampling, position)
            if q < _RUNNER_UP and q2 > 0.0 and len(builder.tokens) + 1 < budget:
                key = self._key(q2, kind + "r")
                if (alt := score * self.stats.rate(key, q2)) >= min_score:
                    builder.add(parent, other, alt, key)
            key = self._key(q, kind)
            score *= self.stats.rate(key, q)
            if parent == 0:
                self.first += 0.1 * (score - self.first)
            if score < min_score:
                break
            parent = builder.add(parent, token, score, key)
            if score * self.first < min_score + price or len(builder.tokens) >= budget:
                break  # the next pass would cost more than its token is worth
            logits, position = self._pass(token), position + 1
        tree = builder.build()
        self._shadow.propose(context, tree)
        return tree

    def observe(self, tree: TokenTree, logits: np.ndarray, accepted: Sequence[int]) -> None:
        """Nothing to learn here: proposals are judged against the real text (ShadowLog)."""

    def close(self) -> None:
        self.source.close()

    def _key(self, q: float, kind: str) -> str:
        bucket = max(i for i, b in enumerate(_BUCKETS) if q >= b)
        return f"{self.name}/{kind}q{bucket}"

    def _pass(self, token: int) -> np.ndarray:
        """One forward pass of the draft, timed: what the next one will cost."""
        start = time.perf_counter()
        logits = self.source.extend(token)
        seconds = time.perf_counter() - start
        self.pass_s += 0.2 * (seconds - self.pass_s) if self.pass_s else seconds
        return logits


def _top(logits: np.ndarray, k: int, sampling: Sampling | None,
         position: int) -> list[tuple[int, float]]:
    """The ``k`` tokens to propose at ``position``, first choice first, with the draft's
    probability of each: greedy, its likeliest; sampling, the first to arrive in the race the
    target runs there."""
    if sampling is None:
        best = top_k(logits, k)[0]
        shifted = np.exp(logits - logits[best[0]])
        total = float(shifted.sum())
        return [(int(t), float(shifted[t]) / total) for t in best]
    q = probabilities(logits, sampling.params)
    return [(t, float(q[t])) for t in race(q, sampling.draws.at(position), k)]

