"""Weights load the same from every format, and bad models are refused with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import quants

from edgespec.errors import UserError
from edgespec.tree import TokenTree
from runtimes import reference_ops as ops
from runtimes.reference import ReferenceBackend
from runtimes.safetensors_io import (
    read_safetensors_header,
    read_safetensors_tensors,
    to_bf16_bits,
    write_safetensors,
)
from runtimes.weights import LlamaConfig, hf_to_llamacpp_rope, load_weights
from tests.test_sampling import write_small_vocab_llama

Q = gguf.GGMLQuantizationType
PROMPT = [4, 1, 16, 7, 2]
# d (the f16 block scale) that gives random K-quant blocks a weight std of ~0.5/sqrt(cols)
_K_BLOCK_SCALE = {Q.Q4_K: 1.2e-4, Q.Q6_K: 2.3e-5}


def _random_k_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but well-scaled K-quant bytes (gguf-py can decode K-quants, not encode them)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    d = _K_BLOCK_SCALE[qtype] * 16 / np.sqrt(cols)
    as_bytes = lambda x: np.frombuffer(np.float16(x).tobytes(), np.uint8)  # noqa: E731
    if qtype == Q.Q4_K:  # d, dmin lead the block; dmin ≈ 7.5 d centres the weights
        raw[..., 0:2], raw[..., 2:4] = as_bytes(d), as_bytes(7.5 * d)
    else:  # Q6_K ends with d
        raw[..., -2:] = as_bytes(d)
    return raw.reshape(rows, -1)


def requantize(src: Path, dst: Path, qtype: Q, arch: str = "llama", seed: int = 0) -> Path:
    """Copy GGUF ``src`` to ``dst`` with every matrix stored as ``qtype``.

    Types gguf-py can encode are quantized from the float weights; K-quants get random
    blocks (the point is that two engines decode the same bytes the same way).
    """
    reader, rng = gguf.GGUFReader(src), np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, list(field.contents()), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)
    for t in reader.tensors:
        w = quants.dequantize(t.data, t.tensor_type)
        if w.ndim == 1:
            writer.add_tensor(t.name, w)
        elif qtype in _K_BLOCK_SCALE:
            writer.add_tensor(t.name, _random_k_blocks(qtype, *w.shape, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 17-token F32 model: GGUF reads take milliseconds, unlike SmolLM2's 49k vocabulary."""
    return write_small_vocab_llama(tmp_path_factory.mktemp("load") / "letters.gguf", seed=11)


@pytest.fixture(scope="module")
def tiny_backend(tiny: Path) -> ReferenceBackend:
    return ReferenceBackend(tiny, n_ctx=64)


def _llamacpp_to_hf_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of the GGUF converter's q/k permutation (adjacent pairs → rotate_half)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def export_hf_folder(backend: ReferenceBackend, folder: Path, dtype: str) -> Path:
    """Write ``backend``'s model as a Hugging Face Llama folder, q/k in HF's RoPE layout."""
    cfg, w = backend.cfg, backend.weights
    tensors = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.out_norm}
    for i, layer in enumerate(w.layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": layer.attn_norm,
            p + "self_attn.q_proj.weight": _llamacpp_to_hf_rope(layer.wq, cfg.n_head),
            p + "self_attn.k_proj.weight": _llamacpp_to_hf_rope(layer.wk, cfg.n_head_kv),
            p + "self_attn.v_proj.weight": layer.wv,
            p + "self_attn.o_proj.weight": layer.wo,
            p + "post_attention_layernorm.weight": layer.ffn_norm,
            p + "mlp.gate_proj.weight": layer.w_gate,
            p + "mlp.up_proj.weight": layer.w_up,
            p + "mlp.down_proj.weight": layer.w_down,
        }
    tensors["lm_head.weight"] = w.lm_head
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", tensors, dtype)
    config = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.n_ff, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head_kv, "num_hidden_layers": cfg.n_layer,
        "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_base, "vocab_size": cfg.n_vocab,
        "max_position_embeddings": cfg.n_ctx_train, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(backend.encoder.to_hf_json())
    return folder


def test_hf_folder_computes_what_the_gguf_computes(tiny_backend, tmp_path: Path) -> None:
    """Same float32 weights in HF layout (rotate_half q/k rows): identical logits."""
    hf = ReferenceBackend(export_hf_folder(tiny_backend, tmp_path / "hf", "F32"), n_ctx=64)
    tiny_backend.truncate(0)
    tree = TokenTree([11, 12, 13], [-1, 0, 0])
    tiny_backend.prefill(PROMPT)
    hf.prefill(PROMPT)
    assert np.array_equal(hf.verify(tree), tiny_backend.verify(tree))
    assert hf.tokenize("abcab", special=True) == tiny_backend.tokenize("abcab", special=True)
    assert hf.tokenizer.eos_ids == {2}


