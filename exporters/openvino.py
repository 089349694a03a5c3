"""Export a Llama GGUF, HF folder or edgespec ONNX export to edgespec's OpenVINO decoder IR.

The output is a directory the OpenVINO backend opens as it is::

    openvino_model.xml/.bin   the decoder (exporters/openvino_graph.py describes its interface)
    exit{E}.xml/.bin          optional early-exit drafts: first E blocks + final norm + head
                              (their own weight files: OpenVINO IR cannot point into another)
    tokenizer.json, tokenizer_config.json, edgespec.json   as in the ONNX export

Weights: ``fp32`` (the exactness reference), ``fp16`` (half the size, decompressed at load),
``int8`` (per output channel, asymmetric) and ``int4`` (groups of ``group_size`` along the
input, asymmetric; NNCF keeps the embedding / LM head at int8), compressed data-free by
``nncf.compress_weights``. An edgespec ONNX export as the source is read back into float32
weights (quantized matrices dequantized), so GGUF → ONNX → OpenVINO gives the same model
as GGUF → OpenVINO up to the ONNX export's own quantization.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgespec.errors import UserError
from exporters.atomic import atomic_output, write_failed
from exporters.onnx import MIN_ROPE_POSITIONS, _load_source, _manifest, _write_tokenizer
from runtimes.base import TokenizerInfo
from runtimes.formats import MANIFEST, ONNX, OPENVINO
from runtimes.reference_tokenizer import ByteLevelTokenizer, hf_tokenizer
from runtimes.weights import LlamaWeights

if TYPE_CHECKING:
    import openvino as ov

QUANTS = ("fp16", "fp32", "int8", "int4")

Rope = tuple[np.ndarray, np.ndarray]


def _source(src: Path) -> tuple[LlamaWeights, Rope, ByteLevelTokenizer, TokenizerInfo]:
    """Float32 weights, RoPE tables and tokenizer of a GGUF, HF folder or ONNX export."""
    from exporters.openvino_graph import rope_tables

    if src.suffix.lower() == ".onnx":
        src = src.parent  # an edgespec ONNX export is read with its manifest
    if src.is_dir() and (src / MANIFEST).is_file():
        meta = json.loads((src / MANIFEST).read_text())
        if meta.get("format") != ONNX.name:
            raise UserError(f"{src} is an {meta.get('format')!r} export, not a source "
                            f"this exporter reads (GGUF, HF folder or edgespec ONNX export)")
        from exporters.onnx_weights import read_onnx_export

        weights, rope = read_onnx_export(src, meta)
        return (weights, rope, *hf_tokenizer(src, meta))
    weights, encoder, info = _load_source(src)
    n_pos = max(weights.config.n_ctx_train, MIN_ROPE_POSITIONS)
    return weights, rope_tables(weights, n_pos), encoder, info


def _compress(model: ov.Model, quant: str, group_size: int) -> ov.Model:
    """Data-free weight compression of every matrix (NNCF), or none for fp16/fp32."""
    if quant in ("fp16", "fp32"):
        return model
    import nncf

    nncf.set_log_level(logging.ERROR)

    if quant == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM,
                                 group_size=group_size, ratio=1.0)


def _write(tmp: Path, src: Path, quant: str, exits: list[int], group_size: int,
           progress: Callable[[str], None]) -> None:
    """Everything of one export into the (temporary) directory ``tmp``."""
    import openvino as ov

    from exporters.openvino_graph import build_decoder

    progress(f"reading {src.name}")
    weights, rope, encoder, info = _source(src)
    cfg = weights.config
    if any(not 1 <= e < cfg.n_layer for e in exits):
        raise UserError(f"early exit must be after layer 1..{cfg.n_layer - 1}, got {exits}")
    if quant == "int4" and (cfg.n_embd % group_size or cfg.n_ff % group_size):
        raise UserError(f"int4 groups of {group_size} do not divide the model's widths "
                        f"({cfg.n_embd}, {cfg.n_ff}); choose a smaller group size")
    dtype = np.float16 if quant == "fp16" else np.float32
    for name, n_layers in [(OPENVINO.model_file, None), *((f"exit{e}.xml", e) for e in exits)]:
        progress(f"building {name} ({quant})")
        model = _compress(build_decoder(weights, rope, n_layers=n_layers, weight_dtype=dtype),
                          quant, group_size)
        try:
            ov.save_model(model, tmp / name, compress_to_fp16=False)
        except RuntimeError as e:
            raise write_failed(tmp.parent, f"OpenVINO's writer: {e}") from None
    meta = _manifest(weights, quant, [], len(rope[0]), src) | _write_tokenizer(tmp, encoder, info)
    meta |= {"format": OPENVINO.name, "version": OPENVINO.version,
             "early_exit": {str(e): f"exit{e}.xml" for e in exits},
             "group_size": group_size if quant == "int4" else None}
    (tmp / MANIFEST).write_text(json.dumps(meta, indent=1))


def export_openvino(
    src: str | Path,
    out_dir: str | Path,
    *,
    quant: str = "fp16",
    early_exit: int | list[int] | None = None,
    force: bool = False,
    group_size: int = 32,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export ``src`` (GGUF, HF folder or edgespec ONNX export) to ``out_dir``; returns it.

    ``quant``: fp16, fp32, int8 or int4 (see the module docstring); ``early_exit`` adds one
    draft model per exit layer; ``progress`` receives one line per stage. An existing
    ``out_dir`` is refused unless ``force``, and replaced only once the export is complete.
    """
    src, out = Path(src), Path(out_dir)
    if quant not in QUANTS:
        raise UserError(f"unknown OpenVINO quantization {quant!r}; choose one of "
                        f"{', '.join(QUANTS)}")
    if group_size < 16 or group_size & (group_size - 1):
        raise UserError(f"group size must be a power of two >= 16, got {group_size}")
    if not src.exists():
        raise UserError(f"model not found: {src}")
    exits = [early_exit] if isinstance(early_exit, int) else sorted(set(early_exit or []))
    with atomic_output(out, force=force, directory=True) as tmp:
        _write(tmp, src, quant, exits, group_size, progress or (lambda _line: None))
    return out
