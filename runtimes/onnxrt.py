"""Backend on ONNX Runtime, running edgespec's tree-capable decoder graph.

The graph (``exporters/onnx_graph.py``) attends through GroupQueryAttention over KV
buffers that are *shared* between its past inputs and present outputs. This backend
allocates those buffers once — per layer ``[1, n_kv, capacity, head_dim]`` float32 —
and binds them with IO binding as the same OrtValue for input and output, so the engine
writes the new rows in place and no call copies the cache.

Slots and positions are decoupled: a call's tokens are written to buffer slots
``offset .. offset + n - 1`` while their RoPE positions are ``n_past + depth`` and the
additive ``attn_mask`` says which slots each token sees (the committed prefix and its
tree ancestors). So a tree is verified in place at slot ``n_past``, its best-scored path
in consecutive slots; when that path (or a prefix of it) is accepted, :meth:`commit` only
moves ``n_past``, and rejected rows are simply overwritten later. Capacity is ``n_ctx``
plus two trees of scratch: the second lets an early-exit draft run after a pending
verification without touching it.

Exactness (``batch_invariant``, on by default). Speculation is lossless only if a token's
logits do not depend on what was verified with it. onnxruntime's CPU kernels break that
twice, and both are worked around here, measured on SmolLM2 int8:

* a lone row goes through other MatMulNBits kernels than the same row among others
  (logits move by up to ~1.0), while batches of 2..40 rows agree bit for bit: a single
  token is evaluated with a throw-away second row (scratch slot, invisible to the first),
  so plain steps cost c(2) instead of c(1), ~1.15-1.25x;
* a node whose ancestors are not in consecutive slots is summed in another order by GQA
  (see :meth:`TokenTree.best_first`): the best-scored path gets consecutive slots, and
  accepting another path recomputes its KV as a chain (one extra run, on few steps).

int4 with blocks of 128 stays batch-variant (its kernel depends on the row count); blocks
of 32 (the default) do not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np

from edgespec.errors import UserError
from edgespec.tree import TokenTree
from exporters.onnx import EXPORT_HINT, FORMAT, MANIFEST, MODEL_FILE, REQUIRED_INPUTS
from runtimes.base import MemoryReport
from runtimes.reference_tokenizer import hf_tokenizer

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - exercised only without the onnx extra
    ort = None


def default_threads() -> int:
    """Physical cores: hyper-threads slow small matmuls down more than they help."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def export_on_the_fly(src: Path, export_dir: str | Path | None,
                      export: Callable[..., Path], prefix: str) -> tuple[Path, Path | None]:
    """``export(src, dir)`` into ``export_dir``, or into a new temporary directory.

    Returns the export and the temporary directory (None if ``export_dir`` was given),
    which the backend deletes when it closes; a failed export deletes it at once.
    """
    if export_dir is not None:
        return export(src, export_dir), None
    temp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return export(src, temp / "model"), temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


# execution providers that run on each device, in order of preference
DEVICE_PROVIDERS = {
    "GPU": ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
            "CoreMLExecutionProvider"),
    "NPU": ("QNNExecutionProvider", "NnapiExecutionProvider", "VitisAIExecutionProvider"),
    "CPU": ("CPUExecutionProvider",),
}


def provider_for(device: str, present: Sequence[str]) -> str:
    """The installed execution provider for ``device``; AUTO prefers GPU, then NPU, then CPU."""
    device = device.upper()
    wanted = [p for d in ("GPU", "NPU", "CPU") for p in DEVICE_PROVIDERS[d]] if device == "AUTO" \
        else DEVICE_PROVIDERS.get(device)
    if wanted is None:
        raise UserError(f"unknown device {device!r}; choose CPU, GPU, NPU or AUTO")
    for provider in wanted:
        if provider in present:
            return provider
    raise UserError(f"no ONNX Runtime execution provider for {device} here; present: "
                    f"{', '.join(present)}")


