"""Llama-family weights as float32 numpy arrays, from a GGUF file or a Hugging Face folder.

The reference backend is an oracle: it computes in float32 from dequantized weights, so
everything it can read is turned into plain arrays here, once. Two facts shape this module:

* RoPE layout. llama.cpp rotates *adjacent* pairs ``(2i, 2i+1)`` of each head
  (``LLAMA_ROPE_TYPE_NORM``); Hugging Face Llama rotates ``(i, i + d/2)`` (``rotate_half``).
  The GGUF converter permutes the q/k rows of every head so the two agree. We keep
  llama.cpp's layout internally (GGUF weights are used as stored, so we compute what
  llama.cpp computes) and apply the converter's permutation to safetensors q/k weights.
* Memory. A phone cannot hold a 7B model in float32; the budget is checked from tensor
  shapes *before* anything is dequantized, so an oversized model fails fast and cheaply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

from edgespec.errors import UserError
from runtimes.safetensors_io import read_safetensors_header, read_safetensors_tensors

DEFAULT_BUDGET_BYTES = 4 << 30
SUPPORTED_GGUF_ARCHS = frozenset({"llama"})
SUPPORTED_HF_ARCHS = frozenset({"LlamaForCausalLM"})
_Q = gguf.GGMLQuantizationType
SUPPORTED_QUANTS = frozenset({_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q4_K, _Q.Q6_K})
GGUF_LAYER = {
    "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
    "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up",
    "w_down": "ffn_down",
}  # fmt: skip
_HF_LAYER = {
    "attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}  # fmt: skip


@dataclass(frozen=True)
class LlamaConfig:
    """The shape and numerics of a Llama-family model (what the forward pass needs)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    rope_linear_scale: float = 1.0  # positions are divided by this ("linear" scaling)


@dataclass
class LayerWeights:
    """One transformer block; matrices are ``[out, in]`` as stored by both formats."""

    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray


@dataclass
class LlamaWeights:
    """All weights in float32; ``lm_head`` *is* ``embed`` for tied models (one copy)."""

    config: LlamaConfig
    embed: np.ndarray
    layers: list[LayerWeights]
    out_norm: np.ndarray
    lm_head: np.ndarray
    rope_freq_factors: np.ndarray | None = None  # Llama-3 style per-frequency divisors

    @property
    def nbytes(self) -> int:
        arrays = [self.embed, self.out_norm, self.rope_freq_factors]
        arrays += [] if self.lm_head is self.embed else [self.lm_head]
        arrays += [a for layer in self.layers for a in vars(layer).values()]
        return sum(a.nbytes for a in arrays if a is not None)


