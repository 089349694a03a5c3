"""The edgespec OpenVINO decoder graph, built with the ``openvino.opset*`` API from numpy weights.

Why not convert the ONNX export: OpenVINO 2026.4's ONNX frontend refuses its
GroupQueryAttention (7-16 inputs, ours has 17: ``query_seqlens``) and, in the quantized
exports, its SkipSimplifiedLayerNormalization; nor would GQA's in-place shared buffers
carry over. (An ONNX export is read back as weights instead: exporters/onnx_weights.py.)
Here the KV cache lives in buffers the runtime
owns, one per layer and kind, laid out slot-major ``[capacity, n_kv, head_dim]`` so that the
first ``P`` slots are a *contiguous* prefix the runtime hands to OpenVINO without a copy:

* inputs ``input_ids, position_ids [1, n]``, ``attn_mask [1, 1, n, W]``, W ≥ P + n
  (additive, 0 or -inf: which cached slots and which new tokens each new token sees — a
  token tree; columns past P + n face zero rows the graph appends, see :func:`_zero_rows`),
  ``logits_rows [m]`` and ``past_key_i / past_value_i [1, P, n_kv, head_dim]``;
* outputs ``logits [1, m, vocab]`` and only the new rows' ``new_key_i / new_value_i
  [1, n, n_kv, head_dim]`` (after RoPE), which the runtime writes into its buffers.

RoPE is applied from ``position_ids`` through cos/sin tables, so positions are free of
slots (a tree node sits at ``n_past + depth``). The q/k rows of every head are permuted from
GGUF's adjacent-pair layout to the half-split layout (the dot products are unchanged), so
RoPE is one split and one concat instead of strided gathers, written exactly as OpenVINO's
RoPE fusion pattern expects (VariadicSplit on axis 3, Multiply by -1): the CPU plugin then
runs one RoPE kernel per q and k instead of six elementwise nodes (measured on SmolLM2 int8,
2 threads: ~17.9 → 16.4 ms per single-token call).

Attention is written out — scaled queries, MatMul, mask Add, Softmax, MatMul — in the
shape of the CPU plugin's MHA pattern: Transposes (0, 2, 1, 3) on the queries and values
and (0, 2, 3, 1) on the keys, which it folds into one fused kernel that reads the
concatenated ``[1, W, n_kv, d]`` K/V through strides instead of copying them transposed.
Grouped-query attention without repeating K/V: the query group is folded into the query
rows (``[1, n * group, n_kv, d]``, token-major, the mask repeated to match). The 1/sqrt(d)
scale multiplies the few query rows: ScaledDotProductAttention given a scale multiplied
every cached key row of every layer on every call instead. Against one SDPA op, these two
changes took a single-token step with 300 cached tokens from ~16.9 to ~15.6 ms (SmolLM2
int8, 2 threads, interleaved in one process; format version 4).
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as op

from edgespec.errors import UserError
from runtimes.reference_ops import rope_angles
from runtimes.weights import LlamaConfig, LlamaWeights


def rope_tables(w: LlamaWeights, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin ``[n_positions, head_dim/2]``, exactly the reference's (float64 angles)."""
    cos, sin = rope_angles(w.config, np.arange(n_positions), w.rope_freq_factors)
    return cos[:, 0], sin[:, 0]


