"""The edgespec ONNX decoder graph, built node by node from float32 numpy Llama weights.

Why hand-built rather than traced: speculation needs an interface no tracer emits — a tree
mask, RoPE positions that are not ``past + i``, and a KV cache that stays in place. The
graph uses onnxruntime's fused contrib operators so that a step is ~10 kernels per layer
(at 135M parameters per-kernel overhead, not arithmetic, sets the speed):

* ``GroupQueryAttention`` with *shared past/present buffers*: ``past_key_i`` and
  ``present_key_i`` are bound to one preallocated ``[1, n_kv, capacity, head_dim]`` array,
  the kernel writes the new rows at slots ``total - n .. total - 1`` and attends over slots
  ``0 .. total - 1`` only — no whole-cache copy, cost proportional to the context in use.
* ``attn_mask [1, 1, n, total]`` (additive, 0 or -inf) is GQA's ``attention_bias``: on top of
  its causal rule it hides every slot that is not the cached prefix or a tree ancestor.
  ``total`` comes from the mask's shape, so the mask alone decides which slots exist.
* RoPE inside GQA from ``position_ids`` (adjacent-pair layout, as llama.cpp/GGUF store q/k),
  so a node's position is ``n_past + depth`` however its slot is numbered.
* ``logits_rows [m]`` picks which of the n rows reach the LM head: a prefill needs one row,
  not ``n × vocab`` products.

Node names carry their layer (``layer{i}/…``) so that :func:`early_exit_model` can cut a
first-E-layers draft out of the final (possibly quantized) graph, sharing its weight file.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgespec.errors import UserError
from runtimes.weights import LlamaConfig, LlamaWeights

OPSET = 21
_MS = "com.microsoft"


def rope_tables(cfg: LlamaConfig, freq_factors: np.ndarray | None, n_pos: int) -> np.ndarray:
    """``cos, sin [n_pos, head_dim/2]`` exactly as the reference computes them (float64 angles)."""
    half = cfg.rope_dim // 2
    inv_freq = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.rope_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    theta = (np.arange(n_pos, dtype=np.float64) / cfg.rope_linear_scale)[:, None] * inv_freq
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


class _Graph:
    """Nodes and initializers under construction; names are unique by construction."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> list[str]:
        domain = _MS if op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization") else ""
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def _check_supported(cfg: LlamaConfig) -> None:
    if cfg.rope_dim != cfg.head_dim:
        raise UserError(
            f"the ONNX exporter needs RoPE over the whole head (rope_dim {cfg.rope_dim} != "
            f"head_dim {cfg.head_dim})"
        )
    if cfg.n_head % cfg.n_head_kv:
        raise UserError(f"{cfg.n_head} query heads do not divide into {cfg.n_head_kv} kv heads")


def _common(g: _Graph, w: LlamaWeights, n_pos: int) -> str:
    """Embedding lookup, RoPE tables and GQA's length inputs, derived from the input shapes.

    ``seqlens_k``/``total_len`` (slots in use after this call) come from the mask's width;
    ``query_len`` = n. Passing ``query_seqlens`` matters: without it GQA treats a call on
    an empty cache as a "first prompt" and reads only ``position_ids[0]``, assuming
    consecutive positions, which a tree at ``n_past = 0`` does not have.
    """
    cos, sin = rope_tables(w.config, w.rope_freq_factors, n_pos)
    g.weight("rope_cos", cos)
    g.weight("rope_sin", sin)
    g.weight("embed", w.embed)
    g.weight("common.i64_3", np.array([3], np.int64))
    g.weight("common.i32_1", np.array([1], np.int32))
    g.op("Gather", ["embed", "input_ids"], ["x_0"], "common/embed")
    g.op("Shape", ["attn_mask"], ["common/mask_shape"], "common/mask_shape")
    g.op("Gather", ["common/mask_shape", "common.i64_3"], ["common/total64"], "common/total64")
    g.op("Cast", ["common/total64"], ["common/total_1d"], "common/total_1d", to=TensorProto.INT32)
    g.op("Sub", ["common/total_1d", "common.i32_1"], ["seqlens_k"], "common/seqlens_k")
    g.op("Squeeze", ["common/total_1d"], ["total_len"], "common/total_len")
    g.op("Shape", ["input_ids"], ["common/ids_shape"], "common/ids_shape", start=1, end=2)
    g.op("Cast", ["common/ids_shape"], ["query_len"], "common/query_len", to=TensorProto.INT32)
    return "x_0"


