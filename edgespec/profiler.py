"""Measure what verifying n tokens costs on this device, with this backend and thread count,
and up to which n it is exact.

The speculation policy needs c(n), not a guess: on a 2-core CPU running llama.cpp, eight
tokens cost 3–4× one, while a stateful OpenVINO model verifies eight for 1.6× one. The
probe runs real verify calls on a short synthetic context and leaves the cache empty.

Lossless speculation also needs a batch of n tokens to give the same logits as n single
steps. Engines switch kernels at model- and CPU-specific batch sizes (llama.cpp with
Gemma-3's Q4_K_M: exact up to 7 tokens, not at 8), so that is measured too.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from edgespec.tree import TokenTree
from runtimes.base import Backend

PROBE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)


def probe_verify_cost(
    backend: Backend,
    *,
    sizes: tuple[int, ...] = PROBE_SIZES,
    context: int = 128,
    repeats: int = 5,
) -> dict[int, float]:
    """Median seconds of one verify call per tree size, after ``context`` cached tokens."""
    ids = _probe_ids(backend, context)
    sizes = tuple(n for n in sizes if n <= getattr(backend, "max_tree_nodes", n))
    base = _reset(backend, ids)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    try:
        for _ in range(repeats):
            for n in sizes:
                tree = TokenTree.chain(ids[0], ids[1:n])
                start = time.perf_counter()
                backend.verify(tree)
                times[n].append(time.perf_counter() - start)
                backend.commit([0])
                backend.truncate(base)
    finally:
        backend.truncate(0)
    return {n: statistics.median(t) for n, t in times.items()}


def largest_exact_size(
    backend: Backend, *, sizes: tuple[int, ...] = PROBE_SIZES, context: int = 64
) -> int:
    """The largest probed n up to which a chain of n tokens verified in one call gives
    bit-identical logits to the same tokens evaluated one at a time (1 if none does)."""
    sizes = tuple(n for n in sizes if n <= getattr(backend, "max_tree_nodes", n))
    ids = _probe_ids(backend, context + max(sizes))
    prefix, tail = ids[:context], ids[context:]
    base = _reset(backend, prefix)
    try:
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
        return exact
    finally:
        backend.truncate(0)


def _probe_ids(backend: Backend, n: int) -> list[int]:
    ids = backend.tokenize("The quick brown fox jumps over the lazy dog. " * 64, special=False)
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def _reset(backend: Backend, ids: list[int]) -> int:
    """An empty cache, then ``ids`` prefilled; returns the cached length."""
    backend.truncate(0)
    backend.prefill(ids)
    return backend.n_past
