"""What the ONNX Runtime and OpenVINO backends share: edgespec exports run on KV *slots*.

Both run edgespec's tree-capable decoder graph against KV buffers the runtime owns, one
slot per cached token. A tree is evaluated at slot ``n_past`` (best-scored path in
consecutive slots, see :meth:`TokenTree.best_first`), its RoPE positions are
``n_past + depth`` and an additive mask says which slots each node sees; :meth:`commit`
keeps the accepted path by moving ``n_past`` (or, off the best path, by recomputing or
moving its rows). An engine module adds only how a call is padded for batch invariance,
how a graph is opened and run on the buffers, and how the buffers are laid out.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgespec.errors import UserError
from edgespec.tree import TokenTree
from runtimes import base, footprint
from runtimes.base import MemoryReport, Sizing, rss
from runtimes.formats import MANIFEST, Exporter, ExportFormat, manifest_version
from runtimes.reference_tokenizer import hf_tokenizer


def export_on_the_fly(src: Path, export: Exporter, prefix: str) -> tuple[Path, Path]:
    """``export(src, dir)`` into a new temporary directory: the export and the directory,
    which the backend deletes when it closes; a failed export deletes it at once."""
    temp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return export(src, temp / "model"), temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def require_inputs(path: Path, present: set[str], fmt: ExportFormat) -> None:
    """Refuse a graph lacking the inputs graphs of format ``fmt`` take."""
    missing = [n for n in fmt.required_inputs if n not in present]
    if missing:
        raise UserError(
            f"{path} lacks the inputs edgespec needs ({', '.join(missing)}): it was not exported "
            f"for tree verification; export one with `{fmt.export_hint}`"
        )


def attention_mask(visible: np.ndarray, n_past: int, offset: int,
                   width: int | None = None) -> np.ndarray:
    """Additive ``[1, 1, n, width]``: the prefix, ``visible`` over the new slots, then hidden
    columns up to ``width`` (default ``offset + n``).

    Slots ``n_past .. offset - 1`` (a pending tree an early-exit draft runs after) are hidden.
    """
    n = visible.shape[0]
    mask = np.full((1, 1, n, width or offset + n), -np.inf, np.float32)
    mask[..., :n_past] = 0
    mask[0, 0, :, offset:offset + n] = np.where(visible, np.float32(0), np.float32(-np.inf))
    return mask


class SlotBackend:
    """The :class:`~runtimes.base.Backend` protocol on an edgespec export, engine aside.

    A subclass sets the export's constants, opens the model and calls :meth:`_open_export`,
    and implements :meth:`_alloc`, :meth:`_evaluate` and :meth:`_open_graph` (and
    :meth:`_pad_call` if its kernels need padded calls). It measures what opening the
    export made resident (``_resident_weights``); graphs opened later go through
    :meth:`_measured`.
    """

    name: str
    KIND: str  # the engine's name in messages
    SUFFIX: str  # a model file of this kind
    EXPORT: ExportFormat
    DIR_MARKER: str  # a directory holding this file is an export of this kind
    SLOT_AXIS: int  # the buffers' slot dimension
    # the estimate walks the context on a lean heap (runtimes.base.lean_heap): without it
    # the RSS also depends on how the calls came, which no estimate can bound
    budget_options: ClassVar[dict] = {"lean_heap": True}
    kv_types: ClassVar[tuple[str, ...]] = ("f32",)

    _k: list[np.ndarray]
    _v: list[np.ndarray]
    _resident_weights: int  # what opening the export and its graphs made resident

    # -- engine specifics ----------------------------------------------------------------

    def _alloc(self, n_kv: int, head_dim: int) -> None:
        """Create ``_k``, ``_v``, ``capacity`` (:meth:`_capacity`) and ``_row_bytes``."""
        raise NotImplementedError

    def _capacity(self, n_ctx: int, max_tree_nodes: int) -> int:
        """KV slots for a context: ``n_ctx`` plus room for a tree and a draft after it."""
        return n_ctx + 2 * max_tree_nodes

    def _pad_call(self, tokens: Sequence[int], depth: Sequence[int], visible: np.ndarray,
                  offset: int) -> tuple[Sequence[int], Sequence[int], np.ndarray]:
        """The call actually made, padded as the engine needs (for batch invariance, or for
        fewer shape changes); as is, unless the engine says otherwise."""
        return tokens, depth, visible

    def _evaluate(self, graph: Any, feeds: dict[str, np.ndarray], offset: int) -> np.ndarray:
        """Run ``graph``; its new K/V rows land in slots ``offset..``; logits of the rows."""
        raise NotImplementedError

    def _key_slots(self, offset: int, rows: int) -> int:
        """How many key slots a call of ``rows`` rows at ``offset`` attends over (the mask's
        width); an engine whose graph pads its keys may ask for more than it fills."""
        return offset + rows

    def _graph_for(self, rows: int) -> Any:
        """The main model's graph to verify ``rows`` rows with (one graph, unless the engine
        pays for changing a call's shape and keeps one per kind of call)."""
        return self._main

    def _open_graph(self, path: Path) -> Any:
        """A runnable early-exit graph from its file."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _opening(self, lean_heap: bool) -> Iterator[None]:
        """Opening the export: on a lean heap if asked (:func:`runtimes.base.lean_heap`, what
        a memory budget's estimate assumes); what it makes resident counts as weights."""
        if lean_heap:
            base.lean_heap()
        before = rss()
        yield
        self._resident_weights = max(0, rss() - before)

    def _measured(self, open_graph: Callable[[], Any]) -> Any:
        """``open_graph()``, counting what it makes resident as weights: a runtime holds
        its graphs' weights as it chooses (repacked, or both packed and not), so the bytes
        are measured, not taken from the files."""
        before = rss()
        graph = open_graph()
        self._resident_weights += max(0, rss() - before)
        return graph

    # -- loading -------------------------------------------------------------------------

    def _resolve(self, path: Path, exporter: Exporter | None) -> tuple[Path, Path]:
        """The export directory and its model file; other sources are exported on the fly
        by ``exporter``, into a temporary directory :meth:`close` removes."""
        self._temp: Path | None = None
        if not path.exists():
            raise UserError(f"model not found: {path}")
        if path.is_file() and path.suffix.lower() == self.SUFFIX:
            return path.parent, path
        if path.is_dir() and (path / self.DIR_MARKER).is_file():
            return path, path / self.EXPORT.model_file
        if exporter is None:
            raise UserError(f"{path} is not an edgespec {self.KIND} export; make one with "
                            f"`{self.EXPORT.export_hint}`")
        out, self._temp = export_on_the_fly(path, exporter, f"edgespec-{self.name}-")
        return out, out / self.EXPORT.model_file

    def _manifest(self) -> dict:
        """The exporter's sidecar: KV shape and special tokens the graph does not carry."""
        path = self.dir / MANIFEST
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is missing or unreadable ({e}); re-export the model with "
                            f"`{self.EXPORT.export_hint}`") from e
        if meta.get("format") != self.EXPORT.name:
            raise UserError(f"{path} is not an edgespec {self.KIND} export; "
                            f"use `{self.EXPORT.export_hint}`")
        version = manifest_version(meta)
        if version < self.EXPORT.version:
            raise UserError(f"{self.dir} was exported by an older edgespec (format version "
                            f"{version}); export it again with `{self.EXPORT.export_hint}`")
        return meta

    def _open_export(self, meta: dict, n_ctx: int) -> None:
        """Tokenizer, context, KV buffers and early-exit files from the manifest."""
        self.encoder, self.tokenizer = hf_tokenizer(self.dir, meta)
        self.vocab_size, self.n_layer = int(meta["vocab_size"]), int(meta["n_layer"])
        # every slot (n_ctx + two trees of scratch) must be inside the RoPE table
        self.n_ctx = min(n_ctx, int(meta["max_positions"]) - 2 * self.max_tree_nodes)
        self.n_past = 0
        self._pending: tuple[TokenTree, int, np.ndarray] | None = None  # tree, offset, slots
        self._alloc(int(meta["n_head_kv"]), int(meta["head_dim"]))
        # early-exit graphs load their share of the weights again, so on first use only
        self._exit_files = {int(e): self.dir / f for e, f in meta.get("early_exit", {}).items()}
        self._exits: dict[int, Any] = {}
        self.exit_layers = sorted(self._exit_files)

    # -- text ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text`` (no BOS added: the caller decides from ``tokenizer.add_bos``)."""
        return self.encoder.encode(text, special=special)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return self.encoder.decode(ids)

    # -- evaluation ------------------------------------------------------------------------

    def _run(self, graph: Any, tokens: Sequence[int], depth: Sequence[int],
             visible: np.ndarray, offset: int, rows: np.ndarray) -> np.ndarray:
        """Evaluate ``tokens`` into slots ``offset..``; logits of ``rows``."""
        tokens, depth, visible = self._pad_call(tokens, depth, visible, offset)
        feeds = {
            "input_ids": np.asarray([tokens], np.int64),
            "position_ids": self.n_past + np.asarray([depth], np.int64),
            "attn_mask": attention_mask(visible, self.n_past, offset,
                                        self._key_slots(offset, len(tokens))),
            "logits_rows": rows.astype(np.int64),
        }
        return self._evaluate(graph, feeds, offset)

    def _check_room(self, tree: TokenTree, offset: int) -> None:
        if self.n_past + tree.max_depth + 1 > self.n_ctx:
            raise UserError(
                f"the context is full: {self.n_past} cached + {tree.max_depth + 1} new tokens "
                f"exceed n_ctx={self.n_ctx}; raise -c/--ctx-size"
            )
        if len(tree) > self.max_tree_nodes or offset + len(tree) > self.capacity:
            raise ValueError(f"a tree of {len(tree)} nodes exceeds max_tree_nodes="
                             f"{self.max_tree_nodes}")

    def set_threads(self, threads: int) -> bool:
        return False  # a session's thread pool is fixed when it is created

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` in chunks (bounded mask size); the logits after the last one."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise UserError(f"the context is full: {self.n_past} cached + {len(ids)} new tokens "
                            f"exceed n_ctx={self.n_ctx}; raise -c/--ctx-size")
        self._pending = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk]
            n = len(chunk)
            causal = np.tril(np.ones((n, n), bool))
            logits = self._run(self._main, chunk, range(n), causal, self.n_past,
                               np.array([n - 1]))
            self.n_past += n
        return logits[0]

    def verify(self, tree: TokenTree) -> np.ndarray:
        """Logits ``[n_nodes, vocab]`` in one run; the tree's KV waits in slots ``n_past..``.

        Nodes take slots depth-first, best-scored child first (:meth:`TokenTree.best_first`).
        """
        self._check_room(tree, self.n_past)
        order = tree.best_first()
        slot = np.empty(len(tree), np.int64)
        slot[order] = np.arange(len(tree))
        visible = tree.ancestor_mask()[np.ix_(order, order)]
        logits = self._run(self._graph_for(len(tree)), [tree.tokens[i] for i in order],
                           [tree.depth[i] for i in order], visible, self.n_past,
                           np.arange(len(tree)))
        self._pending = (tree, self.n_past, slot)
        return logits[slot]

    def commit(self, path: Sequence[int]) -> None:
        """Keep the accepted path's KV at ``n_past..``: already there if it is the best path.

        Another path's rows were computed with gaps between its slots (see
        :meth:`TokenTree.best_first`); they are moved down (a few KB per token) or, when
        batch invariance is on, recomputed as a chain so the cache holds what sequential decoding
        would have written — one extra run of ``len(path)`` tokens, on the rare steps that
        accept a branch other than the drafter's best.
        """
        if self._pending is None:
            raise ValueError("commit without a preceding verify")
        (tree, offset, slot), path = self._pending, list(path)
        if not path or path[0] != 0 or any(tree.parents[b] != a for a, b in pairwise(path)):
            raise ValueError(f"{path} is not a root path of the verified tree")
        src, dst = offset + slot[path], self.n_past + np.arange(len(path))
        if self.batch_invariant and not np.array_equal(src, dst):
            chain = np.tril(np.ones((len(path), len(path)), bool))
            self._run(self._graph_for(len(path)), [tree.tokens[i] for i in path],
                      range(len(path)), chain, self.n_past, np.array([0]))
        elif not np.array_equal(src, dst):
            lead = (0,) + (slice(None),) * (self.SLOT_AXIS - 1)
            for buffer in self._k + self._v:
                buffer[(*lead, dst)] = buffer[(*lead, src)]
        self.n_past += len(path)
        self._pending = None

    def truncate(self, n_past: int) -> None:
        """Forget positions ``n_past`` and later; their slots are overwritten when reused."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot truncate to {n_past}: the cache holds {self.n_past}")
        self.n_past, self._pending = n_past, None

    def draft_logits(self, ids_or_tree: Sequence[int] | TokenTree, exit_layer: int) -> np.ndarray:
        """Logits ``[n, vocab]`` of the exported early exit after ``exit_layer`` blocks.

        The draft reads the cache the full model wrote for layers below the exit and writes
        its own rows *after* a pending verification's, so nothing committed or pending
        changes.
        """
        tree = ids_or_tree
        if not isinstance(tree, TokenTree):
            tree = TokenTree.chain(ids_or_tree[0], ids_or_tree[1:])
        full = exit_layer == self.n_layer
        graph = self._graph_for(len(tree)) if full else self._exit_graph(exit_layer)
        offset = self.n_past + (len(self._pending[0]) if self._pending else 0)
        self._check_room(tree, offset)
        return self._run(graph, tree.tokens, tree.depth, tree.ancestor_mask(), offset,
                         np.arange(len(tree)))

    def _exit_graph(self, exit_layer: int) -> Any:
        """The early-exit graph after ``exit_layer`` blocks, opened on first use."""
        if exit_layer not in self._exit_files:
            raise ValueError(f"no early-exit graph after layer {exit_layer}; this export has "
                             f"{self.exit_layers or 'none'} (export with early_exit=E)")
        if exit_layer not in self._exits:
            self._exits[exit_layer] = self._measured(
                lambda: self._open_graph(self._exit_files[exit_layer]))
        return self._exits[exit_layer]

    # -- resources ----------------------------------------------------------------------------

    def memory(self) -> MemoryReport:
        return MemoryReport(self._resident_weights, self.kv_bytes(self.n_ctx, self.max_tree_nodes),
                            4 * self.vocab_size * self.max_tree_nodes)

    def kv_bytes(self, n_ctx: int, max_tree_nodes: int) -> int:
        """The KV buffers a load with this context and tree size allocates."""
        return self._row_bytes * self._capacity(n_ctx, max_tree_nodes)

    @classmethod
    def estimate_memory(cls, path: str | Path, sizings: Sequence[Sizing],
                        limit: int | None = None) -> list[MemoryReport]:
        """Measured (:mod:`runtimes.footprint`): the runtime sizes its arenas and repacked
        weights itself, so nothing short of running the export says what it holds."""
        path = Path(path)
        if not (path.is_dir() or path.suffix.lower() == cls.SUFFIX):
            raise UserError(f"a memory budget on the {cls.name} backend needs an export; make "
                            f"one with `{cls.EXPORT.export_hint}` and pass its directory")
        return footprint.measure(cls.name, cls.build, path, sizings, limit)

    @classmethod
    def model_vocab_size(cls, path: str | Path) -> int:
        path = Path(path)
        manifest = (path if path.is_dir() else path.parent) / MANIFEST
        try:
            return int(json.loads(manifest.read_text())["vocab_size"])
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{manifest} is missing or unreadable ({e}); re-export the model "
                            f"with `{cls.EXPORT.export_hint}`") from e

    def close(self) -> None:
        """Drop the graphs and buffers; delete an on-the-fly export."""
        self._main = None
        self._exits, self._k, self._v = {}, [], []
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
