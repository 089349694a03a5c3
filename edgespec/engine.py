"""The decode loop: prefill, then draft → select → verify → accept → commit → observe.

Nothing here knows which engine or which drafter is in use. One loop step costs one
backend call, emits every accepted token plus the target's own next token, and teaches
the drafter and the cost model what happened.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from edgespec.autotune import SpeculationPolicy
from edgespec.drafting import Drafter
from edgespec.drafting.base import common_prefix
from edgespec.errors import Cancelled, UserError
from edgespec.threads import ThreadGovernor
from edgespec.tree import TokenTree
from edgespec.verify import Acceptance, PositionDraws, Sampling, SamplingParams, accept, pick
from runtimes.base import Backend, peak_rss_bytes


@dataclass
class GenerationStats:
    """What one generation did and cost; the CLI's ``--json`` ``stats`` object."""

    backend: str
    draft: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    accepted_drafts: int = 0
    draft_nodes: int = 0
    speculative_steps: int = 0
    finish_reason: str = "length"

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time spent producing them."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def accepted_per_step(self) -> float:
        """Tokens emitted per verify call (1.0 for plain decoding)."""
        return (self.steps + self.accepted_drafts) / self.steps if self.steps else 0.0

    @property
    def draft_nodes_per_step(self) -> float:
        return self.draft_nodes / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            tokens_per_s=self.tokens_per_s,
            accepted_per_step=self.accepted_per_step,
            draft_nodes_per_step=self.draft_nodes_per_step,
            peak_rss_bytes=peak_rss_bytes(),
        )
        return d


