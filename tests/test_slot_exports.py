"""The ONNX and OpenVINO exporters: their exports compute what the numpy reference computes.

Each export of the tiny random Llama (every quant of ``SLOT_ENGINES[engine].exports``) is
opened by its engine's backend and compared with ``ReferenceBackend`` on the same prompt
and token tree, within the tolerance tests/test_onnx_export.py and
tests/test_openvino_export.py explain; and both exporters refuse bad options and sources
the same way and leave nothing behind when they do. What only one exporter has (its
files, its sizes, its own options) is in those two files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgespec.errors import UserError
from runtimes.reference import ReferenceBackend
from tests.slot_engines import (
    PROMPT,
    SLOT_ENGINES,
    SlotEngine,
    engine_params,
    max_rel_error,
    prefill_and_tree,
)
from tests.test_reference_loading import export_hf_folder

MANIFEST = "edgespec.json"


def _cases(*, early_exit: bool = False) -> list:
    """(engine, quant) of every tiny export, or of those with an early exit, as parameters."""
    return [pytest.param(name, quant, marks=engine.param(exporting=True).marks,
                         id=f"{name}-{quant}")
            for name, engine in SLOT_ENGINES.items()
            for quant, options in engine.exports.items()
            if not early_exit or options.get("early_exit")]


@pytest.fixture(scope="module", params=engine_params(exporting=True))
def engine(request: pytest.FixtureRequest) -> SlotEngine:
    return SLOT_ENGINES[request.param]


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path) -> ReferenceBackend:
    return ReferenceBackend(tiny_gguf, n_ctx=256)


@pytest.mark.parametrize(("name", "quant"), _cases())
def test_logits_match_the_reference_within_the_stated_tolerance(
    name: str, quant: str, slot_export: Callable[..., Path], reference: ReferenceBackend
) -> None:
    engine = SLOT_ENGINES[name]
    error = max_rel_error(engine, slot_export(name, quant), reference)
    print(f"{name} {quant}: max |logit error| / max |logit| = {error:.2e}")
    assert error <= engine.rel_tol[quant]


@pytest.mark.parametrize(("name", "quant"), _cases(early_exit=True))
def test_the_early_exit_matches_the_reference_exit(
    name: str, quant: str, slot_export: Callable[..., Path], reference: ReferenceBackend
) -> None:
    engine = SLOT_ENGINES[name]
    ids = reference.tokenize(PROMPT, special=False)
    reference.truncate(0)
    reference.prefill(ids[:5])
    want = reference.draft_logits(ids[5:9], 1)
    assert not np.allclose(want, reference.draft_logits(ids[5:9], 2), atol=1e-2)
    backend = engine.open(slot_export(name, quant), n_ctx=256, threads=1)
    try:
        backend.prefill(ids[:5])
        got = backend.draft_logits(ids[5:9], 1)
        assert backend.exit_layers == [1]
    finally:
        backend.close()
    assert np.abs(got - want).max() <= engine.rel_tol[quant] * np.abs(want).max()


def test_an_hf_folder_exports_like_its_gguf(engine: SlotEngine, reference: ReferenceBackend,
                                            slot_export: Callable[..., Path],
                                            tmp_path: Path) -> None:
    folder = export_hf_folder(reference, tmp_path / "hf", "F32")
    out = engine.export(folder, tmp_path / f"hf-{engine.name}", quant="fp32")
    ids = reference.tokenize(PROMPT, special=False)
    results = []
    for path in (out, slot_export(engine.name, "fp32")):
        backend = engine.open(path, n_ctx=64, threads=1)
        results.append(prefill_and_tree(backend, ids)[1])
        assert backend.tokenize(PROMPT, special=False) == ids
        backend.close()
    np.testing.assert_allclose(results[0], results[1], atol=1e-4)


def test_an_existing_output_is_refused_unless_forced(engine: SlotEngine, tiny_gguf: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists.*--force"):
        engine.export(tiny_gguf, out)
    assert (out / "keep.txt").read_text() == "mine"
    engine.export(tiny_gguf, out, force=True)
    assert (out / MANIFEST).is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_a_failed_export_leaves_nothing(engine: SlotEngine, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match="not a readable GGUF"):
        engine.export(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


BAD_OPTIONS = {
    "onnx": [
        ({"quant": "int3"}, "unknown ONNX quantization 'int3'"),
        ({"early_exit": 2}, "early exit must be after layer 1..1"),
    ],
    "openvino": [
        ({"quant": "int3"}, "unknown OpenVINO quantization 'int3'"),
        ({"early_exit": 2}, r"early exit must be after layer 1..1"),
        ({"group_size": 48}, "group size must be a power of two"),
        ({"quant": "int4", "group_size": 256}, "int4 groups of 256 do not divide"),
    ],
}


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [pytest.param(name, kwargs, message, marks=SLOT_ENGINES[name].param(exporting=True).marks)
     for name, cases in BAD_OPTIONS.items() for kwargs, message in cases],
)
def test_bad_options_are_user_errors(
    name: str, kwargs: dict, message: str, tiny_gguf: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=message):
        SLOT_ENGINES[name].export(tiny_gguf, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_sources_that_are_not_models_are_named(engine: SlotEngine, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model not found"):
        engine.export(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(UserError, match="no config.json"):
        engine.export(tmp_path, tmp_path / "out")
