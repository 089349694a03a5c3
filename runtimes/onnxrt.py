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

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgespec.errors import UserError
from runtimes.base import check_kv_type, default_threads
from runtimes.formats import MANIFEST, ONNX, Exporter
from runtimes.slots import SlotBackend, require_inputs

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - exercised only without the onnx extra
    ort = None


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
    require_inputs(path, {i.name for i in session.get_inputs()}, ONNX)
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


class OnnxBackend(SlotBackend):
    """The :class:`~runtimes.base.Backend` protocol on ONNX Runtime (in-place KV buffers)."""

    name, KIND, SUFFIX, SLOT_AXIS = "onnx", "ONNX", ".onnx", 2
    EXPORT, DIR_MARKER = ONNX, MANIFEST
    build = f"onnxruntime {ort.__version__}" if ort else "onnxruntime (missing)"

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        max_tree_nodes: int = 64,
        provider: str = "CPUExecutionProvider",
        prefill_chunk: int = 256,
        exporter: Exporter | None = None,
        batch_invariant: bool = True,
        lean_heap: bool = False,
        kv_type: str = "f32",
        device: str | None = None,
    ) -> None:
        """Open an edgespec ONNX export (its directory or its ``model.onnx``).

        A GGUF file or HF folder is exported first by ``exporter`` (edgespec's loader passes
        the float32 ONNX one), into a temporary directory :meth:`close` removes;
        ``edgespec export`` avoids redoing it.
        ``batch_invariant=False`` gives up bit-exact speculation for faster plain steps.
        ``lean_heap``: large buffers straight from the OS (:meth:`_opening`).
        ``device`` (CPU, GPU, NPU, AUTO) picks the execution provider instead of ``provider``.
        """
        if ort is None:
            raise UserError("the ONNX backend needs onnxruntime; install edgespec[onnx]")
        check_kv_type(kv_type, self)  # the graph's cache inputs are float32
        self.kv_type = kv_type
        present = ort.get_available_providers()
        if device is not None:
            provider = provider_for(device, present)
        if provider not in present:
            raise UserError(f"execution provider {provider} is not available; present: "
                            f"{', '.join(present)}")
        self.dir, model_file = self._resolve(Path(path), exporter)
        self.threads = threads or default_threads()
        self.max_tree_nodes, self.prefill_chunk = max_tree_nodes, prefill_chunk
        self.batch_invariant = batch_invariant
        self._provider = provider
        with self._opening(lean_heap):  # the session, tokenizer and tables
            session = _session(model_file, self.threads, provider)
            self._open_export(self._manifest(), n_ctx)
            self._main = _Graph(session, self._ov_k, self._ov_v, self.vocab_size)

    def _alloc(self, n_kv: int, head_dim: int) -> None:
        """The KV buffers, once: n_ctx slots plus room for a tree and a draft after it."""
        self.capacity = self._capacity(self.n_ctx, self.max_tree_nodes)
        shape = (1, n_kv, self.capacity, head_dim)
        self._k = [np.zeros(shape, np.float32) for _ in range(self.n_layer)]
        self._v = [np.zeros(shape, np.float32) for _ in range(self.n_layer)]
        self._ov_k = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._k]
        self._ov_v = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._v]
        self._row_bytes = 2 * self.n_layer * n_kv * head_dim * 4

    def _pad_call(self, tokens: Sequence[int], depth: Sequence[int], visible: np.ndarray,
                  offset: int) -> tuple[Sequence[int], Sequence[int], np.ndarray]:
        """A lone token becomes two rows for batch invariance (see the module docstring)."""
        if len(tokens) == 1 and self.batch_invariant:
            return [tokens[0]] * 2, [depth[0], depth[0] + 1], np.array([[True, False],
                                                                        [True, True]])
        return tokens, depth, visible

    def _evaluate(self, graph: _Graph, feeds: dict[str, np.ndarray], offset: int) -> np.ndarray:
        return graph.run(feeds)  # the buffers are bound in place: new rows land at offset..

    def _open_graph(self, path: Path) -> _Graph:
        """An early-exit session: it loads its share of the weights again (~100 MB for
        SmolLM2's first half in int8)."""
        return _Graph(_session(path, self.threads, self._provider), self._ov_k, self._ov_v,
                      self.vocab_size)

    def close(self) -> None:
        super().close()
        self._ov_k, self._ov_v = [], []
