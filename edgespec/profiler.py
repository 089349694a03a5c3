"""Measure what verifying n tokens costs on this device, with this backend and thread count,
and up to which n it is exact; ``measure`` makes the record ``edgespec profile`` saves.

The speculation policy needs c(n), not a guess: on a 2-core CPU running llama.cpp, eight
tokens cost 3–4× one, while a stateful OpenVINO model verifies eight for 1.6× one. The
probe runs real verify calls on a short synthetic context and leaves the cache empty.

Lossless speculation also needs a batch of n tokens to give the same logits as n single
steps. Engines switch kernels at model- and CPU-specific batch sizes (unpatched llama.cpp:
K-quants from 8 tokens on, int8 matmul on Arm i8mm from 2), so that is measured too.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from edgespec.tree import TokenTree
from runtimes.base import Backend

PROBE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
PROFILE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PROFILE_CONTEXTS = (300, 2000)


@dataclass
class BackendProfile:
    """One backend's measured verify costs on this device, at one thread count."""

    backend: str
    build: str
    threads: int | None
    exact: int  # the largest tree size verified bit-exactly
    cost: dict[int, dict[int, float]]  # cached tokens -> tree size -> seconds per call

    def curve(self, context: int = PROFILE_CONTEXTS[0]) -> dict[int, float]:
        """The cost curve measured nearest ``context`` cached tokens."""
        return self.cost[min(self.cost, key=lambda c: abs(c - context))]

    def as_dict(self) -> dict:
        return {"backend": self.backend, "build": self.build, "threads": self.threads,
                "exact": self.exact,
                "cost": {str(c): {str(n): s for n, s in curve.items()}
                         for c, curve in self.cost.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> BackendProfile:
        """The inverse of :meth:`as_dict`; KeyError/TypeError/ValueError on a bad record."""
        cost = {int(c): {int(n): float(s) for n, s in curve.items()}
                for c, curve in d["cost"].items()}
        if not cost or any(1 not in curve for curve in cost.values()):
            raise ValueError("a cost curve without the cost of one token")
        threads = d["threads"]
        return cls(str(d["backend"]), str(d["build"]), None if threads is None else int(threads),
                   int(d["exact"]), cost)


def measure(backend: Backend, *, sizes: tuple[int, ...] = PROFILE_SIZES,
            contexts: tuple[int, ...] = PROFILE_CONTEXTS, repeats: int = 3) -> BackendProfile:
    """The exact tree size and c(n) at each context that fits this backend's cache."""
    sizes = _fitting(backend, sizes)
    exact, first = profile(backend, sizes=sizes, context=contexts[0], repeats=repeats)
    cost = {contexts[0]: first}
    for context in contexts[1:]:
        if context + max(sizes) <= backend.n_ctx:
            cost[context] = probe_verify_cost(backend, sizes=sizes, context=context,
                                              repeats=repeats)
    return BackendProfile(backend.name, backend.build, backend.threads, exact, cost)


def probe_verify_cost(
    backend: Backend,
    *,
    sizes: tuple[int, ...] = PROBE_SIZES,
    context: int = 128,
    repeats: int = 5,
    warm: bool = False,
) -> dict[int, float]:
    """Median seconds of one verify call per tree size, after ``context`` cached tokens;
    ``warm``: each timed call follows an untimed one of the same size, which leaves out
    what an engine pays when a call's shape changes (~5 ms on OpenVINO's CPU plugin)."""
    ids = _probe_ids(backend, context)
    try:
        return _costs(backend, ids, _reset(backend, ids), _fitting(backend, sizes), repeats,
                      warm)
    finally:
        backend.truncate(0)


def profile(backend: Backend, *, sizes: tuple[int, ...] = PROBE_SIZES, context: int = 128,
            repeats: int = 5) -> tuple[int, dict[int, float]]:
    """Both probes on one prefilled context (a prefill saved at start-up): the largest
    exact tree size, and the cost of verifying each probed size."""
    sizes = _fitting(backend, sizes)
    ids = _probe_ids(backend, context + max(sizes))
    try:
        base = _reset(backend, ids[:context])
        exact = _exact_size(backend, ids[context:], base, sizes)
        return exact, _costs(backend, ids, base, sizes, repeats)
    finally:
        backend.truncate(0)


def _fitting(backend: Backend, sizes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for n in sizes if n <= backend.max_tree_nodes)


def _costs(backend: Backend, ids: list[int], base: int, sizes: tuple[int, ...],
           repeats: int, warm: bool = False) -> dict[int, float]:
    """Median seconds of verifying a chain of each size at cached length ``base``."""
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            tree = TokenTree.chain(ids[0], ids[1:n])
            if warm:
                _verify_seconds(backend, tree, base)
            times[n].append(_verify_seconds(backend, tree, base))
    return {n: statistics.median(t) for n, t in times.items()}


def _verify_seconds(backend: Backend, tree: TokenTree, base: int) -> float:
    """One verify call's wall time; the cache is back at ``base`` after it."""
    start = time.perf_counter()
    backend.verify(tree)
    seconds = time.perf_counter() - start
    backend.commit([0])
    backend.truncate(base)
    return seconds


def _exact_size(backend: Backend, tail: list[int], base: int, sizes: tuple[int, ...]) -> int:
    """The largest n whose chain over ``tail`` matches ``tail`` evaluated token by token."""
    singles = []
    for token in tail:
        singles.append(backend.verify(TokenTree.root(token))[0].copy())
        backend.commit([0])
    exact = 1
    for n in sizes:
        backend.truncate(base)
        batch = backend.verify(TokenTree.chain(tail[0], tail[1:n]))
        backend.commit([0])
        if not np.array_equal(batch, np.asarray(singles[:n])):
            break
        exact = n
    backend.truncate(base)
    return exact


def _probe_ids(backend: Backend, n: int) -> list[int]:
    ids = backend.tokenize("The quick brown fox jumps over the lazy dog. " * 64, special=False)
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def _reset(backend: Backend, ids: list[int]) -> int:
    """An empty cache, then ``ids`` prefilled; returns the cached length."""
    backend.truncate(0)
    backend.prefill(ids)
    return backend.n_past
