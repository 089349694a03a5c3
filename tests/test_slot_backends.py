"""The ONNX Runtime and OpenVINO backends beyond the shared contract, one body for both.

The contract tests (tests/test_backend_contract.py) prove tree verification, commit and
rewind. These cover what the two export-based backends (runtimes.slots.SlotBackend) have
in common beyond it: what they open and refuse, the attention cases a plain decode never
reaches (a tree at an empty cache, an early-exit draft written after a pending tree) and
chunked prefill. What only one engine has is in tests/test_onnxrt_backend.py and
tests/test_openvino_backend.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgespec.errors import UserError
from edgespec.tree import TokenTree
from runtimes import backend_for, open_backend
from runtimes.reference import ReferenceBackend
from tests.slot_engines import PROMPT, SLOT_ENGINES, SlotEngine, engine_params

ATOL = 1e-4


@pytest.fixture(scope="module", params=engine_params())
def engine(request: pytest.FixtureRequest) -> SlotEngine:
    return SLOT_ENGINES[request.param]


@pytest.fixture(scope="module")
def exported(engine: SlotEngine, slot_export: Callable[..., Path]) -> Path:
    return slot_export(engine.name)


@pytest.fixture(scope="module")
def backend(engine: SlotEngine, exported: Path) -> Iterator[Any]:
    b = engine.open(exported, n_ctx=128, threads=1, max_tree_nodes=16)
    yield b
    b.close()


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path) -> ReferenceBackend:
    return ReferenceBackend(tiny_gguf, n_ctx=128)


@pytest.fixture
def ids(reference: ReferenceBackend) -> list[int]:
    return reference.tokenize(PROMPT, special=False)


def test_a_tree_on_an_empty_cache_uses_its_depth_positions(backend, reference, ids) -> None:
    # ONNX Runtime GQA's "first prompt" case: without query_seqlens it would take positions
    # 0, 1, 2…
    tree = TokenTree(ids[:5], [-1, 0, 0, 2, 1])
    for b in (backend, reference):
        b.truncate(0)
    np.testing.assert_allclose(backend.verify(tree), reference.verify(tree), atol=ATOL)


def test_chunked_prefill_equals_one_pass(engine: SlotEngine, exported: Path, reference,
                                         ids) -> None:
    chunked = engine.open(exported, n_ctx=64, threads=1, prefill_chunk=4)
    reference.truncate(0)
    np.testing.assert_allclose(chunked.prefill(ids), reference.prefill(ids), atol=ATOL)
    tree = TokenTree.chain(ids[0], ids[1:3])
    np.testing.assert_allclose(chunked.verify(tree), reference.verify(tree), atol=ATOL)
    chunked.close()


def test_a_draft_between_verify_and_commit_changes_nothing(backend, reference, ids) -> None:
    for b in (backend, reference):
        b.truncate(0)
        b.prefill(ids[:4])
        b.verify(TokenTree(ids[4:8], [-1, 0, 0, 2]))
    draft = backend.draft_logits(ids[8:11], 1)
    np.testing.assert_allclose(draft, reference.draft_logits(ids[8:11], 1), atol=ATOL)
    for b in (backend, reference):
        b.commit([0, 2, 3])
    after = TokenTree.root(ids[11])
    np.testing.assert_allclose(backend.verify(after), reference.verify(after), atol=ATOL)


def test_without_batch_invariance_an_off_best_path_is_moved_into_place(
        engine: SlotEngine, exported: Path, reference, ids) -> None:
    """``batch_invariant=False`` commits a path off the best-scored branch by moving its
    K/V rows down along the buffers' slot axis, not by recomputing them."""
    fast = engine.open(exported, n_ctx=64, threads=1, batch_invariant=False)
    tree = TokenTree(ids[4:8], [-1, 0, 0, 2], scores=[1.0, 0.9, 0.1, 0.1])
    assert tree.best_first()[:2] == [0, 1]  # so the path [0, 2, 3] leaves the best branch
    for b in (fast, reference):
        b.truncate(0)
        b.prefill(ids[:4])
        b.verify(tree)
        b.commit([0, 2, 3])
    after = TokenTree.root(ids[11])
    np.testing.assert_allclose(fast.verify(after), reference.verify(after), atol=ATOL)
    fast.close()


