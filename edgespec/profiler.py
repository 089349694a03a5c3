"""Measure what verifying n tokens costs on this device, with this backend and thread count.

The speculation policy needs c(n), not a guess: on a 2-core CPU running llama.cpp, eight
tokens cost 3–4× one, while a stateful OpenVINO model verifies eight for 1.6× one. The
probe runs real verify calls on a short synthetic context and leaves the cache empty.
"""

from __future__ import annotations

import statistics
import time

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
    ids = backend.tokenize("The quick brown fox jumps over the lazy dog. " * 64, special=False)
    ids = (ids * (context // max(len(ids), 1) + 1))[:context]
    sizes = tuple(n for n in sizes if n <= getattr(backend, "max_tree_nodes", n))
    backend.truncate(0)
    backend.prefill(ids)
    base = backend.n_past
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