def _attention(g: _Graph, i: int, w: LlamaWeights, h: str) -> str:
    """QKV projection, GQA over the shared KV buffers, output projection."""
    cfg, lw, p = w.config, w.layers[i], f"layer{i}"
    qkv = g.weight(f"{p}.qkv", np.concatenate([lw.wq, lw.wk, lw.wv], axis=0).T)
    g.op("MatMul", [h, qkv], [f"{p}/qkv"], f"{p}/qkv")
    g.op(
        "GroupQueryAttention",
        [f"{p}/qkv", "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_len",
         "rope_cos", "rope_sin", "position_ids", "attn_mask", "", "", "", "", "",
         "query_len"],
        [f"{p}/attn", f"present_key_{i}", f"present_value_{i}"],
        f"{p}/gqa",
        num_heads=cfg.n_head, kv_num_heads=cfg.n_head_kv, do_rotary=1, rotary_interleaved=1,
        scale=float(1.0 / np.sqrt(cfg.head_dim)),
    )  # fmt: skip
    wo = g.weight(f"{p}.wo", lw.wo.T)
    return g.op("MatMul", [f"{p}/attn", wo], [f"{p}/attn_out"], f"{p}/o_proj")[0]


def _mlp(g: _Graph, i: int, w: LlamaWeights, h: str) -> str:
    """SwiGLU with gate and up fused in one matmul (one big product beats two small ones)."""
    lw, p = w.layers[i], f"layer{i}"
    gate_up = g.weight(f"{p}.gate_up", np.concatenate([lw.w_gate, lw.w_up], axis=0).T)
    g.op("MatMul", [h, gate_up], [f"{p}/gate_up"], f"{p}/gate_up")
    g.op("Split", [f"{p}/gate_up"], [f"{p}/gate", f"{p}/up"], f"{p}/split", axis=-1, num_outputs=2)
    g.op("Sigmoid", [f"{p}/gate"], [f"{p}/sig"], f"{p}/sigmoid")
    g.op("Mul", [f"{p}/gate", f"{p}/sig"], [f"{p}/silu"], f"{p}/silu")
    g.op("Mul", [f"{p}/silu", f"{p}/up"], [f"{p}/act"], f"{p}/act")
    w_down = g.weight(f"{p}.down", lw.w_down.T)
    return g.op("MatMul", [f"{p}/act", w_down], [f"{p}/mlp_out"], f"{p}/down")[0]


def _norm_after(g: _Graph, name: str, delta: str, residual: str, gamma: str, eps: float,
                out: str, out_sum: str | None) -> None:
    """``out = rms_norm(delta + residual) * gamma`` and optionally the sum (the new residual)."""
    outputs = [out] if out_sum is None else [out, "", "", out_sum]
    g.op("SkipSimplifiedLayerNormalization", [delta, residual, gamma], outputs, name, epsilon=eps)


