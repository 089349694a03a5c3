"""The ONNX exporter's own files: an early exit shares the weights; quants shrink them.

How closely every export computes what the numpy reference computes, and how the
exporter refuses bad options and sources, is tested on this exporter and on OpenVINO's in
tests/test_slot_exports.py, with these tolerances (``SLOT_ENGINES["onnx"].rel_tol``),
relative to the largest reference logit: fp32 is the same arithmetic in another order
(1e-4, measured 3e-7). int8 and int4 quantize the blocks' weights to 8/4 bits and the
embedding and LM head to 8 bits (blocks of 32, int8 activations); on these random
Gaussian weights they measure 1.2% and 2.9%, and the bounds leave about 2.5x room. Wrong
wiring (a transposed matrix, a lost RoPE) is ~100%.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from runtimes.formats import MANIFEST  # noqa: E402
from tests.slot_engines import SLOT_ENGINES  # noqa: E402


@pytest.fixture(scope="module")
def exports(slot_export: Callable[..., Path]) -> dict[str, Path]:
    """fp32 with an early exit after layer 1, int8 and int4, of the 2-layer tiny model."""
    return {quant: slot_export("onnx", quant) for quant in SLOT_ENGINES["onnx"].exports}


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_the_early_exit_graph_shares_the_weights_of_the_model(
    quant: str, exports: dict[str, Path]
) -> None:
    out = exports[quant]
    draft = onnx.load(out / "exit1.onnx", load_external_data=False)
    locations = {e.value for t in draft.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {"model.onnx.data"}  # no second copy of the weights
    assert (out / "exit1.onnx").stat().st_size < 100_000


def test_export_layout_and_sizes(exports: dict[str, Path]) -> None:
    meta = json.loads((exports["fp32"] / MANIFEST).read_text())
    assert meta["n_layer"] == 2 and meta["n_head_kv"] == 2 and meta["head_dim"] == 16
    assert meta["eos_token_id"] == [2] and meta["early_exit"] == {"1": "exit1.onnx"}
    sizes = {q: (out / "model.onnx.data").stat().st_size for q, out in exports.items()}
    # the fp32 embedding table (49152 x 64) is in all three; the matrices shrink
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
    for out in exports.values():
        assert (out / "model.onnx").stat().st_size < 100_000  # the graph; weights are external
