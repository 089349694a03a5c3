"""The OpenVINO exporter's own files and sources: its IR, its sizes, ONNX exports as input.

How closely every export computes what the numpy reference computes (opened by the
OpenVINO backend, f32 inference), and how the exporter refuses bad options and sources,
is tested on this exporter and on ONNX's in tests/test_slot_exports.py, with these
tolerances (``SLOT_ENGINES["openvino"].rel_tol``), relative to the largest reference
logit: fp32 is the same arithmetic in another order (1e-4; measured 3e-7); fp16 rounds the
matrices to half precision; int8 (per channel) and int4 (groups of 32) are NNCF's
data-free compression, embedding and LM head at int8 — on these random Gaussian weights
they measure ~1.1% and ~2.7%, the bounds leave ~2.5x room. Wrong wiring (a transposed
matrix, a lost RoPE) is ~100%.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from edgespec.errors import UserError  # noqa: E402
from exporters.openvino import MANIFEST, export_openvino  # noqa: E402
from runtimes.reference import ReferenceBackend  # noqa: E402
from tests.slot_engines import SLOT_ENGINES, max_rel_error  # noqa: E402

OPENVINO = SLOT_ENGINES["openvino"]


@pytest.fixture(scope="module")
def exports(slot_export: Callable[..., Path]) -> dict[str, Path]:
    """Every quant of the 2-layer tiny model; fp32 with an early exit after layer 1."""
    return {quant: slot_export("openvino", quant) for quant in OPENVINO.exports}


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
    tiny_gguf: Path, slot_export: Callable[..., Path], tmp_path: Path
) -> None:
    """GGUF → ONNX (int8, dequantized on the way) → OpenVINO stays within int8's tolerance."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    reference = ReferenceBackend(tiny_gguf, n_ctx=256)
    onnx_dir = slot_export("onnx", "int8")
    assert max_rel_error(OPENVINO, export_openvino(onnx_dir, tmp_path / "ov", quant="fp32"),
                         reference) <= OPENVINO.rel_tol["int8"]


def test_an_openvino_export_is_not_a_source(exports: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="'edgespec-openvino-decoder' export, not a source"):
        export_openvino(exports["fp32"], tmp_path / "out")