def half_split_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows ``(0, 1, 2, 3, …)`` → ``(0, 2, …, 1, 3, …)`` (pairs → halves)."""
    out, d = w.shape[1], w.shape[0] // n_heads
    order = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    return w.reshape(n_heads, d, out)[:, order].reshape(n_heads * d, out)


def _const(array: np.ndarray | list, dtype: type = np.int64) -> ov.Node:
    return op.constant(np.asarray(array, dtype=dtype))


class _Builder:
    """The inputs, outputs and weight constants of one graph under construction."""

    def __init__(self, w: LlamaWeights, weight_dtype: type) -> None:
        self.w, self.cfg, self.weight_dtype = w, w.config, weight_dtype
        self.group = self.cfg.n_head // self.cfg.n_head_kv
        self.inputs: dict[str, ov.Node] = {}
        self.outputs: list[ov.Output] = []
        self.key_pad: ov.Node | None = None  # zero K/V rows up to the mask's width

    def param(self, name: str, shape: list[int], dtype: ov.Type) -> ov.Node:
        node = op.parameter(ov.PartialShape(shape), dtype, name=name)
        node.output(0).get_tensor().set_names({name})
        self.inputs[name] = node
        return node

    def result(self, name: str, value: ov.Output) -> None:
        value.get_tensor().set_names({name})
        self.outputs.append(value)

    def matrix(self, w: np.ndarray) -> ov.Node:
        """``[out, in]`` weight, stored as ``weight_dtype`` (f16 ⇒ a Convert OpenVINO folds)."""
        node = op.constant(np.ascontiguousarray(w, dtype=self.weight_dtype))
        return node if self.weight_dtype == np.float32 else op.convert(node, ov.Type.f32)

    def linear(self, x: ov.Output, w: np.ndarray | ov.Node) -> ov.Node:
        weight = w if isinstance(w, ov.Node) else self.matrix(w)
        return op.matmul(x, weight, transpose_a=False, transpose_b=True)

    def rms_norm(self, x: ov.Output, gamma: np.ndarray) -> ov.Node:
        """The pattern OpenVINO's RMS fusion recognises: x * 1/sqrt(mean(x²) + eps) * gamma."""
        mean = op.reduce_mean(op.power(x, _const(2.0, np.float32)), _const([-1]), keep_dims=True)
        inv = op.divide(_const(1.0, np.float32),
                        op.sqrt(op.add(mean, _const(self.cfg.rms_eps, np.float32))))
        return op.multiply(op.multiply(x, inv), _const(gamma.reshape(1, 1, -1), np.float32))

    def rope_rows(self, tables: tuple[np.ndarray, np.ndarray]) -> tuple[ov.Node, ov.Node]:
        """cos/sin ``[1, n, 1, head_dim]`` at the input positions, from ``[n_pos, d/2]`` tables."""
        rows = []
        for table in tables:
            full = np.concatenate([table, table], axis=-1)  # half-split layout
            rows.append(op.unsqueeze(op.gather(_const(full, np.float32),
                                               self.inputs["position_ids"], _const(0)),
                                     _const([2])))
        return rows[0], rows[1]

    def rope(self, x: ov.Output, cos: ov.Node, sin: ov.Node) -> ov.Node:
        """``x * cos + rotate_half(x) * sin`` on ``[1, n, heads, head_dim]``, in the form the
        RoPE fusion pass matches (see the module docstring)."""
        half = self.cfg.head_dim // 2
        first, second = op.variadic_split(x, _const(3), _const([half, half])).outputs()
        rotated = op.concat([op.multiply(second, _const(-1.0, np.float32)), first], -1)
        return op.add(op.multiply(x, cos), op.multiply(rotated, sin))

    def attention(self, i: int, h: ov.Output, rope: tuple[ov.Node, ov.Node],
                  mask: ov.Node) -> ov.Node:
        """QKV, RoPE, attention over ``past + new`` rows; the new K/V rows become outputs."""
        cfg, lw = self.cfg, self.w.layers[i]
        nh, nkv, d, g = cfg.n_head, cfg.n_head_kv, cfg.head_dim, self.group
        wqkv = np.concatenate([half_split_rows(lw.wq, nh), half_split_rows(lw.wk, nkv), lw.wv])
        qkv = self.linear(h, wqkv)
        q, k, v = op.variadic_split(qkv, _const(-1), _const([nh * d, nkv * d, nkv * d])).outputs()
        q = self.rope(op.reshape(q, _const([0, 0, nh, d]), special_zero=True), *rope)
        k = self.rope(op.reshape(k, _const([0, 0, nkv, d]), special_zero=True), *rope)
        v = op.reshape(v, _const([0, 0, nkv, d]), special_zero=True)
        both = {}
        for kind, new in (("key", k), ("value", v)):
            self.result(f"new_{kind}_{i}", new.output(0))
            past = self.param(f"past_{kind}_{i}", [1, -1, nkv, d], ov.Type.f32)
            if self.key_pad is None:
                self.key_pad = _zero_rows(past, new, mask, [nkv, d])
            both[kind] = op.concat([past, new, self.key_pad], 1)
        # queries [1, n, nkv, g, d] → [1, n * g, nkv, d], token-major (module docstring)
        qg = op.transpose(op.reshape(q, _const([0, 0, nkv, g, d]), special_zero=True),
                          _const([0, 1, 3, 2, 4]))
        qg = op.reshape(qg, _const([0, -1, nkv, d]), special_zero=True)
        qg = op.multiply(qg, _const(1.0 / np.sqrt(d), np.float32))
        qt = op.transpose(qg, _const([0, 2, 1, 3]))
        kt = op.transpose(both["key"], _const([0, 2, 3, 1]))
        vt = op.transpose(both["value"], _const([0, 2, 1, 3]))
        scores = op.add(op.matmul(qt, kt, False, False), mask)
        att = op.matmul(op.softmax(scores, -1), vt, False, False)
        att = op.transpose(att, _const([0, 2, 1, 3]))  # [1, n * g, nkv, d]
        att = op.transpose(op.reshape(att, _const([0, -1, g, nkv, d]), special_zero=True),
                           _const([0, 1, 3, 2, 4]))
        return self.linear(op.reshape(att, _const([0, -1, nh * d]), special_zero=True), lw.wo)

    def mlp(self, i: int, h: ov.Output) -> ov.Node:
        """SwiGLU, gate and up in one product."""
        lw = self.w.layers[i]
        gate_up = self.linear(h, np.concatenate([lw.w_gate, lw.w_up]))
        gate, up = op.split(gate_up, _const(-1), 2).outputs()
        return self.linear(op.multiply(op.swish(gate), up), lw.w_down)


