"""Export a Llama GGUF or Hugging Face folder to edgespec's tree-capable ONNX decoder.

The output is a directory the ONNX backend opens as it is::

    model.onnx        the decoder (graph only; see exporters/onnx_graph.py for its interface)
    model.onnx.data   every weight, once (external data)
    exit{E}.onnx      optional early-exit draft: first E blocks + final norm + LM head,
                      pointing into model.onnx.data (no second copy of the weights)
    tokenizer.json, tokenizer_config.json   the source's tokenizer, HF format
    edgespec.json     what the runtime needs that the graph does not say (KV shape,
                      special token ids, quantization, exit layers)

No torch: weights come from :mod:`runtimes.weights` as float32 numpy arrays, the graph is
written with ``onnx.helper`` and int8/int4 weights by onnxruntime's MatMulNBits quantizer.
The write is atomic — a temporary sibling directory renamed into place — so an interrupted
export leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from edgespec.errors import UserError
from exporters.atomic import atomic_output
from runtimes.base import TokenizerInfo
from runtimes.formats import MANIFEST, ONNX
from runtimes.reference_tokenizer import ByteLevelTokenizer, gguf_tokenizer, hf_tokenizer
from runtimes.weights import LlamaWeights, hf_config, load_gguf, load_hf_folder

QUANTS = ("fp32", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
MIN_ROPE_POSITIONS = 4096


def _load_source(src: Path) -> tuple[LlamaWeights, ByteLevelTokenizer, TokenizerInfo]:
    """Float32 weights and the tokenizer of a GGUF file or an HF folder (any size: no budget)."""
    if not src.exists():
        raise UserError(f"model not found: {src}")
    if src.is_dir():
        _, raw = hf_config(src)
        return (load_hf_folder(src, budget_bytes=1 << 62), *hf_tokenizer(src, raw))
    try:
        reader = gguf.GGUFReader(src)
    except (ValueError, OSError) as e:
        raise UserError(f"{src} is not a readable GGUF file ({e})") from e
    return (load_gguf(reader, 1 << 62, src.name), *gguf_tokenizer(reader))


def _write_tokenizer(out: Path, encoder: ByteLevelTokenizer, info: TokenizerInfo) -> dict:
    """tokenizer.json + tokenizer_config.json for ``hf_tokenizer``; ids for the manifest."""
    (out / "tokenizer.json").write_text(encoder.to_hf_json())
    config = {"add_bos_token": info.add_bos, "chat_template": info.chat_template}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return {"bos_token_id": info.bos_id, "eos_token_id": sorted(info.eos_ids)}


def _manifest(weights: LlamaWeights, quant: str, exits: list[int], n_pos: int, src: Path) -> dict:
    cfg = weights.config
    return {
        "format": ONNX.name,
        "version": ONNX.version,
        "source": src.name,
        "quant": quant,
        "n_layer": cfg.n_layer,
        "n_head_kv": cfg.n_head_kv,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.n_vocab,
        "max_positions": n_pos,
        "early_exit": {str(e): f"exit{e}.onnx" for e in exits},
    }


def _write(tmp: Path, src: Path, quant: str, exits: list[int], block_size: int) -> None:
    """Everything of one export into the (temporary) directory ``tmp``."""
    import onnx

    from exporters.onnx_graph import build_decoder, early_exit_model

    weights, encoder, info = _load_source(src)
    n_pos = max(weights.config.n_ctx_train, MIN_ROPE_POSITIONS)
    model = build_decoder(weights, n_pos)
    del weights.layers[:]  # the graph holds copies; free the float32 arrays before quantizing
    if quant != "fp32":
        from exporters.onnx_quant import quantize_blocks

        model = quantize_blocks(model, BITS[quant], block_size)
    onnx.save_model(model, tmp / ONNX.model_file, save_as_external_data=True,
                    all_tensors_to_one_file=True, location=ONNX.model_file + ".data",
                    size_threshold=1024)
    saved = onnx.load(tmp / ONNX.model_file, load_external_data=False)
    for e in exits:
        onnx.save_model(early_exit_model(saved, weights.config, e), tmp / f"exit{e}.onnx")
    meta = _manifest(weights, quant, exits, n_pos, src) | _write_tokenizer(tmp, encoder, info)
    (tmp / MANIFEST).write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        f.chmod(0o644)  # onnx writes the weight file owner-only


def export_onnx(
    src: str | Path,
    out_dir: str | Path,
    *,
    quant: str = "fp32",
    early_exit: int | list[int] | None = None,
    force: bool = False,
    block_size: int = 32,
) -> Path:
    """Export ``src`` (GGUF or HF folder) to the directory ``out_dir``; returns it.

    ``quant`` is fp32 (the exactness reference), int8 or int4 (weight-only, blocks of
    ``block_size`` along the input dimension; see exporters/onnx_quant.py);
    ``early_exit`` adds one draft graph per exit layer. An existing ``out_dir`` is refused
    unless ``force``, and is replaced only once the new export is complete.
    """
    src, out = Path(src), Path(out_dir)
    if quant not in QUANTS:
        raise UserError(f"unknown ONNX quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"block size must be a power of two >= 16, got {block_size}")
    exits = [early_exit] if isinstance(early_exit, int) else sorted(set(early_exit or []))
    with atomic_output(out, force=force, directory=True) as tmp:
        _write(tmp, src, quant, exits, block_size)
    return out
