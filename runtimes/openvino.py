"""Backend on OpenVINO, running edgespec's tree-capable decoder IR (exporters/openvino_graph.py).

The KV cache is numpy: one ``[2, layers, n_kv, capacity, head_dim]`` array, each layer's
and kind's slab bound to the compiled model once, whole, as its ``past_*`` input (an
``ov.Tensor`` sharing the array's memory). A call passes the slots of its rows as
``kv_slots``; the graph slices the first W slots, scatters the new rows in, attends, and
returns the rows as ``new_kv``, which lands in the array in one copy. (Inside the graph
that slice is a copy of the window per layer and kind: O(W), growing with the context.)

Slots and positions are decoupled exactly as in runtimes/onnxrt.py: a tree is verified
at slot ``n_past`` (best-scored path in consecutive slots), its RoPE positions are
``n_past + depth``, ``attn_mask`` says which slots each node sees, and :meth:`commit`
keeps the best path by moving ``n_past``.

Exactness (``batch_invariant``, on by default), measured on SmolLM2 (int8, int4 and fp16)
with OpenVINO 2026.4's CPU plugin: a row's logits do not depend on how many rows the call
has — single steps and chains of 2, 5 and 16 agree bit for bit at every cached length from
1 to 299 — as long as its keys are summed in the same blocks. Attention is blocked: a row's
sum over the keys is ordered differently when the call's key length (cached + new rows)
crosses a multiple of 16 between a tree and the single steps that would have produced the
same tokens (measured: max |Δlogit| 0.4–1.2 at cached lengths ≡ 9..11 mod 16 for a 4-token
chain). So every call's window (the mask's width) is widened to a multiple of
:data:`KV_BLOCK` slots, the slots after its rows masked (they add exact zeros): the keys
fill whole blocks without evaluating padding rows, and a key's place in the sum is its
slot whatever the call. An accepted path that is not the best-scored one is recomputed as
a chain, since its rows were summed with gaps.
``batch_invariant=False`` skips the key padding and gives up exactness. (Calls of 1–3 rows
used to be padded to 4 as well; with the key padding that is not needed, and plain steps are
~2.6 ms faster without it. The profiler still checks exactness on every engine's first
speculative use and caps trees at the largest size it verified bit-exactly.)

Two compilations of the model. The CPU plugin re-prepares every node when a call's row
count differs from the previous call's: ~5 ms of a ~12 ms single-token step on SmolLM2 int8
(measured: 1-token calls alternating with 8-token ones cost 17 and 21 ms; in runs of one
size, 12 and 16 ms). A speculative loop alternates plain steps and trees all the time, so
trees run on a second compiled copy of the model, made on first use: single-token steps
stay on the first, which changes shape once per prompt (its prefill). Trees are padded to
:data:`TREE_BUCKET` rows (16, 32… above that; the extra rows see only themselves), so the
second seldom changes shape either: a tree of up to 8 costs ~1.3× a single step whatever
came before it, instead of 1.1-1.5× plus the 5 ms whenever the size changed. Speculative
decoding on the dev prompts (bench, 3 repetitions): 1.67× the backend's plain decoding with
one compiled model, 1.83× with two, 1.90× with padded trees. How much more 8 rows cost
depends on the cores the host really gives: 1.24-1.29× one row with both of this machine's
2 cores free, 1.49-1.56× in stretches when they are contended, which is what 8 rows cost
with one thread (1.55×): 8 rows are compute-bound, one row is memory-bound, so losing a core
slows one row by ~13% and 8 rows by ~40% (SmolLM2 int8, 300 cached tokens, interleaved in one
process; OpenVINO's per-node counters are no guide here: their sums miss up to 4 ms of an
8-row call in some runs and exceed the wall time in others). The copy is not cheap: once it
has run, the process holds ~330 MB more on SmolLM2 int8 (the plugin's repacked weights and
buffers; bench peak RSS 566 → 888 MiB), of which :meth:`memory` counts the weight file
again. Plain decoding never makes it, and ``tree_graph=False`` keeps one compiled model.

KV precision: ``f32`` buffers, or ``f16`` (half the memory; OpenVINO converts at the
graph's edge). f16 is not exact: a tree attends to its own rows in f32, where plain
decoding reads them back rounded, so a memory plan never chooses it. OpenVINO's own
``KV_CACHE_PRECISION`` (u8, grouped) applies to caches that live *inside* a stateful
model; this cache lives in the runtime's buffers, so u8 is not offered.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgespec.errors import UserError
from runtimes.base import default_threads
from runtimes.formats import OPENVINO, Exporter
from runtimes.slots import SlotBackend, require_inputs

try:
    import openvino as ov
except ImportError:  # pragma: no cover - exercised only without the openvino extra
    ov = None

KV_PRECISIONS = {"f32": np.float32, "f16": np.float16}
KV_BLOCK = 16  # every call attends over a multiple of this many slots (module docstring)
TREE_BUCKET = 8  # trees are padded to 8, 16, 32… rows (module docstring)


def _read(core: ov.Core, path: Path, kv_type: str) -> ov.Model:
    """The IR with its K/V ports in the buffers' dtype; refuses a graph not made for trees."""
    try:
        model = core.read_model(path)
    except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
        raise UserError(f"OpenVINO cannot read {path}: {e}") from e
    require_inputs(path, {name for port in model.inputs for name in port.get_names()}, OPENVINO)
    if kv_type == "f32":
        return model
    ppp = ov.preprocess.PrePostProcessor(model)
    for port in model.inputs:
        if port.get_any_name().startswith("past_"):
            ppp.input(port.get_any_name()).tensor().set_element_type(ov.Type.f16)
    for port in model.outputs:
        if port.get_any_name() == "new_kv":
            ppp.output(port.get_any_name()).tensor().set_element_type(ov.Type.f16)
    return ppp.build()


