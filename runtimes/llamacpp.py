"""Backend on llama.cpp (llama-cpp-python's low-level C API).

A token tree is verified in one ``llama_decode``: each root-to-leaf branch of the tree is a
llama.cpp *sequence*, a node belongs to the sequences of every branch through it, and its
position is ``n_past + depth``. llama.cpp masks attention by a token's first sequence id,
so each node sees the cached context (copied into every branch sequence, which in a
unified KV cache only tags cells) and its own ancestors — the tree mask, for free.
Committing keeps the accepted path's cells under sequence 0 and drops every other branch,
so rejected nodes never stay in the cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgespec.errors import UserError
from edgespec.tree import TokenTree
from runtimes.base import (
    MemoryReport,
    Sizing,
    TokenizerInfo,
    check_kv_type,
    default_threads,
    require_cpu,
    rss,
)
from runtimes.ggufinfo import GGUFInfo, read_gguf

try:
    import llama_cpp as llm
except ImportError:  # pragma: no cover - exercised only without the gguf extra
    llm = None

_GGML_TYPES = {"f16": 1, "q8_0": 8}  # ggml_type of each KV precision offered


class _LogCapture:
    """Routes llama.cpp's log into a list instead of stderr.

    llama.cpp has one log callback per *process*, so there is one capture per process too
    (see :func:`log_capture`): a callback owned by a backend would be freed with it while
    llama.cpp still calls it. The captured lines explain load failures and report the
    compute buffer size for :meth:`LlamaCppBackend.memory`.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.sizes: list[str] = []  # every buffer-size line since clear(): the debug lines
        # of a context's graph would push them out of the last 200
        self._callback = llm.llama_log_callback(self._log)
        llm.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        self.lines.append(line)
        del self.lines[:-200]
        if " MiB" in line:
            self.sizes.append(line)

    def clear(self) -> None:
        self.lines.clear()
        self.sizes.clear()

    def last_error(self) -> str:
        errors = [line.strip() for line in self.lines if "error" in line.lower()]
        return errors[-1] if errors else ""

    def buffer_bytes(self, kind: str) -> int:
        """Bytes of the buffers llama.cpp logged since :meth:`clear`: ``output`` or
        ``compute`` (``<kind> buffer size = N MiB``), or ``KV`` (``llama_kv_cache: size =
        N MiB``, which a dry run logs too)."""
        key = "kv_cache: size =" if kind == "KV" else f"{kind} buffer size ="
        sizes = [line.split(key)[1].split()[0] for line in self.sizes if key in line]
        return int(sum(float(s) for s in sizes) * 2**20)


@functools.cache
def log_capture() -> _LogCapture:
    return _LogCapture()


