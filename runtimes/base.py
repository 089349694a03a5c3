"""The Backend protocol: what the decode loop needs from an inference engine.

Every engine (llama.cpp, ONNX Runtime, OpenVINO, the numpy reference) implements
this one small surface. The loop never sees engine details: it hands over a
:class:`~edgespec.tree.TokenTree`, gets one row of logits per node back from a
*single* engine call, and tells the backend which root path to keep in its KV cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import numpy as np

from edgespec.errors import UserError

if TYPE_CHECKING:
    from edgespec.tree import TokenTree


def require_cpu(device: str | None, engine: str) -> None:
    """Refuse a ``--device`` other than CPU (or AUTO) for an engine built for the CPU only."""
    if device is not None and device.upper() not in ("CPU", "AUTO"):
        raise UserError(f"the {engine} backend runs on the CPU here (device {device} asked); "
                        "use --backend onnx or openvino for other devices")


def check_kv_type(kv_type: str, engine: type[Backend] | Backend) -> None:
    """Refuse a KV precision the engine does not offer, naming the ones it does."""
    if kv_type not in engine.kv_types:
        raise UserError(f"the {engine.name} backend keeps its KV cache in "
                        f"{' or '.join(engine.kv_types)}, not {kv_type!r} (--kv-type)")


def default_threads() -> int:
    """Physical cores, as llama.cpp picks them: hyper-threads slow small matmuls down."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def lean_heap() -> None:
    """Serve buffers of 256 KiB and more straight from the OS, process-wide and for good.

    glibc raises its mmap threshold each time a large buffer is freed and then serves such
    buffers from the heap, which fragments when an engine's per-call buffers grow with the
    attention window: OpenVINO's RSS after 2,100 tokens of SmolLM2 was 1.5 GB, 0.9 GB with a
    fixed threshold, and it then depends on the window, not on how the calls came (which is
    what lets a measured estimate bound it). Steps cost ~10% more there. No-op off glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD


def rss() -> int:
    """This process's resident set now."""
    import psutil

    return psutil.Process().memory_info().rss


STALE_TEMPORARY_S = 60.0  # a temporary this old is a killed writer's: writes take ms


def write_json(path: Path, data: object, *, indent: int | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary beside it, synced, renamed
    into place. Temporaries a killed writer left (older than :data:`STALE_TEMPORARY_S`) go
    first, so caches do not collect them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in path.parent.glob(f".{path.name}.*"):
        with contextlib.suppress(OSError):  # another writer's, or gone already
            if time.time() - left.stat().st_mtime > STALE_TEMPORARY_S:
                left.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux's ``VmHWM`` where there is one: ``ru_maxrss`` survives ``exec``, so a process
    started by a larger one (a bench worker spawned after the bench exported a model)
    would report its parent's peak. (edgespec/peers/worker.py has its own copy: it may
    import nothing from edgespec.)
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass(frozen=True)
class MemoryReport:
    """Bytes a backend has allocated, split the way the memory planner budgets them; the
    same on every backend. ``weights``: the model's tensors (mapped file pages included:
    every one is read each step). ``kv_cache``: the cache as allocated, every row whether
    used or not. ``scratch``: what one step needs beyond that and reuses every step —
    compute, tree KV and logits buffers."""

    weights: int
    kv_cache: int
    scratch: int
    at_least: bool = False
    """True: a measurement stopped at its limit, and this is what it had reached by then."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.scratch


@dataclass(frozen=True)
class Sizing:
    """The load options memory depends on: context, the largest tree, the prefill batch and
    the KV cache's precision (one of the backend's :attr:`Backend.kv_types`)."""

    n_ctx: int
    max_tree_nodes: int
    prefill_chunk: int
    kv_type: str


@dataclass(frozen=True)
class TokenizerInfo:
    """Special tokens and template data the loop and the chat layer need."""

    bos_id: int | None
    eos_ids: frozenset[int]
    add_bos: bool
    chat_template: str | None = None
    special_texts: dict[int, str] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """An engine that can evaluate a token tree in one call and keep only one path."""

    name: str
    vocab_size: int
    n_ctx: int
    n_past: int
    tokenizer: TokenizerInfo
    threads: int | None
    """CPU threads the engine computes with (None: the engine's own default)."""
    build: ClassVar[str]
    """The engine and its version: a saved device profile holds for this build only."""
    budget_options: ClassVar[dict]
    """Options a load under a memory budget adds: what :meth:`estimate_memory` assumed."""
    kv_types: ClassVar[tuple[str, ...]]
    """The KV cache precisions (the constructor's ``kv_type``) that keep verification
    bit-exact, the default first: what a memory plan may choose. An engine may take more."""
    kv_type: str
    max_tree_nodes: int
    """The most nodes one :meth:`verify` takes (the constructor's ``max_tree_nodes``)."""
    prefill_chunk: int
    """The most tokens one :meth:`prefill` evaluates as a batch. The decode loop prefills a
    prompt in chunks starting at multiples of it, so a reused prefix was evaluated in the
    same batches as a fresh one."""
    exit_layers: Sequence[int]
    """The layers an early-exit draft can leave the model after (:meth:`draft_logits`);
    empty where the engine has none (llama.cpp)."""

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens like ``<|im_end|>``."""

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of ``ids``; may end inside a UTF-8 character."""

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` to the KV cache and return the logits after the last one.

        At most :attr:`prefill_chunk` ids are evaluated as one batch.
        """

    def verify(self, tree: TokenTree) -> np.ndarray:
        """Evaluate every node of ``tree`` after the cached context: logits ``[n_nodes, vocab]``.

        Node ``i`` sits at position ``n_past + depth[i]`` and attends to the cache and to
        its own ancestors only. The KV of all nodes stays provisional until :meth:`commit`.
        """

    def commit(self, path: Sequence[int]) -> None:
        """Keep the KV of the root path ``path`` (node indices, root first); drop the rest."""

    def draft_logits(self, ids: Sequence[int] | TokenTree, exit_layer: int) -> np.ndarray:
        """Logits ``[n, vocab]`` of the model cut after ``exit_layer`` blocks (one of
        :attr:`exit_layers`) for ``ids`` after the cached context, reading the cache the full
        model wrote; nothing is kept (cache, ``n_past`` and a pending verify stay)."""

    def truncate(self, n_past: int) -> None:
        """Forget everything from position ``n_past`` on (multi-turn rewind, error recovery)."""

    def set_threads(self, threads: int) -> bool:
        """Compute with ``threads`` from the next call on (fewer when another process takes
        a core); False where the engine fixes its count when it loads (ONNX Runtime and
        OpenVINO sessions), which keeps its count."""

    def memory(self) -> MemoryReport:
        """What this backend has allocated now."""

    @classmethod
    def estimate_memory(cls, path: str | Path, sizings: Sequence[Sizing],
                        limit: int | None = None) -> list[MemoryReport]:
        """What loading ``path`` with each sizing would allocate, without allocating it (the
        memory planner's input; many at once, since reading the model is the slow part).
        An estimate that has to run the engine holds its own memory under ``limit`` bytes,
        reporting what is beyond it as ``at_least``."""

    @classmethod
    def model_vocab_size(cls, path: str | Path) -> int:
        """Rows of the logits ``path`` gives, from its header or manifest (loads nothing)."""

    def close(self) -> None:
        """Free the engine's native memory."""