class DecodeLoop:
    """Runs generations on one backend; remembers which tokens its KV cache holds.

    ``prefilled`` counts the cached rows a prompt prefill computed. Only those are ever
    reused, and only in whole :attr:`Backend.prefill_chunk`-aligned chunks: a reused row was
    then evaluated in the very batch a fresh engine evaluates it in, so a prompt gives the
    same logits however the cache was reached (K-quant kernels sum a long batch and one token
    in different orders, and a near-tie flips on that).
    """

    def __init__(self, backend: Backend, policy: SpeculationPolicy, *,
                 govern_threads: bool = False) -> None:
        """``govern_threads``: let a :class:`ThreadGovernor` lower the thread count while
        another process holds a core (not when the user chose the count)."""
        self.backend = backend
        self.policy = policy
        self.cached: list[int] = []
        self.prefilled = 0
        self.threads = ThreadGovernor(
            backend.threads, lambda n: self.policy.cost(n) / self.policy.cost(1)
        ) if govern_threads and backend.threads is not None else None

    def forget(self) -> None:
        """The backend's cache was used for something else: reuse nothing from it."""
        self.cached.clear()
        self.prefilled = 0

    def generate(
        self,
        prompt: Sequence[int],
        *,
        drafter: Drafter | None,
        params: SamplingParams,
        max_tokens: int,
        draws: PositionDraws,
        stats: GenerationStats,
        cancel: threading.Event | None = None,
    ) -> Iterator[int]:
        """Yield new tokens as accepted; stop at EOS, ``max_tokens`` or a full context."""
        if max_tokens <= 0:
            stats.finish_reason = "length"
            return
        start = time.perf_counter()
        token = pick(self._prefill(prompt), params, draws.at(len(prompt)))
        stats.prompt_tokens = len(prompt)
        stats.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        context = [*prompt, token]
        try:
            for token in self._tokens(context, drafter, params, draws, stats, cancel):
                stats.new_tokens += 1
                stats.decode_s = time.perf_counter() - start
                yield token
                if token in self.backend.tokenizer.eos_ids:
                    stats.finish_reason = "stop"
                    return
                if stats.new_tokens >= max_tokens:
                    stats.finish_reason = "length"
                    return
        finally:
            stats.decode_s = time.perf_counter() - start

    def _prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Reuse the cached prefix of ``prompt`` (multi-turn) and evaluate the rest, in the
        chunks a fresh prefill evaluates: starts at multiples of ``prefill_chunk``."""
        if len(prompt) >= self.backend.n_ctx:
            raise UserError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.backend.n_ctx}; "
                "shorten the prompt or raise -c/--ctx-size"
            )
        chunk = self.backend.prefill_chunk
        # the last prompt token must be evaluated for logits, in its own chunk's batch
        keep = min(common_prefix(self.cached, prompt), self.prefilled, len(prompt) - 1)
        keep -= keep % chunk
        self.backend.truncate(keep)
        del self.cached[keep:]
        self.prefilled = keep
        for start in range(keep, len(prompt), chunk):  # cached grows chunk by chunk: a Ctrl-C
            piece = prompt[start:start + chunk]  # between two leaves it true
            logits = self.backend.prefill(piece)
            self.cached.extend(piece)
            self.prefilled = len(self.cached)
        return logits

    def _tokens(
        self,
        context: list[int],
        drafter: Drafter | None,
        params: SamplingParams,
        draws: PositionDraws,
        stats: GenerationStats,
        cancel: threading.Event | None,
    ) -> Iterator[int]:
        """The emitted tokens: the pending root first, then whatever each step accepts."""
        yield context[-1]
        sampling = None if params.greedy else Sampling(params, draws)  # what a drafter may use
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            room = self.backend.n_ctx - self.backend.n_past
            if room < 1:
                stats.finish_reason = "context"
                return
            step_start = time.perf_counter()
            tree = self._draft(context, drafter, room, sampling)
            verify_start = time.perf_counter()
            logits = self.backend.verify(tree)
            verify_s = time.perf_counter() - verify_start
            accepted = accept(tree, logits, params, lambda d: draws.at(len(context) + d))
            path, next_token = _exact_part(tree, accepted)
            self.backend.commit(path)
            if drafter is not None:
                drafter.observe(tree, logits, accepted.path)
            self.policy.observe(len(tree), verify_s, time.perf_counter() - step_start,
                                len(path) - 1)
            self._govern_threads(len(tree), verify_s)
            new = [tree.tokens[i] for i in path[1:]]
            self.cached.extend([context[-1], *new])
            new.append(next_token)
            context.extend(new)
            stats.steps += 1
            stats.draft_nodes += len(tree) - 1
            stats.speculative_steps += len(tree) > 1
            stats.accepted_drafts += len(path) - 1
            yield from new

    def _govern_threads(self, n: int, verify_s: float) -> None:
        """Fewer threads while another process holds a core (:mod:`edgespec.threads`)."""
        if self.threads is None:
            return
        threads = self.threads.observe(n, verify_s)
        if threads != self.backend.threads and not self.backend.set_threads(threads):
            self.threads = None  # this engine keeps the count it loaded with

    def _draft(self, context: list[int], drafter: Drafter | None, room: int,
               sampling: Sampling | None) -> TokenTree:
        budget = min(self.policy.draft_budget(), room)
        if drafter is None or budget < 2:
            return TokenTree.root(context[-1])
        policy = self.policy
        return policy.select(
            drafter.draft(context, budget, policy.min_score(), policy.entry_score(), sampling))


def _exact_part(tree: TokenTree, accepted: Acceptance) -> tuple[list[int], int]:
    """The root path to commit and the token after it, both from bit-exact logits only.

    Backends lay a tree out best-first (:meth:`TokenTree.best_first`): only nodes on that
    order's prefix sit where plain decoding would have put them, so only their logits are
    bit-exact. A node off it was accepted from its parent's exact logits, but its own row
    was summed with a gap before it. So an accepted path that leaves the prefix ends at
    that node, which is emitted uncommitted as the next step's root (its logits computed
    there, in place) instead of taking a bonus token from its inexact row.
    """
    if len(accepted.path) == 1:
        return accepted.path, accepted.next_token
    order = tree.best_first()
    for i, node in enumerate(accepted.path):
        if node != order[i]:
            return accepted.path[:i], tree.tokens[node]
    return accepted.path, accepted.next_token