def test_bf16_safetensors_read_back_as_rounded_float32(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    write_safetensors(tmp_path / "m.safetensors", {"x": x}, "BF16")
    header = read_safetensors_header(tmp_path / "m.safetensors")
    got = read_safetensors_tensors(tmp_path / "m.safetensors", header)["x"]
    assert header["x"]["dtype"] == "BF16"
    assert np.array_equal(got.view(np.uint32) >> 16, to_bf16_bits(x))
    assert np.abs(got - x).max() <= 2**-8 * np.abs(x).max()


def _rotate_half_rope(x: np.ndarray, pos: int, base: float) -> np.ndarray:
    """HF Llama's RoPE for one head vector, written independently of reference_ops."""
    d = x.size
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = np.concatenate([pos * inv, pos * inv])
    rotated = np.concatenate([-x[d // 2 :], x[: d // 2]])
    return x * np.cos(ang) + rotated * np.sin(ang)


def test_rope_layouts_agree_after_the_converter_permutation() -> None:
    """q·k under HF's rotate_half on HF weights == q·k under adjacent-pair RoPE on the
    permuted weights: the permutation is what makes GGUF and HF the same model."""
    rng = np.random.default_rng(2)
    cfg = LlamaConfig(1, 16, 2, 1, 8, 16, 10, 64, 1e-5, 10000.0, 8)
    wq, wk, h = rng.standard_normal((16, 16)), rng.standard_normal((8, 16)), rng.standard_normal(16)
    pq, pk = 5, 2
    hf_q, hf_k = (wq @ h).reshape(2, 8), wk @ h
    expected = [
        _rotate_half_rope(hf_q[i], pq, 1e4) @ _rotate_half_rope(hf_k, pk, 1e4) for i in range(2)
    ]
    q = (hf_to_llamacpp_rope(wq, 2) @ h).reshape(1, 2, 8).astype(np.float32)
    k = (hf_to_llamacpp_rope(wk, 1) @ h).reshape(1, 1, 8).astype(np.float32)
    cq, sq = ops.rope_angles(cfg, np.array([pq]), None)
    ck, sk = ops.rope_angles(cfg, np.array([pk]), None)
    got = ops.rope(q, cq, sq)[0] @ ops.rope(k, ck, sk)[0, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16])
def test_quantized_weights_dequantize_near_the_originals(tiny, tmp_path: Path, qtype) -> None:
    original = load_weights(tiny)
    loaded = load_weights(requantize(tiny, tmp_path / f"{qtype.name}.gguf", qtype))
    step = {Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 15, Q.F16: 2**-10, Q.BF16: 2**-7}
    a, b = original.layers[1].w_down, loaded.layers[1].w_down
    assert np.abs(a - b).max() <= step[qtype] * np.abs(a).max()
    assert loaded.lm_head.dtype == np.float32 and loaded.lm_head.shape == original.lm_head.shape


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_k_quants_load(tmp_path: Path, qtype) -> None:
    src = write_small_vocab_llama(tmp_path / "w.gguf", n_embd=256, n_ff=256, n_layer=1)
    weights = load_weights(requantize(src, tmp_path / "k.gguf", qtype))
    w = weights.layers[0].wq
    assert w.shape == (256, 256) and np.isfinite(w).all() and 0.01 < w.std() < 0.1


def test_an_unsupported_quant_type_is_named(tiny, tmp_path: Path) -> None:
    path = requantize(tiny, tmp_path / "q5.gguf", Q.Q5_0)
    with pytest.raises(UserError, match="is Q5_0"):
        ReferenceBackend(path)


def test_an_unsupported_architecture_is_named(tiny, tmp_path: Path) -> None:
    path = requantize(tiny, tmp_path / "gpt2.gguf", Q.F16, arch="gpt2")
    with pytest.raises(UserError, match="'gpt2'"):
        ReferenceBackend(path)


def test_a_model_over_the_budget_is_refused_before_loading(tiny) -> None:
    with pytest.raises(UserError, match=r"needs \d+\.\d KiB as float32 .* budget of 1\.0 KiB"):
        ReferenceBackend(tiny, budget_bytes=1 << 10)


def test_not_a_model_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        ReferenceBackend(tmp_path / "junk.gguf")
    with pytest.raises(UserError, match="no config.json"):
        ReferenceBackend(tmp_path)
    with pytest.raises(UserError, match="not found"):
        ReferenceBackend(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_the_packaged_smollm2_answers_sensibly() -> None:
    """Q4_1 + Q8_0 weights, 30 layers, GQA 9/3, RoPE base 1e5: a wrong layout would babble."""
    from edgespec.models import default_model_path

    backend = ReferenceBackend(default_model_path(), n_ctx=64)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    token, out = int(np.argmax(backend.prefill(backend.tokenize(prompt, special=True)))), []
    for _ in range(7):
        out.append(token)
        token = int(np.argmax(backend.verify(TokenTree.root(token))[0]))
        backend.commit([0])
    assert b"Paris" in backend.detokenize(out)