def _whole_blocks(slots: int) -> int:
    """``slots`` rounded up to a multiple of :data:`KV_BLOCK`."""
    return -(-slots // KV_BLOCK) * KV_BLOCK


def _lazy_zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Zeros in 4 KiB pages mapped on first write. numpy asks the kernel for huge pages on
    arrays over 4 MiB, and then writing each layer's first slots maps 2 MiB per layer and
    kind: the whole 4096-slot cache of SmolLM2 (~185 MB) resident after one prompt."""
    pages = mmap.mmap(-1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # where huge pages are on by default
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(pages, dtype).reshape(shape)


class _Graph:
    """One compiled model (full or early exit) and its infer request, fed from the buffers.

    The ``past_*`` inputs are bound to the whole cache once, and ``new_kv`` to a scratch
    array until the row count changes: binding all 60 K/V tensors of SmolLM2 on every call
    cost ~0.7 ms of a ~12 ms step.
    """

    def __init__(self, compiled: ov.CompiledModel) -> None:
        self.request = compiled.create_infer_request()
        self.inputs = {p.get_any_name(): i for i, p in enumerate(compiled.inputs)}
        self.outputs = {p.get_any_name(): i for i, p in enumerate(compiled.outputs)}
        self.n_layers = sum(1 for name in self.inputs if name.startswith("past_key_"))
        self._bound = False  # the past_* inputs: bound to the whole cache once
        self._rows = np.empty((2, self.n_layers, 0, 0))  # scratch new_kv is bound to

    def run(self, feeds: dict[str, np.ndarray], kv: np.ndarray, offset: int) -> np.ndarray:
        """Logits ``[m, vocab]`` (a copy); K/V of the new rows land in slots ``offset..``
        of ``kv`` ``[2, layers, n_kv, capacity, head_dim]``."""
        n = feeds["input_ids"].shape[1]
        request = self.request
        feeds = feeds | {"kv_slots": np.arange(offset, offset + n, dtype=np.int64)}
        for name, array in feeds.items():
            request.set_input_tensor(self.inputs[name], ov.Tensor(array))
        if not self._bound:
            for i in range(self.n_layers):
                for j, kind in enumerate(("key", "value")):
                    cache = ov.Tensor(kv[j, i : i + 1], shared_memory=True)
                    request.set_input_tensor(self.inputs[f"past_{kind}_{i}"], cache)
            self._bound = True
        if self._rows.shape[3] != n:
            n_kv, head_dim = kv.shape[2], kv.shape[4]
            self._rows = np.empty((2, self.n_layers, n_kv, n, head_dim), kv.dtype)
            request.set_output_tensor(self.outputs["new_kv"],
                                      ov.Tensor(self._rows, shared_memory=True))
        request.infer()
        kv[:, : self.n_layers, :, offset : offset + n] = self._rows
        return request.get_output_tensor(self.outputs["logits"]).data[0].copy()


VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI")  # OpenVINO's plugins that pick or split devices


def _check_device(device: str, present: Sequence[str]) -> list[str]:
    """The physical devices present; refuses a device, or a virtual device's target, that
    is not among them (``AUTO`` alone may choose any)."""
    physical = sorted({d.split(".")[0] for d in present})
    kind, _, targets = device.partition(":")
    wanted = [t for t in targets.split(",") if t] if kind in VIRTUAL_DEVICES else [device]
    if kind in ("HETERO", "MULTI") and not wanted:
        raise UserError(f"OpenVINO's {kind} needs its devices, e.g. --device {kind}:GPU,CPU")
    missing = [w for w in wanted if w.split(".")[0] not in physical]
    if missing:
        raise UserError(f"OpenVINO device {', '.join(missing)} is not available; present: "
                        f"{', '.join(present)} (or AUTO, HETERO:…, MULTI:…)")
    return physical


def _device_config(device: str, physical: list[str], threads: int,
                   precision: str | None) -> dict:
    """Thread count for the CPU and the precision for every device. A virtual device takes
    them per device (DEVICE_PROPERTIES): f32 on whichever device it picks keeps exactness."""
    def settings(name: str) -> dict:
        return ({"INFERENCE_NUM_THREADS": threads} if name == "CPU" else {}) | (
            {"INFERENCE_PRECISION_HINT": precision} if precision is not None else {})

    if device.partition(":")[0] in VIRTUAL_DEVICES:
        return {"DEVICE_PROPERTIES": {name: settings(name) for name in physical}}
    return settings(device.split(".")[0])


class OpenVinoBackend(SlotBackend):
    """The :class:`~runtimes.base.Backend` protocol on OpenVINO (KV in shared numpy buffers)."""

    name, KIND, SUFFIX, SLOT_AXIS = "openvino", "OpenVINO", ".xml", 2
    EXPORT, DIR_MARKER = OPENVINO, OPENVINO.model_file
    build = f"openvino {ov.get_version()}" if ov else "openvino (missing)"

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        device: str = "CPU",
        kv_type: str = "f32",
        precision: str | None = "f32",
        max_tree_nodes: int = 64,
        prefill_chunk: int = 256,
        exporter: Exporter | None = None,
        batch_invariant: bool = True,
        lean_heap: bool = False,
        tree_graph: bool = True,
        properties: dict | None = None,
    ) -> None:
        """Open an edgespec OpenVINO export (its directory or its ``openvino_model.xml``).

        A GGUF file, HF folder or edgespec ONNX export is exported first by ``exporter``
        (edgespec's loader passes the fp16 OpenVINO one), into a temporary directory
        :meth:`close` removes.
        ``precision`` is OpenVINO's INFERENCE_PRECISION_HINT (``f32`` for exact results,
        None for the device's default, e.g. bf16); ``batch_invariant=False`` gives up bit-exact
        speculation (no padding; an accepted non-best branch's rows are moved, not
        recomputed). ``tree_graph=False`` verifies trees on the single-token model instead
        of a second compiled copy (less memory, slower speculation: module docstring).
        ``kv_type="f16"`` halves the KV buffers but is not exact (module docstring).
        ``properties`` go to ``compile_model`` on top of the defaults. ``lean_heap``: large
        buffers straight from the OS (:meth:`_opening`).
        """
        if ov is None:
            raise UserError("the OpenVINO backend needs openvino; install edgespec[openvino]")
        if kv_type not in KV_PRECISIONS:
            raise UserError(f"unknown KV precision {kv_type!r}; choose one of "
                            f"{', '.join(KV_PRECISIONS)}")
        self._core = ov.Core()
        device = device.upper()
        present = _check_device(device, self._core.available_devices)
        self.dir, self._model_file = self._resolve(Path(path), exporter)
        self.threads = threads or default_threads()
        self._config = {"PERFORMANCE_HINT": "LATENCY"} | _device_config(
            device, present, self.threads, precision) | (properties or {})
        self.device, self.kv_type = device, kv_type
        self.batch_invariant = batch_invariant
        self.max_tree_nodes, self.prefill_chunk = max_tree_nodes, prefill_chunk
        self._tree_graph = tree_graph
        self._trees: _Graph | None = None  # the copy trees run on (module docstring)
        with self._opening(lean_heap):  # the compiled model and tokenizer
            self._main = self._open_graph(self._model_file)  # checks the graph's inputs first
            self._open_export(self._manifest(), n_ctx)

    def _graph_for(self, rows: int) -> _Graph:
        """Trees go to a second compilation of the model, made on first use (module
        docstring: a call whose row count differs from the last one costs ~5 ms)."""
        if rows == 1 or not self._tree_graph:
            return self._main
        if self._trees is None:
            self._trees = self._measured(lambda: self._open_graph(self._model_file))
        return self._trees

    def _pad_call(self, tokens: Sequence[int], depth: Sequence[int], visible: np.ndarray,
                  offset: int) -> tuple[Sequence[int], Sequence[int], np.ndarray]:
        """A tree of 2..max_tree_nodes rows is padded to a whole bucket, so the tree graph
        seldom changes shape (module docstring); the extra rows see only themselves."""
        n = len(tokens)
        rows = min(self.max_tree_nodes, max(TREE_BUCKET, 1 << (n - 1).bit_length()))
        if n == 1 or n >= rows:
            return tokens, depth, visible
        padded = np.eye(rows, dtype=bool)
        padded[:n, :n] = visible
        extra = rows - n
        return (list(tokens) + [tokens[-1]] * extra, list(depth) + [depth[-1]] * extra, padded)

    def _open_graph(self, path: Path) -> _Graph:
        model = _read(self._core, path, self.kv_type)
        return _Graph(self._core.compile_model(model, self.device, self._config))

    def _alloc(self, n_kv: int, head_dim: int) -> None:
        """The KV buffers, once: n_ctx slots plus room for a tree and a draft after it."""
        self.capacity = self._capacity(self.n_ctx, self.max_tree_nodes)
        shape = (2, self.n_layer, n_kv, self.capacity, head_dim)
        dtype = KV_PRECISIONS[self.kv_type]
        self._kv = _lazy_zeros(shape, dtype)  # one array: a call's new rows land in one copy
        self._k = [self._kv[0, i : i + 1] for i in range(self.n_layer)]
        self._v = [self._kv[1, i : i + 1] for i in range(self.n_layer)]
        self._row_bytes = 2 * self.n_layer * n_kv * head_dim * np.dtype(dtype).itemsize

    def _capacity(self, n_ctx: int, max_tree_nodes: int) -> int:
        """Whole KV_BLOCKs: a call's window, widened to a block edge, always fits."""
        return _whole_blocks(super()._capacity(n_ctx, max_tree_nodes))

    def _key_slots(self, offset: int, rows: int) -> int:
        """The call's keys rounded up to whole ``KV_BLOCK`` blocks (module docstring)."""
        if not self.batch_invariant:
            return offset + rows
        return _whole_blocks(offset + rows)

    def _evaluate(self, graph: _Graph, feeds: dict[str, np.ndarray], offset: int) -> np.ndarray:
        return graph.run(feeds, self._kv, offset)

    def close(self) -> None:
        self._trees = None
        super().close()