def test_limits_are_errors(backend, ids) -> None:
    backend.truncate(0)
    with pytest.raises(ValueError, match="max_tree_nodes=16"):
        backend.verify(TokenTree([ids[0]] * 17, [-1] + [0] * 16))
    with pytest.raises(UserError, match="context is full"):
        backend.prefill(ids * 20)
    with pytest.raises(ValueError, match=r"no early-exit graph after layer 3.*\[1\]"):
        backend.draft_logits(ids[:2], 3)


def test_model_files_and_export_directories_pick_their_backend(engine: SlotEngine,
                                                               exported: Path, ids,
                                                               tmp_path: Path) -> None:
    assert backend_for(exported / engine.model_file) == engine.name
    assert backend_for(exported) == engine.name
    with pytest.raises(UserError, match="not an edgespec export"):
        backend_for(tmp_path)
    for path in (exported / engine.model_file, exported):
        b = open_backend(path, n_ctx=32)
        assert b.name == engine.name and b.tokenize(PROMPT, special=False) == ids
        b.close()


def test_a_gguf_is_exported_on_the_fly_and_cleaned_up(engine: SlotEngine,
                                                      tiny_gguf: Path) -> None:
    with pytest.raises(UserError, match=f"not an edgespec {engine.kind} export; make one with"):
        engine.open(tiny_gguf, n_ctx=32, threads=1)  # runtimes never import exporters
    b = engine.open(tiny_gguf, n_ctx=32, threads=1, exporter=engine.export)
    where = b.dir
    assert (where / engine.model_file).is_file()
    b.close()
    assert not where.exists()


def _foreign_onnx(directory: Path) -> Path:
    """An ONNX graph that takes input_ids but none of the other inputs of an export."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, [1, "n"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])],
                              "foreign", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                                ir_version=10), directory / "foreign.onnx")
    return directory / "foreign.onnx"


def _foreign_openvino(directory: Path) -> Path:
    """An OpenVINO IR that takes input_ids but none of the other inputs of an export."""
    import openvino as ov
    import openvino.opset13 as op

    x = op.parameter([1, -1], np.int64, name="input_ids")
    ov.save_model(ov.Model([op.convert(x, ov.Type.f32)], [x], "foreign"),
                  directory / "foreign.xml")
    return directory / "foreign.xml"


FOREIGN_MODELS = {"onnx": _foreign_onnx, "openvino": _foreign_openvino}


def test_a_foreign_model_is_refused_with_the_export_command(engine: SlotEngine,
                                                            tmp_path: Path) -> None:
    foreign = FOREIGN_MODELS[engine.name](tmp_path)
    with pytest.raises(UserError, match=r"lacks the inputs.*position_ids, attn_mask.*"
                                        rf"edgespec export MODEL --to {engine.name} -o OUT"):
        engine.open(foreign)


def test_a_model_without_its_manifest_is_refused(engine: SlotEngine, exported: Path,
                                                 tmp_path: Path) -> None:
    for name in (engine.model_file, engine.weights_file):
        shutil.copy(exported / name, tmp_path / name)
    with pytest.raises(UserError, match=r"edgespec.json is missing.*edgespec export"):
        engine.open(tmp_path / engine.model_file)


def test_an_export_of_an_older_format_is_refused_with_the_export_command(
        engine: SlotEngine, exported: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    manifest = old / "edgespec.json"
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(meta | {"version": meta["version"] - 1}))
    with pytest.raises(UserError, match="older edgespec .*edgespec export"):
        engine.open(old)
