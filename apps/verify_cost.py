"""Compare what verifying n tokens costs on several engines, measured interleaved.

Run: ``nice -n 19 .venv/bin/python apps/verify_cost.py llamacpp:model.gguf
openvino:out/ov-int8 onnx:out/onnx-int4 --threads 2 1``

On a shared machine absolute times drift with the load, so every engine is probed in
turn within each round (:func:`edgespec.profiler.probe_verify_cost`) and the table
reports medians over rounds, c(n)/c(1) per engine and each engine's c(1) relative to the
first one's (the speed of plain decoding, whose steps are one-token verifies).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from edgespec.models import open_backend
from edgespec.profiler import probe_verify_cost
from runtimes import Backend


def _open(spec: str, threads: int, n_ctx: int) -> tuple[Backend, float]:
    """``backend:path`` opened with ``threads``; the seconds it took."""
    name, _, path = spec.partition(":")
    start = time.perf_counter()
    backend = open_backend(Path(path), name, n_ctx=n_ctx, threads=threads)
    return backend, time.perf_counter() - start


def measure(specs: list[str], threads: int, sizes: tuple[int, ...], context: int,
            rounds: int) -> dict[str, dict[int, float]]:
    """Median seconds per verify size for each engine, probed round-robin."""
    opened = {spec: _open(spec, threads, context + 2 * max(sizes)) for spec in specs}
    for spec, (_, seconds) in opened.items():
        print(f"  loaded {spec} in {seconds:.1f} s")
    samples: dict[str, dict[int, list[float]]] = {s: {n: [] for n in sizes} for s in specs}
    try:
        for _ in range(rounds):
            for spec, (backend, _) in opened.items():
                cost = probe_verify_cost(backend, sizes=sizes, context=context, repeats=3)
                for n, seconds in cost.items():
                    samples[spec][n].append(seconds)
    finally:
        for backend, _ in opened.values():
            backend.close()
    return {s: {n: statistics.median(v) for n, v in by_n.items() if v}
            for s, by_n in samples.items()}


def report(costs: dict[str, dict[int, float]]) -> str:
    """A markdown table: c(1), c(n)/c(1), and c(1) relative to the first engine."""
    sizes = sorted({n for cost in costs.values() for n in cost})
    base = next(iter(costs.values()))[1]
    lines = ["| engine | c(1) ms | vs first | " + " | ".join(f"{n}" for n in sizes[1:]) + " |",
             "|---" * (len(sizes) + 2) + "|"]
    for spec, cost in costs.items():
        ratios = " | ".join(f"{cost[n] / cost[1]:.2f}" if n in cost else "-" for n in sizes[1:])
        lines.append(f"| {spec} | {cost[1] * 1e3:.1f} | {cost[1] / base:.2f} | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", nargs="+", help="backend:path, e.g. openvino:out/ov-int8")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--context", type=int, default=300, help="cached tokens before verify")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for threads in args.threads:
        print(f"threads={threads}, context={args.context}, medians of {args.rounds} rounds:")
        costs = measure(args.engines, threads, tuple(args.sizes), args.context, args.rounds)
        print(report(costs) + "\n")


if __name__ == "__main__":
    main()
