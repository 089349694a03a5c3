"""ReferenceBackend: a pure-numpy Llama forward pass behind the Backend protocol.

It is the oracle that proves speculation changes nothing, and the fallback where no
native engine is installed — not a speed path. Its one promise beyond correctness is
*batch invariance* (on by default): every token is computed by the same sequence of
single-row numpy operations whether it arrives in a prefill, alone, or as one node of a
speculative tree. Floating-point results depend on reduction order, so only this makes
"speculative greedy output == plain greedy output" hold bit for bit instead of "almost".

KV layout: per layer, ``[n_kv, capacity, head_dim]`` arrays hold the committed context.
A verified tree's KV lives in separate provisional arrays until :meth:`commit` copies the
accepted path's rows in, so rejected nodes never touch (or grow) the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

import gguf
import numpy as np

from edgespec.errors import UserError
from edgespec.tree import TokenTree
from runtimes import reference_ops as ops
from runtimes.base import MemoryReport, Sizing, TokenizerInfo, check_kv_type, require_cpu
from runtimes.ggufinfo import read_gguf
from runtimes.reference_tokenizer import ByteLevelTokenizer, gguf_tokenizer, hf_tokenizer
from runtimes.weights import (
    DEFAULT_BUDGET_BYTES,
    LlamaWeights,
    hf_config,
    load_gguf,
    load_hf_folder,
)


@dataclass
class _TreeKV:
    """Provisional keys/values of one evaluation: per layer ``[n_kv, n_nodes, head_dim]``."""

    tree: TokenTree
    k: list[np.ndarray]
    v: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)


def _blas_threads(threads: int | None) -> AbstractContextManager:
    """Cap numpy's BLAS threads for one call, if asked and threadpoolctl is installed."""
    if threads is None:
        return nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(threads, user_api="blas")


def _load(path: Path, budget_bytes: int) -> tuple[LlamaWeights, ByteLevelTokenizer, TokenizerInfo]:
    """Weights and tokenizer from a GGUF file or a Hugging Face folder."""
    if path.is_dir():
        _, raw = hf_config(path)
        return (load_hf_folder(path, budget_bytes), *hf_tokenizer(path, raw))
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable GGUF file ({e})") from e
    return (load_gguf(reader, budget_bytes, path.name), *gguf_tokenizer(reader))


