"""The edgespec OpenVINO decoder graph, built with the ``openvino.opset*`` API from numpy weights.

Why not convert the ONNX export: OpenVINO 2026.4's ONNX frontend refuses its
GroupQueryAttention (7-16 inputs, ours has 17: ``query_seqlens``) and, in the quantized
exports, its SkipSimplifiedLayerNormalization; nor would GQA's in-place shared buffers
carry over. (An ONNX export is read back as weights instead: exporters/onnx_weights.py.)
Here the KV cache lives in buffers the runtime
owns, one per layer and kind, laid out head-major ``[n_kv, capacity, head_dim]`` and bound
to the compiled model once, whole:

* inputs ``input_ids, position_ids [1, n]``, ``attn_mask [1, 1, n, W]`` (additive, 0 or
  -inf: which slots each new token sees — a token tree), ``logits_rows [m]``,
  ``kv_slots [n]`` (the slots the new rows go to, below W) and
  ``past_key_i / past_value_i [1, n_kv, capacity, head_dim]``: the whole cache, of which
  the graph reads the first W slots, whatever the slots past the cache hold (masked;
  finite, so they add exact zeros);
* outputs ``logits [1, m, vocab]`` and the new rows of every layer, ``new_kv [2, layers,
  n_kv, n, head_dim]`` (keys, then values; after RoPE), which the runtime writes into its
  buffers in one copy.

Each layer attends over ``ScatterUpdate(Slice(cache, :W), kv_slots, new rows)``: one copy
of the window per layer and kind, in the layout attention reads, so no transpose follows.
Measured against the earlier layouts (SmolLM2 int8, 2 threads, interleaved in one process):

* version 4 bound a ``[1, P, n_kv, d]`` past and a ``[1, n]`` output per layer and kind on
  every call (~0.7 ms of a ~12 ms step) and concatenated past, new and zero rows;
* version 5 bound slot-major windows ``[1, W, n_kv, d]`` that changed every 16 steps and
  scattered into them, but the keys still needed a transposed copy per layer: plain
  decoding ~7% faster than version 4 on the dev prompts, and no faster past ~300 slots;
* version 6 (this one): single-token steps 4% faster than version 5 at 60 cached tokens,
  15% at 300, 25% at 600; plain decoding on the dev prompts (128 tokens) 12% faster.

RoPE is applied from ``position_ids`` through cos/sin tables, so positions are free of
slots (a tree node sits at ``n_past + depth``). The q/k rows of every head are permuted from
GGUF's adjacent-pair layout to the half-split layout (the dot products are unchanged), so
RoPE is one split and one concat instead of strided gathers, written exactly as OpenVINO's
RoPE fusion pattern expects (VariadicSplit on axis 3, Multiply by -1): the CPU plugin then
runs one RoPE kernel per q and k instead of six elementwise nodes (measured on SmolLM2 int8,
2 threads: ~17.9 → 16.4 ms per single-token call).

Attention is written out — scaled queries, MatMul, mask Add, Softmax, MatMul — in the
shape of the CPU plugin's MHA pattern (a (0, 2, 1, 3) Transpose on the queries, the keys'
MatMul transposed), which it runs as one fused kernel.
Grouped-query attention without repeating K/V: the query group is folded into the query
rows (``[1, n * group, n_kv, d]``, token-major, the mask repeated to match). The query heads
are stored group-major (:func:`group_major`, and ``wo``'s input columns to match), so that
fold is a reshape: the two 5-D transposes per layer it took before cost ~5% of a
single-token step. The 1/sqrt(d) scale multiplies the few query rows:
ScaledDotProductAttention given a scale multiplied every cached key row of every layer on
every call instead (format version 4: ~16.9 → ~15.6 ms per step at 300 cached tokens).
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


def group_major(w: np.ndarray, n_kv: int, group: int, head_dim: int) -> np.ndarray:
    """Reorder the query heads' rows from kv-major (head ``h * group + j``) to group-major
    (``j * n_kv + h``): the heads then fold into token-major query rows by a reshape alone."""
    out = w.shape[1]
    return w.reshape(n_kv, group, head_dim, out).transpose(1, 0, 2, 3).reshape(-1, out)


def _const(array: np.ndarray | list, dtype: type = np.int64) -> ov.Node:
    return op.constant(np.asarray(array, dtype=dtype))


class _Builder:
    """The inputs, outputs and weight constants of one graph under construction."""

    def __init__(self, w: LlamaWeights, weight_dtype: type) -> None:
        self.w, self.cfg, self.weight_dtype = w, w.config, weight_dtype
        self.group = self.cfg.n_head // self.cfg.n_head_kv
        self.inputs: dict[str, ov.Node] = {}
        self.outputs: list[ov.Output] = []
        self.new_rows: dict[str, list[ov.Output]] = {"key": [], "value": []}  # per layer
        self._width: ov.Node | None = None

    def param(self, name: str, shape: list[int], dtype: ov.Type) -> ov.Node:
        node = op.parameter(ov.PartialShape(shape), dtype, name=name)
        node.output(0).get_tensor().set_names({name})
        self.inputs[name] = node
        return node

    def result(self, name: str, value: ov.Output) -> None:
        value.get_tensor().set_names({name})
        self.outputs.append(value)

    def width(self) -> ov.Node:
        """W, the slots a call attends over: the mask's last dimension, as ``[1]``."""
        if self._width is None:
            mask_shape = op.shape_of(self.inputs["attn_mask"])
            self._width = op.gather(mask_shape, _const([3]), _const(0))
        return self._width

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
        """QKV, RoPE, attention over the window with the new K/V rows in their slots."""
        cfg, lw = self.cfg, self.w.layers[i]
        nh, nkv, d, g = cfg.n_head, cfg.n_head_kv, cfg.head_dim, self.group
        wq = group_major(half_split_rows(lw.wq, nh), nkv, g, d)
        wqkv = np.concatenate([wq, half_split_rows(lw.wk, nkv), lw.wv])
        qkv = self.linear(h, wqkv)
        q, k, v = op.variadic_split(qkv, _const(-1), _const([nh * d, nkv * d, nkv * d])).outputs()
        q = self.rope(op.reshape(q, _const([0, 0, nh, d]), special_zero=True), *rope)
        k = self.rope(op.reshape(k, _const([0, 0, nkv, d]), special_zero=True), *rope)
        v = op.reshape(v, _const([0, 0, nkv, d]), special_zero=True)
        both = {}
        for kind, new in (("key", k), ("value", v)):
            new = op.transpose(new, _const([0, 2, 1, 3]))  # [1, nkv, n, d]
            self.new_rows[kind].append(new.output(0))
            cache = self.param(f"past_{kind}_{i}", [1, nkv, -1, d], ov.Type.f32)
            window = op.slice(cache, _const([0]), self.width(), _const([1]), _const([2]))
            both[kind] = op.scatter_update(window, self.inputs["kv_slots"], new, _const(2))
        # queries [1, n, g * nkv, d] (group-major heads) → [1, n * g, nkv, d], token-major
        qg = op.reshape(q, _const([0, -1, nkv, d]), special_zero=True)
        qg = op.multiply(qg, _const(1.0 / np.sqrt(d), np.float32))
        qt = op.transpose(qg, _const([0, 2, 1, 3]))
        scores = op.add(op.matmul(qt, both["key"], False, True), mask)
        att = op.matmul(op.softmax(scores, -1), both["value"], False, False)
        att = op.transpose(att, _const([0, 2, 1, 3]))  # [1, n * g, nkv, d]
        wo = group_major(lw.wo.T, nkv, g, d).T  # its input columns in the heads' new order
        return self.linear(op.reshape(att, _const([0, -1, nh * d]), special_zero=True), wo)

    def mlp(self, i: int, h: ov.Output) -> ov.Node:
        """SwiGLU, gate and up in one product."""
        lw = self.w.layers[i]
        gate_up = self.linear(h, np.concatenate([lw.w_gate, lw.w_up]))
        gate, up = op.split(gate_up, _const(-1), 2).outputs()
        return self.linear(op.multiply(op.swish(gate), up), lw.w_down)


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
    b.param("kv_slots", [-1], ov.Type.i64)
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
    rows_of_all = op.concat(b.new_rows["key"] + b.new_rows["value"], 0)  # [2 * layers, n, …]
    shape = _const([2, n_layers, cfg.n_head_kv, -1, cfg.head_dim])
    b.result("new_kv", op.reshape(rows_of_all, shape, special_zero=False).output(0))
    params = [b.inputs[n] for n in ("input_ids", "position_ids", "attn_mask", "logits_rows",
                                           "kv_slots")]
    params += [p for name, p in b.inputs.items() if name.startswith("past_")]
    return ov.Model(b.outputs, params, "edgespec_decoder")