def _session(path: Path, threads: int, provider: str) -> ort.InferenceSession:
    """A latency-tuned session: one stream of kernels, all graph fusions on."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=[provider])
    except Exception as e:  # onnxruntime raises its own exception types
        raise UserError(f"onnxruntime cannot load {path}: {e}") from e
    missing = [n for n in REQUIRED_INPUTS if n not in {i.name for i in session.get_inputs()}]
    if missing:
        raise UserError(
            f"{path} lacks the inputs edgespec needs ({', '.join(missing)}): it was not exported "
            f"for tree verification; export one with `{EXPORT_HINT}`"
        )
    return session


class _Graph:
    """One session (full model or early exit) with the KV buffers bound in place."""

    def __init__(self, session: ort.InferenceSession, keys: list, values: list,
                 vocab_size: int) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.vocab_size = vocab_size
        self.n_layers = sum(1 for i in session.get_inputs() if i.name.startswith("past_key_"))
        for i, (k, v) in enumerate(zip(keys[: self.n_layers], values[: self.n_layers])):
            for kind, buffer in (("key", k), ("value", v)):
                self.binding.bind_ortvalue_input(f"past_{kind}_{i}", buffer)
                self.binding.bind_ortvalue_output(f"present_{kind}_{i}", buffer)
        # logits buffers per row count, reused: no allocation per step
        self._logits: dict[int, tuple[np.ndarray, ort.OrtValue]] = {}

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits ``[m, vocab]`` of the rows ``feeds['logits_rows']`` selects (a fresh copy)."""
        for name, array in feeds.items():
            self.binding.bind_cpu_input(name, array)
        m = len(feeds["logits_rows"])
        if m not in self._logits:
            array = np.empty((1, m, self.vocab_size), np.float32)
            self._logits[m] = array, ort.OrtValue.ortvalue_from_numpy(array)
        array, value = self._logits[m]
        self.binding.bind_ortvalue_output("logits", value)
        self.session.run_with_iobinding(self.binding)
        return array[0].copy()


def _mask(visible: np.ndarray, n_past: int, offset: int) -> np.ndarray:
    """Additive ``[1, 1, n, offset + n]``: the prefix, then ``visible`` over the new slots.

    Slots ``n_past .. offset - 1`` (a pending tree an early-exit draft runs after) are hidden.
    """
    n = visible.shape[0]
    mask = np.zeros((1, 1, n, offset + n), np.float32)
    mask[..., n_past:offset] = -np.inf
    mask[0, 0, :, offset:] = np.where(visible, np.float32(0), np.float32(-np.inf))
    return mask