class LlamaCppBackend:
    """The :class:`~runtimes.base.Backend` protocol on llama.cpp."""

    name = "llamacpp"
    build = f"llama-cpp-python {llm.__version__}" if llm else "llama-cpp-python (missing)"
    budget_options: ClassVar[dict] = {}  # its estimate is a dry run of the same load
    # K only: a quantized V cache needs flash attention, which is off for exactness
    kv_types: ClassVar[tuple[str, ...]] = ("f16", "q8_0")

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        max_tree_nodes: int = 64,
        prefill_chunk: int = 64,
        kv_type: str = "f16",
        device: str | None = None,
    ) -> None:
        if llm is None:
            raise UserError("the llama.cpp backend needs llama-cpp-python; install edgespec[gguf]")
        require_cpu(device, "llama.cpp")
        check_kv_type(kv_type, self)
        self.kv_type = kv_type
        if kv_type != self.kv_types[0]:  # a saved profile's exactness holds for its cache type
            self.build = f"{type(self).build}, K cache {kv_type}"
        self.info, parsed = _read_header(path)  # held while the backend lives
        self._log = log_capture()
        self._log.clear()
        self.threads = threads or default_threads()
        self.max_tree_nodes = max_tree_nodes
        before = _heap_in_use()
        self._model = _load_model(Path(path), self._log)
        tables = _heap_in_use() - before  # the tensors are mapped, not allocated
        capacity = max(prefill_chunk, max_tree_nodes)  # tokens per llama_decode: a chunk or a tree
        self._ctx = _new_context(self._model, self._log, n_ctx=n_ctx, n_batch=capacity,
                                 n_seq=max_tree_nodes, threads=self.threads, kv_type=kv_type)
        self._vocab = llm.llama_model_get_vocab(self._model)
        self._mem = llm.llama_get_memory(self._ctx)
        self.vocab_size = llm.llama_vocab_n_tokens(self._vocab)
        # llama.cpp pads the context to a multiple of 256 and caps the batch at it; the
        # caller's context size stays the limit so that errors name the number it gave
        self.n_ctx = min(n_ctx, llm.llama_n_ctx(self._ctx))
        self.prefill_chunk = min(prefill_chunk, llm.llama_n_batch(self._ctx))
        self._memory = _logged_memory(self._model, self._log, parsed + tables)
        self.n_past = 0
        self._batch = llm.llama_batch_init(capacity, 0, max_tree_nodes)
        self._batch_arrays = _batch_arrays(self._batch, capacity)
        self._piece = ctypes.create_string_buffer(256)
        self._logits_at: int | None = None  # where llama.cpp's output buffer is
        self._logits_views: dict[int, np.ndarray] = {}
        self._pending: tuple[TokenTree, list[int], int] | None = None
        self.tokenizer = self._tokenizer_info()

    @classmethod
    def estimate_memory(cls, path: str | Path, sizings: Sequence[Sizing],
                        limit: int | None = None) -> list[MemoryReport]:
        """What loading ``path`` with each sizing would allocate, as llama.cpp itself sizes
        it: one dry-run model (``no_alloc``: metadata only) and a dry-run context per sizing
        (allocating nothing, it needs no ``limit``)."""
        if llm is None:
            raise UserError("the llama.cpp backend needs llama-cpp-python; install edgespec[gguf]")
        parsed = _read_header(path)[1]  # llama.cpp never sees a file the validator refuses
        log = log_capture()
        log.clear()
        before = _heap_in_use()
        model = _load_model(Path(path), log, no_alloc=True)
        tables = _heap_in_use() - before  # vocabulary and metadata: all a dry run allocates
        reports = []
        try:
            for sizing in sizings:
                check_kv_type(sizing.kv_type, cls)
                log.clear()
                ctx = _new_context(model, log, n_ctx=sizing.n_ctx, n_seq=sizing.max_tree_nodes,
                                   n_batch=max(sizing.prefill_chunk, sizing.max_tree_nodes),
                                   threads=1, kv_type=sizing.kv_type)
                llm.llama_free(ctx)
                reports.append(_logged_memory(model, log, parsed + tables))
        finally:
            llm.llama_model_free(model)
            release_heap()
        return reports

    @classmethod
    def model_vocab_size(cls, path: str | Path) -> int:
        return len(read_gguf(path).tokens)

    def _tokenizer_info(self) -> TokenizerInfo:
        v = self._vocab
        eos = {t for t in range(self.vocab_size) if llm.llama_vocab_is_eog(v, t)}
        bos = llm.llama_vocab_bos(v)
        return TokenizerInfo(
            bos_id=bos if bos >= 0 else None,
            eos_ids=frozenset(eos),
            add_bos=bool(llm.llama_vocab_get_add_bos(v)),
            chat_template=self.info.chat_template,
            special_texts={t: self.info.tokens[t] for t in (bos, *eos) if 0 <= t < self.vocab_size},
        )

    # -- text ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llm.llama_token * n_max)()
        n = llm.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needed {-n} slots, had {n_max}")
        return list(buf[:n])

    def detokenize(self, ids: Sequence[int]) -> bytes:
        out = bytearray()
        buf = self._piece
        for t in ids:
            n = llm.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0, False)
            out += buf.raw[:max(n, 0)]
        return bytes(out)

    # -- evaluation ----------------------------------------------------------------------

    def prefill(self, ids: Sequence[int], *, logits: bool = True) -> np.ndarray | None:
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._require_room(len(ids))
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start:start + self.prefill_chunk]
            last = logits and start + len(chunk) == len(ids)
            self._fill(chunk, [self.n_past + i for i in range(len(chunk))], [[0]] * len(chunk),
                       outputs="last" if last else "none")
            self._decode()
            self.n_past += len(chunk)
        return self._logits(1)[0].copy() if logits else None

    exit_layers: Sequence[int] = ()  # its graph has no exit (a draft model stands in)

    def draft_logits(self, ids: Sequence[int] | TokenTree, exit_layer: int) -> np.ndarray:
        raise UserError("llama.cpp has no early exit inside the model; use a draft model "
                        "(export --with-draft early-exit:E, then --draft-model PATH)")

    def verify(self, tree: TokenTree) -> np.ndarray:
        if len(tree) > self.max_tree_nodes:
            raise ValueError(f"tree of {len(tree)} nodes exceeds {self.max_tree_nodes} nodes")
        self._require_room(tree.max_depth + 1)
        order = tree.best_first()
        seqs = _branch_sequences(tree, order)
        n_branches = 1 + max(s[-1] for s in seqs)
        for b in range(1, n_branches):
            llm.llama_memory_seq_cp(self._mem, 0, b, -1, -1)
        self._fill([tree.tokens[i] for i in order], [self.n_past + tree.depth[i] for i in order],
                   [seqs[i] for i in order], outputs="all")
        self._decode()
        self._pending = (tree, order, n_branches)
        rows = self._logits(len(tree))
        if order == sorted(order):  # a chain or a plain step: rows already in node order
            return rows.copy()
        logits = np.empty_like(rows)
        logits[order] = rows
        return logits

    def commit(self, path: Sequence[int]) -> None:
        """Keep ``path``'s cells, in position order right after the context.

        Attention sums over cache cells in cell order, so bit-exact agreement with plain
        decoding needs the cells in the order plain decoding would have written them. The
        tree was laid out best-first (:meth:`TokenTree.best_first`): a path along its
        likeliest branch is already in place; any other accepted path is evaluated again as
        a chain (rare, and exact).
        """
        if self._pending is None:
            raise RuntimeError("commit() without a verify() before it")
        tree, order, n_branches = self._pending
        self._pending = None
        in_place = list(path) == order[: len(path)]
        keep = len(path) if in_place else 0
        for b in range(n_branches):
            llm.llama_memory_seq_rm(self._mem, b, self.n_past + keep if b == 0 else -1, -1)
        if in_place:
            self.n_past += len(path)
        else:
            self.prefill([tree.tokens[i] for i in path], logits=False)

    def truncate(self, n_past: int) -> None:
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot truncate to {n_past} with {self.n_past} cached")
        llm.llama_memory_seq_rm(self._mem, -1, n_past, -1)
        self._pending = None
        self.n_past = n_past

    def set_threads(self, threads: int) -> bool:
        llm.llama_set_n_threads(self._ctx, threads, threads)
        self.threads = threads
        return True

    def memory(self) -> MemoryReport:
        return self._memory

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llm.llama_batch_free(self._batch)
            llm.llama_free(self._ctx)
            llm.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------

    def _require_room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise UserError(
                f"{self.n_past + n} tokens do not fit the context of {self.n_ctx}; "
                "raise -c/--ctx-size or shorten the prompt"
            )

    def _fill(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seqs: Sequence[Sequence[int]],
        *,
        outputs: str,
    ) -> None:
        """Load the batch; ``outputs`` is which tokens return logits: all, last or none."""
        b = self._batch
        n = len(tokens)
        b.n_tokens = n
        token, pos, n_seq_id, flags = self._batch_arrays
        token[:n] = tokens
        pos[:n] = positions
        n_seq_id[:n] = [len(s) for s in seqs]
        flags[:n] = outputs == "all"
        flags[n - 1] = outputs != "none"
        for i, s in enumerate(seqs):
            row = b.seq_id[i]
            for j, seq in enumerate(s):
                row[j] = seq

    def _decode(self) -> None:
        rc = llm.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}): {self._log.last_error()}")

    def _logits(self, n: int) -> np.ndarray:
        """A view of the last decode's ``n`` rows of logits, valid until the next decode.

        Views are kept per row count while llama.cpp's output buffer stays where it is:
        making one costs ~50 µs, half a percent of a plain step.
        """
        ptr = llm.llama_get_logits(self._ctx)
        address = ctypes.cast(ptr, ctypes.c_void_p).value
        if address != self._logits_at:
            self._logits_at, self._logits_views = address, {}
        view = self._logits_views.get(n)
        if view is None:
            view = self._logits_views[n] = np.ctypeslib.as_array(ptr, shape=(n, self.vocab_size))
        return view


