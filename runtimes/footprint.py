"""Measured footprints: what an engine without a dry run holds at a sizing, found by running it.

ONNX Runtime and OpenVINO size their arenas, repacked weights and compiled copies inside
the runtime, where nothing can be asked before a session exists, so their estimate is a
measurement: a child process per context size opens the export, fills the context to its
end (every KV row written, the widest attention window) and runs each sizing's largest
calls there — a prefill chunk, then a tree — reading its peak RSS after each. A child,
because the planning process must not hold what it measures; sizings in ascending order,
because the peak only grows, so each reading bounds what its sizing needs from above (a
tree's includes a plain step's, as a generation's does).

Readings are kept per device, engine build and export (``~/.cache/edgespec/footprints``),
so a model is measured once: a few seconds per context size.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from edgespec.errors import UserError
from runtimes.base import MemoryReport, Sizing, default_threads, rss

VERSION = 1  # bump when what a reading covers changes: older readings are measured again


def measure(backend: str, build: str, path: Path, sizings: Sequence[Sizing]) -> list[MemoryReport]:
    """What opening ``path`` on ``backend`` with each sizing holds at its peak: read from the
    cache, the rest measured in one child process."""
    cache = _cache_file(backend, build, path)
    known = _read(cache)
    missing = {s for s in sizings if _key(s) not in known}
    for n_ctx in sorted({s.n_ctx for s in missing}):
        group = sorted((s for s in missing if s.n_ctx == n_ctx),
                       key=lambda s: (s.max_tree_nodes, s.prefill_chunk))
        known |= _run_child(backend, path, group)
        _write(cache, known)
    return [MemoryReport(*known[_key(s)]) for s in sizings]


def _run_child(backend: str, path: Path, sizings: list[Sizing]) -> dict[str, list[int]]:
    request = {"backend": backend, "path": str(path),
               "sizings": [[s.n_ctx, s.max_tree_nodes, s.prefill_chunk] for s in sizings]}
    done = subprocess.run([sys.executable, "-m", "runtimes.footprint"], input=json.dumps(request),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"measuring what {path.name} needs on {backend} failed ({last}); "
                        "plan without --memory-budget or use --backend llamacpp")
    return json.loads(done.stdout)


def _key(s: Sizing) -> str:
    return f"{s.n_ctx},{s.max_tree_nodes},{s.prefill_chunk}"


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


def _read(cache: Path) -> dict[str, list[int]]:
    try:
        readings = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measured again
    return readings if isinstance(readings, dict) else {}


def _write(cache: Path, readings: dict[str, list[int]]) -> None:
    """Whole or not at all: a temporary file renamed into place."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.", dir=cache.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(readings, f)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache costs a measurement next time, nothing else


# -- the child -------------------------------------------------------------------------------


def _peak() -> int:
    """VmHWM: the peak resident set so far (RSS where /proc has no status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss()


def _filler(n: int, vocab: int) -> list[int]:
    """``n`` ordinary token ids: what they say does not change what the engine allocates."""
    return [100 + (i * 7919) % (vocab - 100) for i in range(n)]


def _child(backend: str, path: Path, sizings: list[Sizing]) -> dict[str, list[int]]:
    from edgespec.tree import TokenTree
    from runtimes import backend_class
    from runtimes.slots import SlotBackend

    cls = backend_class(backend)  # the engine's libraries are in the planner's process too
    before = rss()
    engine = cls(path, n_ctx=max(s.n_ctx for s in sizings),
                 max_tree_nodes=max(s.max_tree_nodes for s in sizings),
                 prefill_chunk=max(s.prefill_chunk for s in sizings))
    assert isinstance(engine, SlotBackend)
    opened = rss()
    fill = min(s.prefill_chunk for s in sizings)  # the leanest calls fill the context
    readings = {}
    for s in sizings:  # one context size, plain steps first, trees ascending
        end = min(s.n_ctx, engine.n_ctx)
        start = end - s.prefill_chunk  # the last prefill chunk of a full context
        if engine.n_past < start:
            engine.prefill_chunk = fill
            engine.prefill(_filler(start - engine.n_past, engine.vocab_size))
        engine.truncate(start)
        engine.prefill_chunk = s.prefill_chunk
        engine.prefill(_filler(s.prefill_chunk, engine.vocab_size))
        engine.truncate(end - s.max_tree_nodes)  # then the largest step there
        step = _filler(s.max_tree_nodes, engine.vocab_size)
        engine.verify(TokenTree.chain(step[0], step[1:]))
        engine.commit([0])
        kv = engine.kv_bytes(s.n_ctx, s.max_tree_nodes)
        readings[_key(s)] = [opened - before, kv, max(0, _peak() - opened - kv)]
    engine.close()
    return readings


def _main() -> None:
    request = json.load(sys.stdin)
    sizings = [Sizing(*s) for s in request["sizings"]]
    json.dump(_child(request["backend"], Path(request["path"]), sizings), sys.stdout)


if __name__ == "__main__":
    _main()