class OnnxBackend:
    """The :class:`~runtimes.base.Backend` protocol on ONNX Runtime (in-place KV buffers)."""

    name = "onnx"

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        max_tree_nodes: int = 64,
        provider: str = "CPUExecutionProvider",
        prefill_chunk: int = 256,
        export_dir: str | Path | None = None,
        batch_invariant: bool = True,
        device: str | None = None,
    ) -> None:
        """Open an edgespec ONNX export (its directory or its ``model.onnx``).

        A GGUF file or HF folder is exported to float32 first, into ``export_dir`` (kept) or
        a temporary directory removed by :meth:`close`; ``edgespec export`` avoids redoing it.
        ``batch_invariant=False`` gives up bit-exact speculation for faster plain steps.
        ``device`` (CPU, GPU, NPU, AUTO) picks the execution provider instead of ``provider``.
        """
        if ort is None:
            raise UserError("the ONNX backend needs onnxruntime; install edgespec[onnx]")
        present = ort.get_available_providers()
        if device is not None:
            provider = provider_for(device, present)
        if provider not in present:
            raise UserError(f"execution provider {provider} is not available; present: "
                            f"{', '.join(present)}")
        self._temp: Path | None = None
        self.dir, model_file = self._resolve(Path(path), export_dir)
        self.threads = threads or default_threads()
        self.max_tree_nodes, self.prefill_chunk = max_tree_nodes, prefill_chunk
        self.batch_invariant = batch_invariant
        session = _session(model_file, self.threads, provider)
        meta = self._manifest()
        self.encoder, self.tokenizer = hf_tokenizer(self.dir, meta)
        self.vocab_size, self.n_layer = int(meta["vocab_size"]), int(meta["n_layer"])
        # GQA checks every slot (n_ctx + two trees of scratch) against its RoPE table
        self.n_ctx = min(n_ctx, int(meta["max_positions"]) - 2 * max_tree_nodes)
        self.n_past = 0
        self._pending: tuple[TokenTree, int, np.ndarray] | None = None  # tree, offset, slots
        self._alloc(int(meta["n_head_kv"]), int(meta["head_dim"]))
        self._main = _Graph(session, self._ov_k, self._ov_v, self.vocab_size)
        # early-exit sessions load their share of the weights again (~100 MB for SmolLM2's
        # first half in int8), so they are opened on first use only
        self._exit_files = {int(e): self.dir / f for e, f in meta.get("early_exit", {}).items()}
        self._exits: dict[int, _Graph] = {}
        self.exit_layers = sorted(self._exit_files)
        self._provider = provider

    # -- loading -------------------------------------------------------------------------

    def _resolve(self, path: Path, export_dir: str | Path | None) -> tuple[Path, Path]:
        """The export directory and its model file; exports a GGUF / HF folder on the fly."""
        if not path.exists():
            raise UserError(f"model not found: {path}")
        if path.is_file() and path.suffix.lower() == ".onnx":
            return path.parent, path
        if path.is_dir() and (path / MANIFEST).is_file():
            return path, path / MODEL_FILE
        from exporters.onnx import export_onnx

        out, self._temp = export_on_the_fly(path, export_dir, export_onnx, "edgespec-onnx-")
        return out, out / MODEL_FILE

    def _manifest(self) -> dict:
        """The exporter's sidecar: KV shape and special tokens the graph does not carry."""
        path = self.dir / MANIFEST
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is missing or unreadable ({e}); re-export the model with "
                            f"`{EXPORT_HINT}`") from e
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is not an edgespec ONNX export; use `{EXPORT_HINT}`")
        return meta

    def _alloc(self, n_kv: int, head_dim: int) -> None:
        """The KV buffers, once: n_ctx slots plus room for a tree and a draft after it."""
        self.capacity = self.n_ctx + 2 * self.max_tree_nodes
        shape = (1, n_kv, self.capacity, head_dim)
        self._k = [np.zeros(shape, np.float32) for _ in range(self.n_layer)]
        self._v = [np.zeros(shape, np.float32) for _ in range(self.n_layer)]
        self._ov_k = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._k]
        self._ov_v = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._v]
        self._row_bytes = 2 * self.n_layer * n_kv * head_dim * 4

    # -- text ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text`` (no BOS added: the caller decides from ``tokenizer.add_bos``)."""
        return self.encoder.encode(text, special=special)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return self.encoder.decode(ids)

    # -- evaluation ------------------------------------------------------------------------

    def _run(self, graph: _Graph, tokens: Sequence[int], depth: Sequence[int],
             visible: np.ndarray, offset: int, rows: np.ndarray) -> np.ndarray:
        """Evaluate ``tokens`` into slots ``offset..``; logits of ``rows``."""
        if len(tokens) == 1 and self.batch_invariant:  # see the module docstring
            tokens, depth = [tokens[0]] * 2, [depth[0], depth[0] + 1]
            visible = np.array([[True, False], [True, True]])
        feeds = {
            "input_ids": np.asarray([tokens], np.int64),
            "position_ids": self.n_past + np.asarray([depth], np.int64),
            "attn_mask": _mask(visible, self.n_past, offset),
            "logits_rows": rows.astype(np.int64),
        }
        return graph.run(feeds)

    def _check_room(self, tree: TokenTree, offset: int) -> None:
        if self.n_past + tree.max_depth + 1 > self.n_ctx:
            raise UserError(
                f"the context is full: {self.n_past} cached + {tree.max_depth + 1} new tokens "
                f"exceed n_ctx={self.n_ctx}; raise -c/--ctx-size"
            )
        if len(tree) > self.max_tree_nodes or offset + len(tree) > self.capacity:
            raise ValueError(f"a tree of {len(tree)} nodes exceeds max_tree_nodes="
                             f"{self.max_tree_nodes}")

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
        logits = self._run(self._main, [tree.tokens[i] for i in order],
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
            self._run(self._main, [tree.tokens[i] for i in path], range(len(path)), chain,
                      self.n_past, np.array([0]))
        elif not np.array_equal(src, dst):
            for buffer in self._k + self._v:
                buffer[0, :, dst] = buffer[0, :, src]
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
        graph = self._main if exit_layer == self.n_layer else self._exit_graph(exit_layer)
        tree = ids_or_tree
        if not isinstance(tree, TokenTree):
            tree = TokenTree.chain(ids_or_tree[0], ids_or_tree[1:])
        offset = self.n_past + (len(self._pending[0]) if self._pending else 0)
        self._check_room(tree, offset)
        return self._run(graph, tree.tokens, tree.depth, tree.ancestor_mask(), offset,
                         np.arange(len(tree)))

    def _exit_graph(self, exit_layer: int) -> _Graph:
        """The early-exit session after ``exit_layer`` blocks, opened on first use."""
        if exit_layer not in self._exit_files:
            raise ValueError(f"no early-exit graph after layer {exit_layer}; this export has "
                             f"{self.exit_layers or 'none'} (export with early_exit=E)")
        if exit_layer not in self._exits:
            session = _session(self._exit_files[exit_layer], self.threads, self._provider)
            self._exits[exit_layer] = _Graph(session, self._ov_k, self._ov_v, self.vocab_size)
        return self._exits[exit_layer]

    # -- resources ----------------------------------------------------------------------------

    def memory(self) -> MemoryReport:
        weights = sum(f.stat().st_size for f in self.dir.glob("*.onnx*"))
        used = self._row_bytes * self.n_past
        return MemoryReport(weights, used, self._row_bytes * self.capacity - used)

    def close(self) -> None:
        """Drop the sessions and buffers; delete an on-the-fly export."""
        self._main = None
        self._exits, self._k, self._v, self._ov_k, self._ov_v = {}, [], [], [], []
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