def _zero_rows(past: ov.Node, new: ov.Node, mask: ov.Node, row: list[int]) -> ov.Node:
    """Zero K/V rows after the new ones, as many as the mask is wider than past + new.

    The runtime makes every call's key length a multiple of 16 this way (masked slots add
    exact zeros) instead of evaluating padding rows: the CPU plugin's attention sums keys
    in blocks of 16, and a row's logits only stay bit-exact across calls if every call's
    keys fill whole blocks.
    """
    def dim(node: ov.Node, axis: int) -> ov.Node:
        return op.gather(op.shape_of(node), _const([axis]), _const(0))

    extra = op.subtract(op.subtract(dim(mask, 3), dim(past, 1)), dim(new, 1))
    shape = op.concat([_const([1]), extra, _const(row)], 0)
    return op.broadcast(op.constant(np.float32(0.0)), shape)


def _check_supported(cfg: LlamaConfig) -> None:
    if cfg.rope_dim != cfg.head_dim:
        raise UserError(f"the OpenVINO exporter needs RoPE over the whole head (rope_dim "
                        f"{cfg.rope_dim} != head_dim {cfg.head_dim})")
    if cfg.n_head % cfg.n_head_kv:
        raise UserError(f"{cfg.n_head} query heads do not divide into {cfg.n_head_kv} kv heads")


def build_decoder(w: LlamaWeights, rope: tuple[np.ndarray, np.ndarray], *,
                  n_layers: int | None = None, weight_dtype: type = np.float32) -> ov.Model:
    """The decoder of the first ``n_layers`` blocks (all by default) + final norm + LM head.

    ``rope`` are the cos/sin tables (:func:`rope_tables`); ``weight_dtype`` float16 stores
    the matrices at half size (OpenVINO decompresses them into the device's precision).
    The K/V tensors are float32; the runtime may turn them into float16 when it compiles.
    """
    cfg = w.config
    _check_supported(cfg)
    n_layers = cfg.n_layer if n_layers is None else n_layers
    b = _Builder(w, weight_dtype)
    ids = b.param("input_ids", [1, -1], ov.Type.i64)
    b.param("position_ids", [1, -1], ov.Type.i64)
    mask = b.param("attn_mask", [1, 1, -1, -1], ov.Type.f32)
    rows = b.param("logits_rows", [-1], ov.Type.i64)
    mask = op.reshape(mask, _const([1, -1, 1, 0]), special_zero=True)  # [1, n, 1, W]
    mask = op.reshape(op.tile(mask, _const([1, 1, b.group, 1])), _const([1, 1, -1, 0]),
                      special_zero=True)  # [1, 1, n*g, W]: g rows per token, t-major
    rope = b.rope_rows(rope)
    embed = b.matrix(w.embed)
    x = op.gather(embed, ids, _const(0))
    for i in range(n_layers):
        lw = w.layers[i]
        x = op.add(x, b.attention(i, b.rms_norm(x, lw.attn_norm), rope, mask))
        x = op.add(x, b.mlp(i, b.rms_norm(x, lw.ffn_norm)))
    h = op.gather(b.rms_norm(x, w.out_norm), rows, _const(1))
    head = embed if w.lm_head is w.embed else w.lm_head
    b.result("logits", b.linear(h, head).output(0))
    params = [b.inputs[n] for n in ("input_ids", "position_ids", "attn_mask", "logits_rows")]
    params += [p for name, p in b.inputs.items() if name.startswith("past_")]
    return ov.Model(b.outputs, params, "edgespec_decoder")