def _blocks(g: _Graph, w: LlamaWeights, x: str) -> str:
    """Every transformer block; returns the final-normed hidden state ``final/h``."""
    cfg = w.config
    g.weight("layer0.attn_norm", w.layers[0].attn_norm)
    g.op("SimplifiedLayerNormalization", [x, "layer0.attn_norm"], ["layer0/h"], "common/norm0",
         axis=-1, epsilon=cfg.rms_eps)
    for i in range(cfg.n_layer):
        p, last = f"layer{i}", i == cfg.n_layer - 1
        attn = _attention(g, i, w, f"{p}/h")
        ffn_norm = g.weight(f"{p}.ffn_norm", w.layers[i].ffn_norm)
        _norm_after(g, f"{p}/ffn_norm", attn, x, ffn_norm, cfg.rms_eps, f"{p}/h2", f"{p}/x_mid")
        mlp = _mlp(g, i, w, f"{p}/h2")
        gamma = "out_norm" if last else g.weight(f"layer{i + 1}.attn_norm",
                                                 w.layers[i + 1].attn_norm)
        out, out_sum = ("final/h", None) if last else (f"layer{i + 1}/h", f"x_{i + 1}")
        _norm_after(g, f"{p}/next_norm", mlp, f"{p}/x_mid", gamma, cfg.rms_eps, out, out_sum)
        x = out_sum or x
    return "final/h"


def _io(cfg: LlamaConfig, n_layers: int) -> tuple[list, list]:
    """Graph inputs and outputs: the runtime's side of the contract."""
    kv = [1, cfg.n_head_kv, "capacity", cfg.head_dim]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, [1, "n"]),
        helper.make_tensor_value_info("position_ids", i64, [1, "n"]),
        helper.make_tensor_value_info("attn_mask", f32, [1, 1, "n", "total"]),
        helper.make_tensor_value_info("logits_rows", i64, ["m"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, [1, "m", cfg.n_vocab])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f32, kv))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f32, kv))
    return inputs, outputs


def build_decoder(w: LlamaWeights, n_positions: int) -> onnx.ModelProto:
    """The full float32 decoder graph for ``w``; RoPE tables cover ``n_positions`` positions."""
    cfg = w.config
    _check_supported(cfg)
    g = _Graph()
    x = _common(g, w, n_positions)
    g.weight("out_norm", w.out_norm)
    h = _blocks(g, w, x)
    g.weight("lm_head", w.lm_head.T)
    g.op("Gather", [h, "logits_rows"], ["head/h_rows"], "head/rows", axis=1)
    g.op("MatMul", ["head/h_rows", "lm_head"], ["logits"], "head/lm_head")
    inputs, outputs = _io(cfg, cfg.n_layer)
    graph = helper.make_graph(g.nodes, "edgespec_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(_MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _layer_of(node: onnx.NodeProto) -> int | None:
    """The block a node belongs to (``layer{i}/…``), None for shared nodes."""
    head = node.name.split("/", 1)[0]
    return int(head[5:]) if head.startswith("layer") and head[5:].isdigit() else None


def early_exit_model(full: onnx.ModelProto, cfg: LlamaConfig, exit_layer: int) -> onnx.ModelProto:
    """The first ``exit_layer`` blocks of ``full`` + its final norm and LM head.

    Works on the finished graph (after quantization), so the draft uses the very same
    weights: its initializers are copied as they are — external-data references included —
    and the draft file points into the full model's weight file. The last kept block's
    closing norm switches its gamma to ``out_norm`` and feeds the LM head directly.
    """
    if not 1 <= exit_layer < cfg.n_layer:
        raise UserError(f"early exit must be after layer 1..{cfg.n_layer - 1}, got {exit_layer}")
    nodes = []
    for node in full.graph.node:
        layer = _layer_of(node)
        if layer is not None and layer >= exit_layer:
            continue
        node = onnx.NodeProto.FromString(node.SerializeToString())
        if node.name == f"layer{exit_layer - 1}/next_norm":
            node.input[2] = "out_norm"
            del node.output[1:]
            node.output[0] = "final/h"
        nodes.append(node)
    used = {name for node in nodes for name in node.input}
    inits = [t for t in full.graph.initializer if t.name in used]
    inputs, outputs = _io(cfg, exit_layer)
    graph = helper.make_graph(nodes, f"edgespec_exit{exit_layer}", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=full.opset_import, ir_version=full.ir_version)
