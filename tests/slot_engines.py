"""The two slot-buffer engines, ONNX Runtime and OpenVINO, described once for their tests.

Both run an edgespec export through ``runtimes.slots.SlotBackend``; what differs between
them is named in :data:`SLOT_ENGINES`: the backend class and exporter (imported on first
use, so a missing engine skips its parameter instead of breaking collection), the files
of an export, the tiny model's exports and their logit tolerances. The tests that are the
same on both take an engine parameter (tests/test_slot_backends.py,
tests/test_slot_exports.py); the engine files keep what only one engine has.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgespec.tree import TokenTree

PROMPT = "The lighthouse keeper climbed the stairs every evening to light the lamp."
TREE_PARENTS = [-1, 0, 0, 2, 3, 1]


@dataclass(frozen=True)
class SlotEngine:
    name: str  # the backend's name (runtimes.BACKENDS, `--to` of edgespec export)
    kind: str  # the engine's name in messages
    backend: str  # "module:Class"
    exporter: str  # "module:function"
    model_file: str  # an export's graph, opened by path ...
    weights_file: str  # ... and the weights it refers to
    exit_file: str  # the early-exit graph after layer 1
    needs: tuple[str, ...]  # modules the backend must find installed
    export_needs: tuple[str, ...]  # modules the exporter must find installed, all quants
    # the tiny model's exports: quant → exporter options; fp32 has an early exit after
    # layer 1 and is the one the backend tests open
    exports: dict[str, dict[str, Any]]
    # relative logit tolerance per quant (see tests/test_onnx_export.py and
    # tests/test_openvino_export.py for where the numbers come from)
    rel_tol: dict[str, float]

    def open(self, path: Path, **options: Any) -> Any:
        """The engine's backend on ``path`` (an export, its model file or a GGUF)."""
        return _attribute(self.backend)(path, **options)

    def export(self, src: Path, out: Path, **options: Any) -> Path:
        return _attribute(self.exporter)(src, out, **options)

    def param(self, *, exporting: bool = False) -> Any:
        """This engine as a pytest parameter, skipped where its modules are missing."""
        needs = self.export_needs if exporting else self.needs
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        return pytest.param(self.name, marks=pytest.mark.skipif(
            bool(missing), reason=f"{' and '.join(missing)} not installed"))


def _attribute(where: str) -> Any:
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


SLOT_ENGINES = {
    "onnx": SlotEngine(
        name="onnx", kind="ONNX", backend="runtimes.onnxrt:OnnxBackend",
        exporter="exporters.onnx:export_onnx", model_file="model.onnx",
        weights_file="model.onnx.data", exit_file="exit1.onnx",
        needs=("onnxruntime", "onnx"), export_needs=("onnxruntime", "onnx"),
        exports={"fp32": {"early_exit": 1}, "int8": {"quant": "int8"},
                 "int4": {"quant": "int4", "early_exit": 1}},
        rel_tol={"fp32": 1e-4, "int8": 0.03, "int4": 0.08},
    ),
    "openvino": SlotEngine(
        name="openvino", kind="OpenVINO", backend="runtimes.openvino:OpenVinoBackend",
        exporter="exporters.openvino:export_openvino", model_file="openvino_model.xml",
        weights_file="openvino_model.bin", exit_file="exit1.xml",
        needs=("openvino",), export_needs=("openvino", "nncf"),
        exports={"fp32": {"quant": "fp32", "early_exit": 1}, "fp16": {"quant": "fp16"},
                 "int8": {"quant": "int8"}, "int4": {"quant": "int4"}},
        rel_tol={"fp32": 1e-4, "fp16": 3e-3, "int8": 0.03, "int4": 0.08},
    ),
}


def engine_params(*, exporting: bool = False) -> list[Any]:
    """Every slot engine as a pytest parameter (see :meth:`SlotEngine.param`)."""
    return [engine.param(exporting=exporting) for engine in SLOT_ENGINES.values()]


def prefill_and_tree(backend: Any, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Prefill logits of the first 6 ids, then a branchy tree's logits after them."""
    backend.truncate(0)
    last = backend.prefill(ids[:6])
    tree = TokenTree(ids[6 : 6 + len(TREE_PARENTS)], TREE_PARENTS)
    return last, backend.verify(tree)


def max_rel_error(engine: SlotEngine, path: Path, reference: Any) -> float:
    """The largest logit error of the export at ``path`` against ``reference``, relative to
    the largest reference logit, over a prefill and a tree (:func:`prefill_and_tree`)."""
    ids = reference.tokenize(PROMPT, special=False)
    want_last, want_tree = prefill_and_tree(reference, ids)
    backend = engine.open(path, n_ctx=256, threads=1)
    try:
        got_last, got_tree = prefill_and_tree(backend, ids)
    finally:
        backend.close()
    scale = np.abs(want_tree).max()
    return max(np.abs(got_last - want_last).max(), np.abs(got_tree - want_tree).max()) / scale


def check_speculation_is_bit_exact(backend: Any, *, chain: bool) -> None:
    """Lone tokens (and, with ``chain``, a chain) and the best-scored branch of a tree give
    bit-identical logits, and so does the step after committing a branch that was not the
    best-scored one (its KV is recomputed as a chain). For a real model: SmolLM2.

    The best branch's nodes take consecutive slots, so attention sums them as sequential
    decoding does; placed after six sibling slots instead, the same path's logits move.
    """
    ids = backend.tokenize(PROMPT * 2, special=False)
    backend.prefill(ids[:12])
    sequential = []
    for t in ids[12:17]:
        sequential.append(backend.verify(TokenTree.root(t))[0])
        backend.commit([0])
    if chain:
        backend.truncate(12)
        assert np.array_equal(backend.verify(TokenTree.chain(ids[12], ids[13:17])),
                              np.stack(sequential))
    tokens = [ids[12], *range(100, 106), ids[13], 200, ids[14], 201, ids[15]]
    parents = [-1, 0, 0, 0, 0, 0, 0, 0, 7, 7, 9, 9]
    path = [0, 7, 9, 11]
    best, worst = [0.5] * 6 + [0.9, 0.5, 0.9, 0.5, 0.9], [0.9] * 6 + [0.1, 0.9, 0.1, 0.9, 0.1]
    backend.truncate(12)
    logits = backend.verify(TokenTree(tokens, parents, scores=[1.0, *best]))
    assert np.array_equal(logits[path], np.stack(sequential[:4]))
    backend.truncate(12)
    backend.verify(TokenTree(tokens, parents, scores=[1.0, *worst]))
    backend.commit(path)  # not the best-scored branch: recomputed as a chain
    after = backend.verify(TokenTree.root(ids[16]))[0]
    assert np.array_equal(after, sequential[4])