def _size(n: int) -> str:
    """Bytes in the unit a person would say them in."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def check_budget(n_float32: int, budget_bytes: int, what: str) -> None:
    """Refuse a model whose float32 weights exceed ``budget_bytes`` — before loading it."""
    need = 4 * n_float32
    if need > budget_bytes:
        raise UserError(
            f"{what} needs {_size(need)} as float32 weights, over the reference backend's "
            f"budget of {_size(budget_bytes)}; use a native backend (llama.cpp) or raise the "
            "budget"
        )


def load_weights(path: str | Path, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> LlamaWeights:
    """Weights from a ``.gguf`` file or a Hugging Face folder (config.json + safetensors)."""
    p = Path(path)
    if p.is_dir():
        return load_hf_folder(p, budget_bytes)
    return load_gguf(gguf.GGUFReader(p), budget_bytes, p.name)


# --- GGUF -----------------------------------------------------------------------------


def gguf_value(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    """A metadata value (``None``/``default`` when absent)."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: gguf.GGUFReader) -> LlamaConfig:
    """The model config from ``{arch}.*`` metadata; unsupported architectures are refused."""
    arch = gguf_value(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise UserError(f"the reference backend runs Llama-family GGUFs only; this one is {arch!r}")

    def meta(key: str, default: object = None) -> object:
        value = gguf_value(reader, f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"the GGUF lacks the {arch}.{key} metadata")
        return value

    n_embd, n_head = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", n_embd // n_head))
    scaling = meta("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UserError(f"the reference backend does not support RoPE scaling {scaling!r}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = meta("vocab_size", len(tokens.data) if tokens is not None else None)
    return LlamaConfig(
        n_layer=int(meta("block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(meta("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        n_ff=int(meta("feed_forward_length")),
        n_vocab=int(n_vocab),
        n_ctx_train=int(meta("context_length")),
        rms_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_base=float(meta("rope.freq_base", 10000.0)),
        rope_dim=int(meta("rope.dimension_count", head_dim)),
        rope_linear_scale=float(meta("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
    )


def load_gguf(
    reader: gguf.GGUFReader, budget_bytes: int = DEFAULT_BUDGET_BYTES, what: str = "the model"
) -> LlamaWeights:
    """Dequantize every tensor of a Llama GGUF with gguf's own quant code."""
    cfg = gguf_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    for t in tensors.values():
        if t.tensor_type not in SUPPORTED_QUANTS:
            raise UserError(
                f"tensor {t.name} is {t.tensor_type.name}, a type the reference backend "
                f"cannot dequantize (it reads {', '.join(q.name for q in SUPPORTED_QUANTS)})"
            )
    check_budget(sum(int(t.n_elements) for t in tensors.values()), budget_bytes, what)

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"the GGUF has no tensor {name}")
        t = tensors[name]
        return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)

    layers = [
        LayerWeights(**{k: get(f"blk.{i}.{v}.weight") for k, v in GGUF_LAYER.items()})
        for i in range(cfg.n_layer)
    ]
    embed = get("token_embd.weight")
    return LlamaWeights(
        config=cfg,
        embed=embed,
        layers=layers,
        out_norm=get("output_norm.weight"),
        lm_head=get("output.weight") if "output.weight" in tensors else embed,
        rope_freq_factors=get("rope_freqs.weight") if "rope_freqs.weight" in tensors else None,
    )


# --- Hugging Face safetensors folder ---------------------------------------------------


def hf_config(folder: Path) -> tuple[LlamaConfig, dict]:
    """The model config from ``config.json`` (also returned raw for tokenizer ids)."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json; pass a GGUF file or a HF model folder")
    raw = json.loads(path.read_text())
    archs = raw.get("architectures") or [raw.get("model_type")]
    if not SUPPORTED_HF_ARCHS.intersection(archs):
        raise UserError(f"the reference backend runs Llama-family models only; this is {archs}")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise UserError("the reference backend does not support Llama variants with biases")
    n_embd, n_head = raw["hidden_size"], raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or n_embd // n_head
    scaling = hf_rope_scaling(raw)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"the reference backend does not support RoPE scaling {kind!r}")
    cfg = LlamaConfig(
        n_layer=raw["num_hidden_layers"],
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=raw.get("num_key_value_heads", n_head),
        head_dim=head_dim,
        n_ff=raw["intermediate_size"],
        n_vocab=raw["vocab_size"],
        n_ctx_train=raw.get("max_position_embeddings", 2048),
        rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_base=float(raw.get("rope_theta") or scaling.get("rope_theta") or 10000.0),
        rope_dim=head_dim,
        rope_linear_scale=float(scaling["factor"]) if kind == "linear" else 1.0,
    )
    return cfg, raw


def hf_rope_scaling(raw: dict) -> dict:
    """RoPE settings of a ``config.json``: ``rope_scaling`` (transformers < 5, most Hub
    models) or ``rope_parameters`` (what transformers >= 5 writes, ``rope_theta`` inside)."""
    return raw.get("rope_scaling") or raw.get("rope_parameters") or {}


def llama3_freq_factors(cfg: LlamaConfig, scaling: dict) -> np.ndarray:
    """The per-frequency divisors of Llama-3 RoPE scaling (what llama.cpp's converter stores)."""
    factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
    low_wavelen = old_ctx / scaling.get("low_freq_factor", 1.0)
    high_wavelen = old_ctx / scaling.get("high_freq_factor", 4.0)
    out = []
    for i in range(0, cfg.rope_dim, 2):
        wavelen = 2 * math.pi * cfg.rope_base ** (i / cfg.rope_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            lo, hi = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def hf_to_llamacpp_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's ``rotate_half`` layout to adjacent RoPE pairs.

    This is the permutation llama.cpp's GGUF converter applies: within each head, row
    ``h * d/2 + j`` (half ``h``, index ``j``) moves to ``2j + h``.
    """
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load_hf_folder(folder: Path, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> LlamaWeights:
    """Weights from ``*.safetensors`` in ``folder`` (F32, F16 or BF16), q/k re-laid for RoPE."""
    cfg, raw = hf_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors files")
    headers = {f: read_safetensors_header(f) for f in files}
    n_float = sum(math.prod(h["shape"]) for hd in headers.values() for h in hd.values())
    check_budget(n_float, budget_bytes, folder.name)
    tensors: dict[str, np.ndarray] = {}
    for f, header in headers.items():
        tensors.update(read_safetensors_tensors(f, header))

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"{folder} has no tensor {name}")
        return tensors[name]

    layers = []
    for i in range(cfg.n_layer):
        names = {k: f"model.layers.{i}.{v}.weight" for k, v in _HF_LAYER.items()}
        layer = LayerWeights(**{k: get(name) for k, name in names.items()})
        layer.wq = hf_to_llamacpp_rope(layer.wq, cfg.n_head)
        layer.wk = hf_to_llamacpp_rope(layer.wk, cfg.n_head_kv)
        layers.append(layer)
    embed = get("model.embed_tokens.weight")
    scaling = hf_rope_scaling(raw)
    llama3 = scaling.get("rope_type", scaling.get("type")) == "llama3"
    return LlamaWeights(
        config=cfg,
        embed=embed,
        layers=layers,
        out_norm=get("model.norm.weight"),
        lm_head=embed if raw.get("tie_word_embeddings") else get("lm_head.weight"),
        rope_freq_factors=llama3_freq_factors(cfg, scaling) if llama3 else None,
    )
