"""The OpenVINO exporter: its IR computes what the numpy reference computes, in every quant.

Each export of the tiny random Llama is opened by the OpenVINO backend (f32 inference) and
compared with ``ReferenceBackend`` on the same prompt and token tree. Tolerances are
relative to the largest reference logit: fp32 is the same arithmetic in another order
(1e-4; measured 3e-7); fp16 rounds the matrices to half precision; int8 (per channel) and
int4 (groups of 32) are NNCF's data-free compression, embedding and LM head at int8 —
on these random Gaussian weights they measure ~1.1% and ~2.7%, the bounds leave ~2.5x
room. Wrong wiring (a transposed matrix, a lost RoPE) is ~100%.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from edgespec.errors import UserError  # noqa: E402
from edgespec.tree import TokenTree  # noqa: E402
from exporters.openvino import MANIFEST, export_openvino  # noqa: E402
from runtimes.openvino import OpenVinoBackend  # noqa: E402
from runtimes.reference import ReferenceBackend  # noqa: E402
from tests.test_reference_loading import export_hf_folder  # noqa: E402

PROMPT = "The lighthouse keeper climbed the stairs every evening to light the lamp."
REL_TOL = {"fp32": 1e-4, "fp16": 3e-3, "int8": 0.03, "int4": 0.08}
TREE_PARENTS = [-1, 0, 0, 2, 3, 1]


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path) -> ReferenceBackend:
    return ReferenceBackend(tiny_gguf, n_ctx=256)


@pytest.fixture(scope="module")
def exports(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every quant of the 2-layer tiny model; fp32 with an early exit after layer 1."""
    out = tmp_path_factory.mktemp("openvino-exports")
    return {q: export_openvino(tiny_gguf, out / q, quant=q, early_exit=1 if q == "fp32" else None)
            for q in REL_TOL}


def _prefill_and_tree(backend, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Prefill logits of the first 6 ids, then a branchy tree's logits after them."""
    backend.truncate(0)
    last = backend.prefill(ids[:6])
    tree = TokenTree(ids[6 : 6 + len(TREE_PARENTS)], TREE_PARENTS)
    return last, backend.verify(tree)


def _max_rel_error(path: Path, reference: ReferenceBackend) -> float:
    ids = reference.tokenize(PROMPT, special=False)
    want_last, want_tree = _prefill_and_tree(reference, ids)
    backend = OpenVinoBackend(path, n_ctx=256, threads=1)
    try:
        got_last, got_tree = _prefill_and_tree(backend, ids)
    finally:
        backend.close()
    scale = np.abs(want_tree).max()
    return max(np.abs(got_last - want_last).max(), np.abs(got_tree - want_tree).max()) / scale


@pytest.mark.parametrize("quant", list(REL_TOL))
def test_logits_match_the_reference_within_the_stated_tolerance(
    quant: str, exports: dict[str, Path], reference: ReferenceBackend
) -> None:
    error = _max_rel_error(exports[quant], reference)
    print(f"{quant}: max |logit error| / max |logit| = {error:.2e}")
    assert error <= REL_TOL[quant]


def test_early_exit_model_matches_the_reference_exit(
    exports: dict[str, Path], reference: ReferenceBackend
) -> None:
    ids = reference.tokenize(PROMPT, special=False)
    reference.truncate(0)
    reference.prefill(ids[:5])
    want = reference.draft_logits(ids[5:9], 1)
    assert not np.allclose(want, reference.draft_logits(ids[5:9], 2), atol=1e-2)
    backend = OpenVinoBackend(exports["fp32"], n_ctx=256, threads=1)
    try:
        backend.prefill(ids[:5])
        got = backend.draft_logits(ids[5:9], 1)
        assert backend.exit_layers == [1]
    finally:
        backend.close()
    assert np.abs(got - want).max() <= REL_TOL["fp32"] * np.abs(want).max()


def test_export_layout_and_sizes(exports: dict[str, Path]) -> None:
    meta = json.loads((exports["fp32"] / MANIFEST).read_text())
    assert meta["format"] == "edgespec-openvino-decoder"
    assert meta["n_layer"] == 2 and meta["n_head_kv"] == 2 and meta["head_dim"] == 16
    assert meta["eos_token_id"] == [2] and meta["early_exit"] == {"1": "exit1.xml"}
    assert {"openvino_model.xml", "openvino_model.bin", "exit1.xml", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in exports["fp32"].iterdir()}
    sizes = {q: (out / "openvino_model.bin").stat().st_size for q, out in exports.items()}
    # the two 49152 x 64 tables dominate: f32 → f16 → int8 (int4 keeps them at int8)
    assert sizes["int4"] <= sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_an_onnx_export_converts_to_the_same_model(
    tiny_gguf: Path, exports: dict[str, Path], reference: ReferenceBackend, tmp_path: Path
) -> None:
    """GGUF → ONNX (int8, dequantized on the way) → OpenVINO stays within int8's tolerance."""
    pytest.importorskip("onnxruntime")
    from exporters.onnx import export_onnx

    onnx_dir = export_onnx(tiny_gguf, tmp_path / "onnx", quant="int8")
    assert _max_rel_error(export_openvino(onnx_dir, tmp_path / "ov", quant="fp32"),
                          reference) <= REL_TOL["int8"]


def test_an_hf_folder_exports_like_its_gguf(
    reference: ReferenceBackend, exports: dict[str, Path], tmp_path: Path
) -> None:
    folder = export_hf_folder(reference, tmp_path / "hf", "F32")
    out = export_openvino(folder, tmp_path / "hf-ov", quant="fp32")
    ids = reference.tokenize(PROMPT, special=False)
    results = []
    for path in (out, exports["fp32"]):
        backend = OpenVinoBackend(path, n_ctx=64, threads=1)
        results.append(_prefill_and_tree(backend, ids)[1])
        assert backend.tokenize(PROMPT, special=False) == ids
        backend.close()
    np.testing.assert_allclose(results[0], results[1], atol=1e-4)


def test_an_existing_output_is_refused_unless_forced(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists.*--force"):
        export_openvino(tiny_gguf, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_openvino(tiny_gguf, out, force=True)
    assert (out / MANIFEST).is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_a_failed_export_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match="not a readable GGUF"):
        export_openvino(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quant": "int3"}, "unknown OpenVINO quantization 'int3'"),
        ({"early_exit": 2}, r"early exit must be after layer 1..1"),
        ({"group_size": 48}, "group size must be a power of two"),
        ({"quant": "int4", "group_size": 256}, "int4 groups of 256 do not divide"),
    ],
)
def test_bad_options_are_user_errors(
    tiny_gguf: Path, tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        export_openvino(tiny_gguf, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_sources_that_are_not_models_are_named(tmp_path: Path, exports: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="model not found"):
        export_openvino(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(UserError, match="no config.json"):
        export_openvino(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="'edgespec-openvino-decoder' export, not a source"):
        export_openvino(exports["fp32"], tmp_path / "out")
