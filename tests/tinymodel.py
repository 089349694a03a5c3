"""Tiny random-weight Llama GGUFs for tests: fast to run, real files for real engines.

The tokenizer (vocabulary, merges, special tokens, chat template) is copied from the
packaged SmolLM2 GGUF so that tokenization is exactly that of a real model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgespec.models import default_model_path


@dataclass(frozen=True)
class TinyConfig:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 2048
    rope_base: float = 10000.0
    weight_scale: float = 0.5
    seed: int = 0
    dtype: str = "F16"
    tokenizer_model: str | None = None  # override tokenizer.ggml.model (bad-input tests)


def _tokenizer_fields(src: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(src)


def _copy_tokenizer(writer: gguf.GGUFWriter, reader: gguf.GGUFReader,
                    model: str | None) -> int:
    """Copy every ``tokenizer.*`` key; returns the vocabulary size."""
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.model" and model is not None:
            value = model
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, list(value), vtype, sub_type=field.types[-1])
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        else:
            writer.add_key_value(key, value, vtype)
    return n_vocab


def write_tiny_llama(path: Path, cfg: TinyConfig = TinyConfig()) -> Path:
    """Write a random Llama GGUF to ``path`` and return it."""
    reader = _tokenizer_fields(default_model_path())
    writer = gguf.GGUFWriter(str(path), "llama")
    n_vocab = _copy_tokenizer(writer, reader, cfg.tokenizer_model)
    head_dim = cfg.n_embd // cfg.n_head
    writer.add_name("edgespec-tiny-llama")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_ctx)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.n_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head_kv)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if cfg.dtype == "F16" else 0)

    rng = np.random.default_rng(cfg.seed)
    mat_dtype = np.float16 if cfg.dtype == "F16" else np.float32

    def mat(name: str, rows: int, cols: int) -> None:
        w = rng.standard_normal((rows, cols)) * (cfg.weight_scale / np.sqrt(cols))
        writer.add_tensor(name, w.astype(mat_dtype))

    def norm(name: str, n: int) -> None:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    emb = rng.standard_normal((n_vocab, cfg.n_embd)).astype(mat_dtype)
    writer.add_tensor("token_embd.weight", emb)
    for i in range(cfg.n_layer):
        b = f"blk.{i}"
        norm(f"{b}.attn_norm.weight", cfg.n_embd)
        mat(f"{b}.attn_q.weight", cfg.n_embd, cfg.n_embd)
        mat(f"{b}.attn_k.weight", cfg.n_head_kv * head_dim, cfg.n_embd)
        mat(f"{b}.attn_v.weight", cfg.n_head_kv * head_dim, cfg.n_embd)
        mat(f"{b}.attn_output.weight", cfg.n_embd, cfg.n_embd)
        norm(f"{b}.ffn_norm.weight", cfg.n_embd)
        mat(f"{b}.ffn_gate.weight", cfg.n_ff, cfg.n_embd)
        mat(f"{b}.ffn_up.weight", cfg.n_ff, cfg.n_embd)
        mat(f"{b}.ffn_down.weight", cfg.n_embd, cfg.n_ff)
    norm("output_norm.weight", cfg.n_embd)
    mat("output.weight", n_vocab, cfg.n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
