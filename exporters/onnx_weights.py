"""Read float32 Llama weights back out of an edgespec ONNX export (exporters/onnx_graph.py).

So that an ONNX export can feed other exporters (GGUF → ONNX → OpenVINO): matrices are
found by their node names (``layer{i}/qkv`` …, ``head/lm_head``) whatever their form —
a float MatMul initializer (stored ``[in, out]``) or a MatMulNBits block-quantized one,
dequantized here — and the RoPE cos/sin tables are taken as the graph has them, so RoPE
settings the manifest does not record are carried over exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgespec.errors import UserError
from runtimes.weights import LayerWeights, LlamaConfig, LlamaWeights

_MATRICES = {"qkv": "qkv", "wo": "o_proj", "gate_up": "gate_up", "w_down": "down"}


def _dequantize_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                      attrs: dict) -> np.ndarray:
    """MatMulNBits' ``B [N, blocks, bytes]`` → float32 ``[N, K]`` (low nibble first)."""
    bits, block, k = attrs["bits"], attrs["block_size"], attrs["K"]
    n, blocks = b.shape[0], b.shape[1]
    q = np.stack([b & 15, b >> 4], axis=-1).reshape(n, blocks, block) if bits == 4 else b
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.float32)
    elif zero_points.dtype != np.uint8:
        zp = zero_points.reshape(n, blocks).astype(np.float32)
    elif bits == 4:
        packed = zero_points.reshape(n, -1)
        zp = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        zp = zero_points.reshape(n, blocks)
    w = (q.reshape(n, blocks, block) - zp.astype(np.float32)[..., None]) * scales.reshape(
        n, blocks, 1)
    return w.reshape(n, blocks * block)[:, :k].astype(np.float32)


class _Reader:
    """Initializers and nodes of one loaded ONNX graph, by name."""

    def __init__(self, path: Path) -> None:
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            raise UserError("reading an ONNX export needs onnx; install edgespec[onnx]") from None

        graph = onnx.load(path).graph
        self.inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.nodes = {node.name: node for node in graph.node}
        self.attrs = {node.name: {a.name: onnx.helper.get_attribute_value(a)
                                  for a in node.attribute} for node in graph.node}

    def node(self, prefix: str) -> str:
        """The name of the node called ``prefix`` (float) or ``prefix_Q…`` (quantized)."""
        return next(name for name in self.nodes if name == prefix or name.startswith(prefix + "_Q"))

    def matrix(self, prefix: str) -> np.ndarray:
        """The ``[out, in]`` float32 weight of the matmul node ``prefix``."""
        name = self.node(prefix)
        node = self.nodes[name]
        if node.op_type == "MatMul":
            return np.ascontiguousarray(self.inits[node.input[1]].T, np.float32)
        inputs = [self.inits.get(i) if i else None for i in node.input]
        return _dequantize_nbits(inputs[1], inputs[2], (inputs + [None])[3], self.attrs[name])

    def embedding(self) -> np.ndarray:
        name = self.node("common/embed")
        node = self.nodes[name]
        if node.op_type == "Gather":
            return self.inits[node.input[0]].astype(np.float32)
        codes, scales, zp = (self.inits[i] for i in (node.input[0], node.input[2], node.input[3]))
        rows, blocks = scales.shape
        codes = codes.reshape(rows, blocks, -1).astype(np.float32)
        return ((codes - zp[..., None]) * scales[..., None]).reshape(rows, -1)


def read_onnx_export(out: Path, meta: dict) -> tuple[LlamaWeights, tuple[np.ndarray, np.ndarray]]:
    """Float32 weights and the cos/sin tables of the export in ``out`` (manifest ``meta``)."""
    r = _Reader(out / "model.onnx")
    n_layer, n_kv, d = int(meta["n_layer"]), int(meta["n_head_kv"]), int(meta["head_dim"])
    n_head = int(r.attrs["layer0/gqa"]["num_heads"])
    layers = []
    for i in range(n_layer):
        m = {key: r.matrix(f"layer{i}/{node}") for key, node in _MATRICES.items()}
        wq, wk, wv = np.split(m["qkv"], [n_head * d, (n_head + n_kv) * d])
        gate, up = np.split(m["gate_up"], 2)
        layers.append(LayerWeights(r.inits[f"layer{i}.attn_norm"], wq, wk, wv, m["wo"],
                                   r.inits[f"layer{i}.ffn_norm"], gate, up, m["w_down"]))
    embed, head = r.embedding(), r.matrix("head/lm_head")
    cfg = LlamaConfig(
        n_layer=n_layer, n_embd=embed.shape[1], n_head=n_head, n_head_kv=n_kv, head_dim=d,
        n_ff=layers[0].w_down.shape[1], n_vocab=embed.shape[0],
        n_ctx_train=int(meta["max_positions"]),
        rms_eps=float(r.attrs["common/norm0"]["epsilon"]),
        rope_base=float("nan"), rope_dim=d,  # unused: the graph's own tables are returned
    )
    tied = head.shape == embed.shape and np.array_equal(head, embed)
    weights = LlamaWeights(cfg, embed, layers, r.inits["out_norm"], embed if tied else head)
    return weights, (r.inits["rope_cos"], r.inits["rope_sin"])
