"""Measured footprints: what an engine without a dry run holds at a sizing, found by running it.

ONNX Runtime and OpenVINO size their arenas, repacked weights and compiled copies inside
the runtime, where nothing can be asked before a session exists, so their estimate is a
measurement. A child process opens the export and walks the context to its end as
generations do (every KV row written, every call shape made: OpenVINO's CPU plugin keeps
buffers per shape), reading its peak RSS on the way; one walks with plain steps, another
with trees. The engine runs on a lean heap (:func:`runtimes.base.lean_heap`), as it will
under the budget: on glibc's default one its RSS also depends on how the calls came. A
child, because the planning process must not hold what it measures; it stops once it
holds more than the budget allows (the rest is over it anyway). A walk's prefill
chunk and trees are the largest of the sizings it reads, so a reading bounds each of them
from above.

Readings are kept per device, engine build and export (``~/.cache/edgespec/footprints``),
so an export is measured once: ~100 s for SmolLM2 at 4,096 tokens on OpenVINO, ~40 s on
ONNX Runtime (2 cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from edgespec.errors import UserError
from runtimes.base import (
    Backend,
    MemoryReport,
    Sizing,
    default_threads,
    peak_rss_bytes,
    rss,
    write_json,
)

VERSION = 7  # bump when what a reading covers changes: older readings are measured again
BLOCK = 16  # a generation's window grows a token at a time; the walk calls at every 16th
TREE_STEP = 8  # the walk's trees: one of 8 nodes (OpenVINO's smallest bucket) and the largest
RECORD = 256  # contexts read on the way (the planner's steps)


Readings = dict[Sizing, MemoryReport]


def measure(backend: str, build: str, path: Path, sizings: Sequence[Sizing],
            limit: int | None = None) -> list[MemoryReport]:
    """What opening ``path`` on ``backend`` with each sizing holds at its peak: read from the
    cache, the rest measured in a child process for plain decoding and one for trees (in
    one, the trees' readings at a short context would carry the plain walk's longest). A
    child stops where it grows beyond ``limit`` bytes: what it would need beyond is
    reported ``at_least`` what it had reached."""
    cache = _cache_file(backend, build, path)
    known = _read(cache)
    missing = [s for s in sizings if _bound(known, s, limit) is None]
    if missing:
        print(f"edgespec: measuring what {path.name} needs on {backend}, once for this device "
              "(a minute or two)", file=sys.stderr)
    for kv_type in sorted({s.kv_type for s in missing}):
        for trees in (False, True):
            group = [s for s in missing if (s.max_tree_nodes > 1) == trees and s.kv_type == kv_type]
            if group:
                known |= _run_child(backend, path, group, limit)
                _write(cache, known)
    return [_bound(known, s, limit) for s in sizings]


def _bound(known: Readings, s: Sizing, limit: int | None) -> MemoryReport | None:
    """The leanest reading at ``s``'s context whose tree and prefill chunk are at least as
    large (both with trees or both without, the same KV precision): it bounds ``s`` from
    above. Failing that, a walk that went over ``limit`` at a context and with calls no
    larger than ``s``'s: then ``s`` is over it too."""
    same = [(k, r) for k, r in known.items() if k.kv_type == s.kv_type
            and (k.max_tree_nodes > 1) == (s.max_tree_nodes > 1)]
    exact = [r for k, r in same if not r.at_least and k.n_ctx == s.n_ctx
             and k.prefill_chunk >= s.prefill_chunk and k.max_tree_nodes >= s.max_tree_nodes]
    over = [r for k, r in same if r.at_least and limit is not None and r.total > limit
            and k.n_ctx <= s.n_ctx and k.prefill_chunk <= s.prefill_chunk
            and k.max_tree_nodes <= s.max_tree_nodes]
    return min(exact or over, key=lambda r: r.total, default=None)


def _run_child(backend: str, path: Path, sizings: list[Sizing], limit: int | None) -> Readings:
    request = {"backend": backend, "path": str(path), "limit": limit,
               "sizings": [_row(s) for s in sizings]}
    done = subprocess.run([sys.executable, "-m", "runtimes.footprint"], input=json.dumps(request),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"measuring what {path.name} needs on {backend} failed ({last}); "
                        "plan without --memory-budget or use --backend llamacpp")
    return _readings(json.loads(done.stdout))


def _row(s: Sizing, r: MemoryReport | None = None) -> list:
    """A sizing (and its reading) as a JSON row."""
    return [s.n_ctx, s.max_tree_nodes, s.prefill_chunk, s.kv_type] + (
        [] if r is None else [r.weights, r.kv_cache, r.scratch, int(r.at_least)])


def _readings(rows: list) -> Readings:
    return {Sizing(*row[:4]): MemoryReport(*row[4:7], at_least=bool(row[7])) for row in rows}