class ReferenceBackend:
    """Float32 numpy Llama with tree verification, shared-cache early exit and rewind."""

    name = "reference"
    build = f"numpy {np.__version__}"
    budget_options: ClassVar[dict] = {}  # no budget: it has no estimate
    kv_types: ClassVar[tuple[str, ...]] = ("f32",)
    kv_type = "f32"
    prefill_chunk = 256  # numpy is batch-invariant here: the size only bounds a call's memory
    max_tree_nodes = 64

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        batch_invariant: bool = True,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        kv_type: str = "f32",
        device: str | None = None,
        max_tree_nodes: int = 64,
        prefill_chunk: int = 256,
    ) -> None:
        """Load a GGUF file or HF folder, refusing it if its float32 weights exceed the budget.

        ``threads`` caps numpy's BLAS pool during each forward pass (through threadpoolctl
        when installed): on a busy 2-core device an uncapped pool can make a step 10× slower.
        """
        require_cpu(device, "reference")
        check_kv_type(kv_type, self)
        path = Path(model_path)
        if not path.exists():
            raise UserError(f"model not found: {path}")
        weights, encoder, info = _load(path, budget_bytes)
        self._setup(weights, encoder, info, n_ctx, batch_invariant)
        self.threads = threads
        self.max_tree_nodes, self.prefill_chunk = max_tree_nodes, prefill_chunk

    @classmethod
    def from_weights(
        cls,
        weights: LlamaWeights,
        encoder: ByteLevelTokenizer,
        info: TokenizerInfo,
        *,
        n_ctx: int = 4096,
        batch_invariant: bool = True,
    ) -> ReferenceBackend:
        """A backend over weights already in memory (e.g. a model cut to its first layers)."""
        backend = cls.__new__(cls)
        backend._setup(weights, encoder, info, n_ctx, batch_invariant)
        backend.threads = None
        return backend

    def _setup(
        self,
        weights: LlamaWeights,
        encoder: ByteLevelTokenizer,
        info: TokenizerInfo,
        n_ctx: int,
        batch_invariant: bool,
    ) -> None:
        self.weights, self.encoder, self.tokenizer = weights, encoder, info
        cfg = self.cfg = weights.config
        self.batch_invariant = batch_invariant
        self.vocab_size = weights.lm_head.shape[0]
        self.n_ctx = n_ctx
        self.n_past = 0
        empty = np.zeros((cfg.n_head_kv, 0, cfg.head_dim), np.float32)
        self._k = [empty.copy() for _ in range(cfg.n_layer)]
        self._v = [empty.copy() for _ in range(cfg.n_layer)]
        self._pending: _TreeKV | None = None

    # --- Backend protocol --------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text`` (no BOS added: the caller decides from ``tokenizer.add_bos``)."""
        return self.encoder.encode(text, special=special)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return self.encoder.decode(ids)

    def set_threads(self, threads: int) -> bool:
        self.threads = threads  # the BLAS pool is capped per call
        return True

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` to the cache; the logits after the last one."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._check_room(len(ids))
        tree = TokenTree.chain(ids[0], ids[1:])
        logits, kv = self._evaluate(tree, self.cfg.n_layer, rows=[len(ids) - 1])
        self._pending = kv
        self.commit(range(len(ids)))
        return logits[0]

    def verify(self, tree: TokenTree) -> np.ndarray:
        """Logits ``[n_nodes, vocab]``; node ``i`` sees the cache and its ancestors only."""
        if len(tree) > self.max_tree_nodes:
            raise ValueError(f"tree of {len(tree)} nodes exceeds {self.max_tree_nodes} nodes")
        self._check_room(tree.max_depth + 1)
        logits, self._pending = self._evaluate(tree, self.cfg.n_layer, rows=range(len(tree)))
        return logits

    def commit(self, path: Sequence[int]) -> None:
        """Copy the KV rows of root path ``path`` of the last evaluation into the cache."""
        pending, path = self._pending, list(path)
        if pending is None:
            raise ValueError("commit without a preceding verify")
        if not path or path[0] != 0 or any(pending.tree.parents[b] != a for a, b in pairwise(path)):
            raise ValueError(f"{path} is not a root path of the verified tree")
        end = self.n_past + len(path)
        self._reserve(end)
        for layer in range(self.cfg.n_layer):
            self._k[layer][:, self.n_past : end] = pending.k[layer][:, path]
            self._v[layer][:, self.n_past : end] = pending.v[layer][:, path]
        self.n_past, self._pending = end, None

    def truncate(self, n_past: int) -> None:
        """Forget positions ``n_past`` and later (the rows stay allocated for reuse)."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot truncate to {n_past}: the cache holds {self.n_past}")
        self.n_past, self._pending = n_past, None

    def memory(self) -> MemoryReport:
        pending = self._pending.nbytes if self._pending is not None else 0
        return MemoryReport(self.weights.nbytes, sum(a.nbytes for a in self._k + self._v),
                            pending)

    @classmethod
    def estimate_memory(cls, path: str | Path, sizings: Sequence[Sizing],
                        limit: int | None = None) -> list[MemoryReport]:
        """Not planned: the reference is the test oracle, its cache grows as it fills."""
        raise UserError("memory budgets are planned for the llamacpp, onnx and openvino "
                        "backends; the reference backend has none (use --backend llamacpp)")

    @classmethod
    def model_vocab_size(cls, path: str | Path) -> int:
        return len(read_gguf(path).tokens)

    def close(self) -> None:
        """Drop the arrays; numpy frees them when the last reference goes."""
        self._k, self._v, self._pending = [], [], None

    # --- early exit ----------------------------------------------------------------------

    @property
    def exit_layers(self) -> range:
        """Any layer but the last: the reference computes the exit from its own weights."""
        return range(1, self.cfg.n_layer)

    def draft_logits(self, ids_or_tree: Sequence[int] | TokenTree, exit_layer: int) -> np.ndarray:
        """Logits ``[n, vocab]`` of a draft that exits after layer ``exit_layer``.

        The ids (a chain) or tree follow the cached context; layers below the exit read the
        cache the full model wrote — their KV is exactly what they would compute — and
        the hidden state goes through the shared final norm and LM head. Nothing is kept:
        the cache, ``n_past`` and a pending verification are left as they were.
        """
        if not 1 <= exit_layer <= self.cfg.n_layer:
            raise ValueError(f"exit_layer must be in 1..{self.cfg.n_layer}, got {exit_layer}")
        tree = ids_or_tree
        if not isinstance(tree, TokenTree):
            tree = TokenTree.chain(ids_or_tree[0], ids_or_tree[1:])
        self._check_room(tree.max_depth + 1)
        logits, _ = self._evaluate(tree, exit_layer, rows=range(len(tree)))
        return logits

    # --- the forward pass -------------------------------------------------------------------

    def _evaluate(
        self, tree: TokenTree, n_layers: int, rows: Sequence[int]
    ) -> tuple[np.ndarray, _TreeKV]:
        """Run ``tree`` through the first ``n_layers`` blocks; logits of ``rows`` + tree KV."""
        with _blas_threads(self.threads):
            return self._evaluate_rows(tree, n_layers, rows)

    def _evaluate_rows(
        self, tree: TokenTree, n_layers: int, rows: Sequence[int]
    ) -> tuple[np.ndarray, _TreeKV]:
        cfg, n = self.cfg, len(tree)
        kv = _TreeKV(
            tree,
            [np.zeros((cfg.n_head_kv, n, cfg.head_dim), np.float32) for _ in range(n_layers)],
            [np.zeros((cfg.n_head_kv, n, cfg.head_dim), np.float32) for _ in range(n_layers)],
        )
        positions = self.n_past + np.asarray(tree.depth, dtype=np.int64)
        if self.batch_invariant:
            hidden = [self._rows(tree, [i], positions, kv, None)[0] for i in range(n)]
            logits = np.stack([self._head(hidden[r][None])[0] for r in rows])
        else:
            hidden = self._rows(tree, list(range(n)), positions, kv, tree.ancestor_mask())
            logits = self._head(hidden[list(rows)])
        return logits, kv

    def _rows(
        self,
        tree: TokenTree,
        nodes: list[int],
        positions: np.ndarray,
        kv: _TreeKV,
        mask: np.ndarray | None,
    ) -> np.ndarray:
        """Hidden states of ``nodes`` after ``len(kv.k)`` blocks, writing their KV into ``kv``.

        With ``mask`` None, ``nodes`` is one node and it attends to the cache plus its
        root path, gathered into a fresh array exactly as a lone decoding step gathers
        cache plus itself; otherwise every node attends through ``mask`` to all nodes.
        """
        cfg = self.cfg
        seen = tree.path_to(nodes[0]) if mask is None else list(range(len(tree)))
        full_mask = None
        if mask is not None:
            full_mask = np.concatenate([np.ones((len(nodes), self.n_past), bool), mask], axis=1)
        cos, sin = ops.rope_angles(cfg, positions[nodes], self.weights.rope_freq_factors)
        x = self.weights.embed[[tree.tokens[i] for i in nodes]]
        blocks = zip(self.weights.layers[: len(kv.k)], kv.k, kv.v, strict=True)
        for layer, (w, tk, tv) in enumerate(blocks):
            q, k, v = ops.project_qkv(w, cfg, x, cos, sin)
            tk[:, nodes], tv[:, nodes] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
            keys = np.concatenate([self._k[layer][:, : self.n_past], tk[:, seen]], axis=1)
            values = np.concatenate([self._v[layer][:, : self.n_past], tv[:, seen]], axis=1)
            x = ops.finish_block(w, cfg, x, ops.attention(q, keys, values, full_mask))
        return x

    def _head(self, x: np.ndarray) -> np.ndarray:
        """Final RMSNorm and LM head (shared by the full model and every early exit)."""
        return ops.rms_norm(x, self.weights.out_norm, self.cfg.rms_eps) @ self.weights.lm_head.T

    # --- cache bookkeeping --------------------------------------------------------------------

    def _check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx:
            raise UserError(
                f"the context is full: {self.n_past} cached + {n_new} new tokens exceed "
                f"n_ctx={self.n_ctx}; raise -c/--ctx-size"
            )

    def _reserve(self, n: int) -> None:
        """Grow the cache arrays to hold ``n`` positions (doubling, so growth is amortised)."""
        capacity = self._k[0].shape[1] if self._k else 0
        if n <= capacity:
            return
        new = min(max(n, 2 * capacity, 64), self.n_ctx)
        for arrays in (self._k, self._v):
            for layer, old in enumerate(arrays):
                grown = np.zeros((old.shape[0], new, old.shape[2]), np.float32)
                grown[:, :capacity] = old
                arrays[layer] = grown