def _load_model(path: Path, log: _LogCapture, *, no_alloc: bool = False) -> llm.llama_model_p:
    params = llm.llama_model_default_params()
    # repacked weights (Q4_0/Q4_K/IQ4_NL on x86) use a gemm kernel for batches and a
    # gemv kernel for one token, with another summation order: trees would diverge
    params.use_extra_bufts = False
    params.no_alloc = no_alloc
    if no_alloc:  # llama.cpp asserts that a dry run maps nothing
        params.load_mode = llm.LLAMA_LOAD_MODE_NONE
    model = llm.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        detail = log.last_error() or "llama.cpp could not load it"
        raise UserError(f"cannot load {path}: {detail}")
    return model


def _new_context(model: llm.llama_model_p, log: _LogCapture, *, n_ctx: int, n_batch: int,
                 n_seq: int, threads: int, kv_type: str) -> llm.llama_context_p:
    """A context whose batches hold ``n_batch`` tokens in up to ``n_seq`` branches, its K
    cache in ``kv_type``; frees ``model`` if llama.cpp refuses."""
    params = llm.llama_context_default_params()
    params.n_ctx = n_ctx
    params.type_k = _GGML_TYPES[kv_type]
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = n_seq
    params.kv_unified = True  # branches share the context's cells instead of copies
    params.n_threads = params.n_threads_batch = threads
    # flash attention evaluates a batch with another summation order than one token
    params.flash_attn_type = llm.LLAMA_FLASH_ATTN_TYPE_DISABLED
    # sliding-window layers (Gemma 3) otherwise keep a ring buffer of window + batch
    # cells, so cells stop being in position order and attention sums in another order
    params.swa_full = True
    params.no_perf = True
    ctx = llm.llama_init_from_model(model, params)
    if not ctx:
        llm.llama_model_free(model)
        raise UserError(
            f"llama.cpp could not create a context of {n_ctx} tokens "
            f"({log.last_error() or 'out of memory?'}); try a smaller -c/--ctx-size"
        )
    return ctx