def _cache_file(backend: str, build: str, path: Path) -> Path:
    """One file per device, engine build and export: the export by its files' names, sizes
    and modification times."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    cpu = next((line for line in _cpuinfo() if line.startswith("model name")), "")
    identity = [str(VERSION), backend, build, platform.machine(), cpu, str(default_threads()),
                str(path.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                        for f in files if f.is_file()]
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:20]
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgespec" / "footprints" / f"{backend}-{digest}.json"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _read(cache: Path) -> Readings:
    try:
        return _readings(json.loads(cache.read_text()))
    except (OSError, ValueError, TypeError):
        return {}  # none yet, or unreadable: measured again


def _write(cache: Path, readings: Readings) -> None:
    with contextlib.suppress(OSError):  # a read-only cache costs a measurement next time
        write_json(cache, [_row(s, r) for s, r in readings.items()])


# -- the child -------------------------------------------------------------------------------


def _filler(n: int, vocab: int) -> list[int]:
    """``n`` ordinary token ids: what they say does not change what the engine allocates."""
    return [100 + (i * 7919) % (vocab - 100) for i in range(n)]


def _child(backend: str, path: Path, sizings: list[Sizing], limit: int | None) -> Readings:
    """Readings for ``sizings`` (all plain, or all with trees; one KV precision) from one
    walk to the longest context, with the largest prefill chunk and tree among them. On the
    way, every :data:`RECORD` tokens, it reads them for that context too: a walk to n
    tokens is the first n tokens of a longer one, so later plans at other contexts are
    read, not run.
    Past ``limit`` bytes it stops, with an ``at_least`` reading where it stopped."""
    from runtimes import backend_class
    from runtimes.slots import SlotBackend

    cls = backend_class(backend)  # the engine's libraries are in the planner's process too
    before = rss()
    end = max(s.n_ctx for s in sizings)
    nodes, chunk = max(s.max_tree_nodes for s in sizings), max(s.prefill_chunk for s in sizings)
    kv_type = sizings[0].kv_type
    engine = cls(path, n_ctx=end, max_tree_nodes=nodes, prefill_chunk=chunk, kv_type=kv_type,
                 **cls.budget_options)
    assert isinstance(engine, SlotBackend)
    opened = rss()
    shapes = {(s.max_tree_nodes, s.prefill_chunk) for s in sizings}
    wanted = {s.n_ctx for s in sizings}
    readings: Readings = {}

    def read(n_ctx: int, at_least: bool = False) -> None:
        peak = peak_rss_bytes()
        for n, c in shapes:
            kv = engine.kv_bytes(n_ctx, n)
            readings[Sizing(n_ctx, n, c, kv_type)] = MemoryReport(opened - before, kv,
                                                         max(0, peak - opened - kv), at_least)

    for reached in _walk(engine, min(end, engine.n_ctx), chunk,
                         sorted({1, min(TREE_STEP, nodes), nodes})):
        if limit is not None and peak_rss_bytes() - before > limit:
            read(reached, at_least=True)
            break
        if reached % RECORD == 0 or reached in wanted:
            read(reached)
    else:
        for n_ctx in wanted - {s.n_ctx for s in readings}:
            read(n_ctx)  # the walk's last calls stop short of the end by less than a chunk
    engine.close()
    return readings


def _walk(engine: Backend, end: int, chunk: int, steps: list[int]) -> Iterator[int]:
    """Call ``engine`` as generations filling ``end`` tokens do, in a fraction of their
    calls: at every :data:`BLOCK` of the window a step of each size in ``steps``, at every
    ``chunk`` a prefill call; yields the tokens cached after each block. Every KV row gets
    written, and every call shape a generation makes is made (an engine may keep something
    per shape: OpenVINO's CPU plugin does)."""
    from edgespec.tree import TokenTree

    engine.truncate(0)
    engine.prefill_chunk = chunk
    while engine.n_past + max(chunk, *steps) <= end:
        start = engine.n_past
        if start % chunk == 0:
            engine.prefill(_filler(chunk, engine.vocab_size))
            engine.truncate(start)
        for n in steps:
            tokens = _filler(n, engine.vocab_size)
            engine.verify(TokenTree.chain(tokens[0], tokens[1:]))
            engine.commit([0])
            engine.truncate(start)
        engine.prefill(_filler(BLOCK, engine.vocab_size))
        yield engine.n_past


def _main() -> None:
    request = json.load(sys.stdin)
    readings = _child(request["backend"], Path(request["path"]),
                      [Sizing(*row) for row in request["sizings"]], request["limit"])
    json.dump([_row(s, r) for s, r in readings.items()], sys.stdout)


if __name__ == "__main__":
    _main()
