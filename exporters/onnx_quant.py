"""Weight-only quantization of the decoder graph, in the split llama.cpp's GGUFs use.

Block matrices get ``bits`` (4 or 8) through onnxruntime's MatMulNBits quantizer,
asymmetric, blocks of ``block_size`` along the input dimension, int8 activations at run
time (``accuracy_level`` 4: integer dot products, VNNI where present). The embedding
table and the LM head — one matrix in tied models, a third of SmolLM2 — stay at 8 bits
*symmetric* with blocks of 32 whatever ``bits`` is: that is GGUF's Q8_0 grid, so a
Q8_0 embedding (as SmolLM2's GGUFs ship it) is carried over exactly, and the logits do
not pay for a 4-bit head. onnxruntime's quantizer packs embeddings only to 4 bits, so
the 8-bit GatherBlockQuantized is written here.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

HEAD_NODE, EMBED_NODE = "head/lm_head", "common/embed"
EMBED_BLOCK = 32


def quantize_blocks(model: onnx.ModelProto, bits: int, block_size: int) -> onnx.ModelProto:
    """Every MatMul to MatMulNBits: the blocks at ``bits``, the LM head at 8 bits symmetric."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    blocks = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, accuracy_level=4,
                                  nodes_to_exclude=[HEAD_NODE])
    blocks.process()
    head = MatMulNBitsQuantizer(blocks.model.model, bits=8, block_size=EMBED_BLOCK,
                                is_symmetric=True, accuracy_level=4)
    head.process()
    return quantize_embedding(head.model.model)


def _q8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit blocks of 32 along each row: uint8 codes (zero point 128), scales."""
    rows, cols = table.shape
    blocks = table.reshape(rows, cols // EMBED_BLOCK, EMBED_BLOCK)
    scales = np.abs(blocks).max(axis=-1) / 127.0
    scales[scales == 0] = 1.0
    codes = np.rint(blocks / scales[..., None]).clip(-127, 127) + 128
    return codes.astype(np.uint8).reshape(rows, cols), scales.astype(np.float32)


def quantize_embedding(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the embedding Gather by an 8-bit GatherBlockQuantized (a no-op if not float)."""
    graph = model.graph
    node = next(n for n in graph.node if n.name == EMBED_NODE)
    init = next(t for t in graph.initializer if t.name == node.input[0])
    table = numpy_helper.to_array(init)
    if table.shape[1] % EMBED_BLOCK:
        return model  # rows do not split into whole blocks: keep float
    codes, scales = _q8_rows(table)
    graph.initializer.remove(init)
    graph.initializer.extend([
        numpy_helper.from_array(codes, "embed_q8"),
        numpy_helper.from_array(scales, "embed_scales"),
        numpy_helper.from_array(np.full(scales.shape, 128, np.uint8), "embed_zero_points"),
    ])
    quantized = helper.make_node(
        "GatherBlockQuantized", ["embed_q8", node.input[1], "embed_scales", "embed_zero_points"],
        list(node.output), name=EMBED_NODE + "_Q8", domain="com.microsoft",
        bits=8, block_size=EMBED_BLOCK, gather_axis=0, quantize_axis=1,
    )
    index = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(index, quantized)
    return model