_header_costs: dict[tuple[str, int, int], int] = {}


def _read_header(path: str | Path) -> tuple[GGUFInfo, int]:
    """The validated header and what holding it costs as Python objects (Gemma's 262k
    tokens: tens of MB): the RSS its parse added the first time this process read the file.
    A later parse lands in heap an earlier one freed and reads less, by a different amount
    each time, which would move a memory plan from one call to the next."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    before = rss()
    info = read_gguf(path)
    return info, _header_costs.setdefault(key, max(0, rss() - before))


def _logged_memory(model: llm.llama_model_p, log: _LogCapture, tables: int) -> MemoryReport:
    """The memory contract from what llama.cpp logged creating a context: the tensors and
    the model's host ``tables`` (measured: llama.cpp's vocabulary and metadata, and the
    header as the validator parsed it), its KV buffers, and its compute and output
    (logits) buffers as scratch."""
    return MemoryReport(weights=int(llm.llama_model_size(model)) + tables,
                        kv_cache=log.buffer_bytes("KV"),
                        scratch=log.buffer_bytes("compute") + log.buffer_bytes("output"))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc's mallinfo2): the same for the
    same allocations whatever the heap held before, unlike RSS; the process's RSS where
    the C library cannot say."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return rss()
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def release_heap() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise): a dry run's tables would
    stay in the process's RSS, and the memory planner measures the process after one."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to give back
        ctypes.CDLL(None).malloc_trim(0)


def _batch_arrays(batch: llm.llama_batch, capacity: int) -> tuple[np.ndarray, ...]:
    """NumPy views of the batch's token, position, sequence-count and logits-flag arrays.

    Made once: ``np.ctypeslib.as_array`` costs ~10 µs a call, and a plain step, which
    fills all four, takes ~10 ms of which the loop's own Python is ~0.3 ms.
    """
    return tuple(np.ctypeslib.as_array(field, shape=(capacity,))
                 for field in (batch.token, batch.pos, batch.n_seq_id, batch.logits))


def _branch_sequences(tree: TokenTree, order: list[int]) -> list[list[int]]:
    """Sequence ids per node: the branches (leaves) through it, in ``order``'s leaf order.

    The first leaf of the best-first order ends the likeliest branch, which becomes
    sequence 0, the cache's own. A node's first id is a branch every ancestor also
    belongs to, which is what llama.cpp's mask needs.
    """
    seqs: list[list[int]] = [[] for _ in range(len(tree))]
    leaves = [i for i in order if not tree.children[i]]
    for branch, leaf in enumerate(leaves):
        for node in tree.path_to(leaf):
            seqs[node].append(branch)
    return seqs
