"""The ONNX exporter: its graphs compute what the numpy reference computes, in every quant.

Each export of the tiny random Llama is opened by the ONNX backend and compared with
``ReferenceBackend`` on the same prompt and token tree. Tolerances are relative to the
largest reference logit: fp32 is the same arithmetic in another order (1e-4, measured
3e-7). int8 and int4 quantize the blocks' weights to 8/4 bits and the embedding and LM
head to 8 bits (blocks of 32, int8 activations); on these random Gaussian weights they
measure 1.2% and 2.9%, and the bounds below leave about 2.5x room. Wrong wiring (a
transposed matrix, a lost RoPE) is ~100%.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from edgespec.errors import UserError  # noqa: E402
from edgespec.tree import TokenTree  # noqa: E402
from exporters.onnx import MANIFEST, export_onnx  # noqa: E402
from runtimes.onnxrt import OnnxBackend  # noqa: E402
from runtimes.reference import ReferenceBackend  # noqa: E402
from tests.test_reference_loading import export_hf_folder  # noqa: E402

PROMPT = "The lighthouse keeper climbed the stairs every evening to light the lamp."
REL_TOL = {"fp32": 1e-4, "int8": 0.03, "int4": 0.08}
TREE_PARENTS = [-1, 0, 0, 2, 3, 1]


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path) -> ReferenceBackend:
    return ReferenceBackend(tiny_gguf, n_ctx=256)


@pytest.fixture(scope="module")
def exports(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 with an early exit after layer 1, int8 and int4, of the 2-layer tiny model."""
    out = tmp_path_factory.mktemp("onnx-exports")
    return {
        "fp32": export_onnx(tiny_gguf, out / "fp32", early_exit=1),
        "int8": export_onnx(tiny_gguf, out / "int8", quant="int8"),
        "int4": export_onnx(tiny_gguf, out / "int4", quant="int4", early_exit=1),
    }


def _prefill_and_tree(backend, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Prefill logits of the first 6 ids, then a branchy tree's logits after them."""
    backend.truncate(0)
    last = backend.prefill(ids[:6])
    tree = TokenTree(ids[6 : 6 + len(TREE_PARENTS)], TREE_PARENTS)
    return last, backend.verify(tree)


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_logits_match_the_reference_within_the_stated_tolerance(
    quant: str, exports: dict[str, Path], reference: ReferenceBackend
) -> None:
    ids = reference.tokenize(PROMPT, special=False)
    want_last, want_tree = _prefill_and_tree(reference, ids)
    backend = OnnxBackend(exports[quant], n_ctx=256, threads=1)
    try:
        got_last, got_tree = _prefill_and_tree(backend, ids)
    finally:
        backend.close()
    scale = np.abs(want_tree).max()
    print(f"{quant}: max |logit error| / max |logit| = "
          f"{np.abs(got_tree - want_tree).max() / scale:.2e}")
    assert np.abs(got_last - want_last).max() <= REL_TOL[quant] * scale
    assert np.abs(got_tree - want_tree).max() <= REL_TOL[quant] * scale


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_early_exit_graph_shares_the_weights_and_matches_the_reference_exit(
    quant: str, exports: dict[str, Path], reference: ReferenceBackend
) -> None:
    out = exports[quant]
    draft = onnx.load(out / "exit1.onnx", load_external_data=False)
    locations = {e.value for t in draft.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {"model.onnx.data"}  # no second copy of the weights
    assert (out / "exit1.onnx").stat().st_size < 100_000
    ids = reference.tokenize(PROMPT, special=False)
    reference.truncate(0)
    reference.prefill(ids[:5])
    want = reference.draft_logits(ids[5:9], 1)
    assert not np.allclose(want, reference.draft_logits(ids[5:9], 2), atol=1e-2)
    backend = OnnxBackend(out, n_ctx=256, threads=1)
    try:
        backend.prefill(ids[:5])
        got = backend.draft_logits(ids[5:9], 1)
        assert backend.exit_layers == [1]
    finally:
        backend.close()
    assert np.abs(got - want).max() <= REL_TOL[quant] * np.abs(want).max()


def test_export_layout_and_sizes(exports: dict[str, Path]) -> None:
    meta = json.loads((exports["fp32"] / MANIFEST).read_text())
    assert meta["n_layer"] == 2 and meta["n_head_kv"] == 2 and meta["head_dim"] == 16
    assert meta["eos_token_id"] == [2] and meta["early_exit"] == {"1": "exit1.onnx"}
    sizes = {q: (out / "model.onnx.data").stat().st_size for q, out in exports.items()}
    # the fp32 embedding table (49152 x 64) is in all three; the matrices shrink
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
    for out in exports.values():
        assert (out / "model.onnx").stat().st_size < 100_000  # the graph; weights are external


def test_an_hf_folder_exports_like_its_gguf(
    reference: ReferenceBackend, exports: dict[str, Path], tmp_path: Path
) -> None:
    folder = export_hf_folder(reference, tmp_path / "hf", "F32")
    out = export_onnx(folder, tmp_path / "hf-onnx")
    ids = reference.tokenize(PROMPT, special=False)
    results = []
    for path in (out, exports["fp32"]):
        backend = OnnxBackend(path, n_ctx=64, threads=1)
        results.append(_prefill_and_tree(backend, ids)[1])
        assert backend.tokenize(PROMPT, special=False) == ids
        backend.close()
    np.testing.assert_allclose(results[0], results[1], atol=1e-4)


def test_an_existing_output_is_refused_unless_forced(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists.*--force"):
        export_onnx(tiny_gguf, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_onnx(tiny_gguf, out, force=True)
    assert (out / MANIFEST).is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_a_failed_export_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match="not a readable GGUF"):
        export_onnx(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quant": "int3"}, "unknown ONNX quantization 'int3'"),
        ({"early_exit": 2}, "early exit must be after layer 1..1"),
    ],
)
def test_bad_options_are_user_errors(
    tiny_gguf: Path, tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        export_onnx(tiny_gguf, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_folder_without_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no config.json"):
        export_onnx(tmp_path, tmp_path / "out")
