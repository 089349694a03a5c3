"""Export a Llama model to a GGUF file llama.cpp loads, in any of its usual weight types.

Two routes, both ending in one atomically renamed file (see exporters/atomic.py):

* A Hugging Face folder (config.json, *.safetensors, tokenizer.json) is written as a
  float GGUF here with gguf-py. :mod:`runtimes.weights` already hands out q/k rows in
  llama.cpp's RoPE layout (each head's rotate_half halves interleaved into adjacent
  pairs, the permutation llama.cpp's own converter applies), so tensors are written as
  they come. The tokenizer must be byte-level BPE (``tokenizer.ggml.model = gpt2``); its
  llama.cpp pre-tokenizer name is looked up from the HF pre-tokenizer's exact structure,
  and one without a known equivalent is refused: llama.cpp would split text differently.
* Quantized types come from llama.cpp's own quantizer (``llama_model_quantize``), run on
  a GGUF source directly (it copies the source's metadata; requantizing an already
  quantized file is allowed and lossy) or on a float GGUF of the HF folder in the
  folder's own dtype, so that step loses nothing.

Every output is parsed by :func:`runtimes.ggufinfo.read_gguf` before it is renamed into
place: a vocabulary that contradicts its declared tokenizer model makes llama.cpp abort
the whole process at tokenize time, so such a file must never appear.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgespec.errors import UserError
from exporters import Progress, no_progress
from exporters.atomic import atomic_output, check_disk_space, scratch_path, write_failed
from runtimes.ggufinfo import GGUFInfo, read_gguf
from runtimes.safetensors_io import read_safetensors_header, to_bf16_bits
from runtimes.weights import (
    GGUF_LAYER,
    SUPPORTED_GGUF_ARCHS,
    SUPPORTED_HF_ARCHS,
    SUPPORTED_QUANTS,
    LlamaConfig,
    LlamaWeights,
    hf_config,
    load_hf_folder,
)

Q = gguf.GGMLQuantizationType
# export name (llama-quantize's) → (llama_ftype, tensor type used to estimate the size);
# Q4_K_M mixes Q4_K with Q6_K (and Q5_0/Q8_0 for rows not a multiple of 256): sized as Q6_K
QUANTS: dict[str, tuple[int, Q]] = {
    "f32": (0, Q.F32), "f16": (1, Q.F16), "bf16": (32, Q.BF16), "q8_0": (7, Q.Q8_0),
    "q4_0": (2, Q.Q4_0), "q4_1": (3, Q.Q4_1), "q4_k_m": (15, Q.Q6_K),
}  # fmt: skip
FLOATS = ("f32", "f16", "bf16")  # written here; every other type by llama.cpp's quantizer
# what a GGUF source may hold: llama.cpp dequantizes these when requantizing, and they are
# the types llama.cpp's own quantizer writes for the exports above
SOURCE_TYPES = SUPPORTED_QUANTS | {Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q5_K}
TOKENIZER_MODEL = "gpt2"
_NO_BUDGET = 1 << 62  # an export reads any size of model; the disk check is what limits it
_SAFETENSORS_FLOAT = {"F32": "f32", "F16": "f16", "BF16": "bf16"}

# Hugging Face's Llama 3 split regex (llama.cpp's "llama-bpe" rule, written differently there)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (pre-tokenizer steps in the canonical form of _pre_steps, BPE ignore_merges) → llama.cpp name
_PRE_TOKENIZERS = {
    ((("ByteLevel", False, True),), False): "gpt-2",
    ((("Digits", True), ("ByteLevel", False, True)), False): "smollm",
    ((("Split", _LLAMA3_REGEX, "Isolated", False), ("ByteLevel", False, False)), True): "llama-bpe",
}


def export_gguf(
    src: str | Path,
    out_path: str | Path,
    *,
    quant: str = "f16",
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Export ``src`` (HF folder or GGUF) as the GGUF file ``out_path``; returns it.

    ``quant`` is one of :data:`QUANTS` (llama-quantize's lowercase names). An existing
    output is refused unless ``force`` and replaced only by a complete, checked file.
    """
    src, out = Path(src), Path(out_path)
    check_quant(quant)
    if not src.exists():
        raise UserError(f"model not found: {src}")
    source = _HFSource.open(src) if src.is_dir() else _GGUFSource.open(src)
    with atomic_output(out, force=force) as tmp:
        check_disk_space(out.parent, source.need_bytes(quant), f"a {quant} GGUF of {src.name}")
        source.write(tmp, quant, progress or no_progress)
        check_output(tmp, out)
    return out


def check_quant(quant: str) -> None:
    """Refuse an unknown type name up front, before any (possibly long) work."""
    if quant not in QUANTS:
        raise UserError(f"unknown GGUF type {quant!r}; choose one of {', '.join(QUANTS)}")


def check_output(tmp: Path, out: Path) -> None:
    """Refuse an output llama.cpp would crash on (ggufinfo's checks) before it is in place."""
    try:
        read_gguf(tmp)
    except UserError as e:
        raise UserError(f"refusing to write {out}: {e}") from e


def _gguf_bytes(n_weights: int, quant: str) -> int:
    """Estimated file size: weights at the type's density, plus room for metadata."""
    block, size = gguf.GGML_QUANT_SIZES[QUANTS[quant][1]]
    return int(n_weights * size / block * 1.05) + (16 << 20)


# --- GGUF sources: llama.cpp's quantizer does the work -----------------------------------


def check_gguf_source(path: Path) -> GGUFInfo:
    """The header of a GGUF this module can convert; a :class:`UserError` names what is not."""
    info = read_gguf(path)  # also refuses truncated files and crashing tokenizers
    if info.architecture not in SUPPORTED_GGUF_ARCHS:
        raise UserError(
            f"{path}: cannot export GGUF architecture {info.architecture!r}; supported "
            f"architectures are {', '.join(sorted(SUPPORTED_GGUF_ARCHS))}"
        )
    for name, (_, qtype, _) in info.tensors.items():
        if qtype not in SOURCE_TYPES:
            raise UserError(
                f"{path}: tensor {name} is {qtype.name}, a type this exporter cannot convert "
                f"from (it reads {', '.join(sorted(t.name for t in SOURCE_TYPES))}); export "
                "from the original Hugging Face folder instead"
            )
    return info


@dataclass
class _GGUFSource:
    path: Path
    n_weights: int

    @classmethod
    def open(cls, path: Path) -> _GGUFSource:
        info = check_gguf_source(path)
        return cls(path, sum(math.prod(dims) for dims, _, _ in info.tensors.values()))

    def need_bytes(self, quant: str) -> int:
        return _gguf_bytes(self.n_weights, quant)

    def write(self, dst: Path, quant: str, report: Progress) -> None:
        quantize_gguf(self.path, dst, quant, report)


def quantize_gguf(src: Path, dst: Path, quant: str, report: Progress = no_progress) -> None:
    """Write ``src`` as ``quant`` with llama.cpp's quantizer (requantizing if need be).

    llama.cpp logs each tensor; the log goes to the process-wide capture of the llama.cpp
    backend instead of stderr, and its last error explains a failure.
    """
    try:
        import llama_cpp as llm
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise UserError("GGUF export needs llama-cpp-python; install edgespec[gguf]") from e
    from runtimes.base import default_threads
    from runtimes.llamacpp import log_capture

    log = log_capture()
    params = llm.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant][0]
    params.nthread = default_threads()
    params.allow_requantize = True
    report("quantize", 0, 1)
    if llm.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)):
        # its text is all llama.cpp says; its output is a C++ stream that throws "iostream
        # error" when a write fails (the input is read through mmap or its own file reader)
        said = [line.split("failed to quantize: ", 1)[1].strip() for line in log.lines
                if "failed to quantize: " in line]
        error = said[-1] if said else log.last_error()
        if "iostream" in error or str(dst) in error:
            raise write_failed(dst.parent, f"llama.cpp's {quant} writer: {error}")
        raise UserError(f"llama.cpp cannot quantize {src.name} to {quant}: {error}")
    report("quantize", 1, 1)


def copy_gguf(
    src: Path,
    dst: Path,
    *,
    metadata: Mapping[str, object] | None = None,
    keep: Callable[[str], bool] | None = None,
    report: Progress = no_progress,
) -> None:
    """Copy a GGUF byte for byte, with ``metadata`` values replaced or added and only the
    tensors whose name ``keep`` accepts (a layer-truncated draft, a labelled copy)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, str(reader.fields["general.architecture"].contents()))
    try:
        _copy_metadata(reader, writer, metadata or {})
        tensors = [t for t in reader.tensors if keep is None or keep(t.name)]
        for t in tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                   raw_dtype=t.tensor_type)
        _write_header(writer)
        for done, t in enumerate(tensors, 1):
            writer.write_tensor_data(t.data)
            report("copy", done, len(tensors))
    finally:
        writer.close()


def _copy_metadata(
    reader: gguf.GGUFReader, writer: gguf.GGUFWriter, metadata: Mapping[str, object]
) -> None:
    """Every key of ``reader`` (in its own value type) with ``metadata`` applied on top."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer's own
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, metadata.get(key, field.contents()), vtype, sub_type)
    for key, value in metadata.items():
        if key not in reader.fields:
            writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    if "general.alignment" in reader.fields:
        writer.data_alignment = int(reader.fields["general.alignment"].contents())


def _write_header(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


# --- Hugging Face folders: written here, quantized by llama.cpp ------------------------------


@dataclass
class HFVocab:
    """The tokenizer as GGUF wants it: tokens and types in id order, pre-tokenizer name."""

    tokens: list[str]
    types: list[int]
    pre: str


@dataclass
class _HFSource:
    folder: Path
    n_weights: int
    staging: str  # the float type that holds the folder's weights exactly
    vocab: HFVocab

    @classmethod
    def open(cls, folder: Path) -> _HFSource:
        """Check everything that can be checked before reading the weights."""
        _check_hf_architecture(folder)
        cfg, _ = hf_config(folder)  # the remaining config checks (biases, RoPE scaling)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder} has no .safetensors files")
        headers = [h for f in files for h in read_safetensors_header(f).values()]
        dtypes = {_SAFETENSORS_FLOAT[h["dtype"]] for h in headers}
        return cls(
            folder,
            n_weights=sum(math.prod(h["shape"]) for h in headers),
            staging=dtypes.pop() if len(dtypes) == 1 else "f32",
            vocab=hf_vocab(folder, cfg.n_vocab),
        )

    def need_bytes(self, quant: str) -> int:
        staged = 0 if quant in FLOATS else _gguf_bytes(self.n_weights, self.staging)
        return _gguf_bytes(self.n_weights, quant) + staged

    def write(self, dst: Path, quant: str, report: Progress) -> None:
        if quant in FLOATS:
            self._write_float(dst, quant, report)
            return
        with scratch_path(dst) as staged:
            self._write_float(staged, self.staging, report)
            quantize_gguf(staged, dst, quant, report)

    def _write_float(self, dst: Path, quant: str, report: Progress) -> None:
        report("read", 0, 1)
        weights = load_hf_folder(self.folder, _NO_BUDGET)
        report("read", 1, 1)
        writer = gguf.GGUFWriter(dst, "llama")
        try:
            _add_hyperparameters(writer, weights.config, self.folder.name, quant)
            _add_tokenizer(writer, self.folder, self.vocab)
            _write_tensors(writer, _gguf_tensors(weights), QUANTS[quant][1], report)
        finally:
            writer.close()


def _check_hf_architecture(folder: Path) -> None:
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(
            f"{folder} has no config.json; pass a Hugging Face model folder (config.json, "
            "*.safetensors, tokenizer.json) or a .gguf file"
        )
    raw = json.loads(config.read_text())
    archs = raw.get("architectures") or [raw.get("model_type")]
    if not SUPPORTED_HF_ARCHS.intersection(archs):
        raise UserError(
            f"{folder}: cannot export {', '.join(map(str, archs))} to GGUF; supported "
            f"architectures are {', '.join(sorted(SUPPORTED_HF_ARCHS))}"
        )


def _add_hyperparameters(writer: gguf.GGUFWriter, cfg: LlamaConfig, name: str, quant: str) -> None:
    """The ``llama.*`` keys llama.cpp reads (what :func:`runtimes.weights.gguf_config` reads)."""
    writer.add_name(name)
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_ctx_train)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.n_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head_kv)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_rope_dimension_count(cfg.rope_dim)
    if cfg.rope_linear_scale != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_linear_scale)
    writer.add_vocab_size(cfg.n_vocab)
    writer.add_file_type(QUANTS[quant][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _gguf_tensors(w: LlamaWeights) -> dict[str, np.ndarray]:
    """GGUF tensor name → float32 array; no ``output.weight`` when the head is tied."""
    tensors = {"token_embd.weight": w.embed}
    if w.rope_freq_factors is not None:
        tensors["rope_freqs.weight"] = w.rope_freq_factors
    for i, layer in enumerate(w.layers):
        tensors |= {f"blk.{i}.{name}.weight": getattr(layer, f) for f, name in GGUF_LAYER.items()}
    tensors["output_norm.weight"] = w.out_norm
    if w.lm_head is not w.embed:
        tensors["output.weight"] = w.lm_head
    return tensors


def _write_tensors(
    writer: gguf.GGUFWriter, tensors: dict[str, np.ndarray], qtype: Q, report: Progress
) -> None:
    """Matrices as ``qtype``, vectors (norms, RoPE factors) as F32 as llama.cpp expects;
    each converted only when written, so one converted copy is in memory at a time."""
    types = {name: Q.F32 if a.ndim == 1 else qtype for name, a in tensors.items()}
    for name, a in tensors.items():
        nbytes = a.size * gguf.GGML_QUANT_SIZES[types[name]][1]
        writer.add_tensor_info(name, a.shape, np.dtype(np.float32), nbytes, raw_dtype=types[name])
    _write_header(writer)
    for done, (name, a) in enumerate(tensors.items(), 1):
        writer.write_tensor_data(_encode(a, types[name]))
        report("write", done, len(tensors))


def _encode(a: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F16:
        return a.astype(np.float16)
    if qtype == Q.BF16:
        return to_bf16_bits(a)
    return np.ascontiguousarray(a, dtype=np.float32)


# --- the tokenizer ----------------------------------------------------------------------


def hf_vocab(folder: Path, n_vocab: int | None = None) -> HFVocab:
    """``folder/tokenizer.json`` as GGUF tokens, token types and pre-tokenizer name.

    Ids without a token (a vocabulary padded to ``n_vocab`` rows) become ``[PAD{id}]``
    tokens of type UNUSED, as llama.cpp's converter writes them.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json; export needs the HF tokenizer")
    spec = json.loads(path.read_text())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    byte_level = model.get("type") == "BPE" and decoder.get("type") == "ByteLevel"
    if not byte_level or model.get("byte_fallback"):
        raise UserError(
            f"{path}: only byte-level BPE tokenizers (GPT-2 style) can be exported to GGUF; "
            f"this one is {model.get('type')} with a {decoder.get('type')} decoder"
        )
    if spec.get("normalizer"):
        raise UserError(f"{path}: a byte-level BPE GGUF has no normalizer; this tokenizer has "
                        f"{spec['normalizer'].get('type')}")
    ids = dict(model["vocab"]) | {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    pieces = {i: piece for piece, i in ids.items()}
    if n_vocab is not None and max(pieces) >= n_vocab:
        raise UserError(f"{path} has token ids up to {max(pieces)}, beyond the model's "
                        f"vocab_size of {n_vocab}")
    n = max(n_vocab or 0, max(pieces) + 1)
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    T = gguf.TokenType
    types = [
        T.UNUSED if i not in pieces
        else T.NORMAL if i not in added
        else T.CONTROL if added[i].get("special") else T.USER_DEFINED
        for i in range(n)
    ]  # fmt: skip
    tokens = [pieces.get(i, f"[PAD{i}]") for i in range(n)]
    return HFVocab(tokens, [int(t) for t in types], _pre_tokenizer(path, spec))


def _pre_tokenizer(path: Path, spec: dict) -> str:
    """llama.cpp's name for the HF pre-tokenizer, which must match one exactly."""
    steps = _pre_steps(spec.get("pre_tokenizer") or {})
    ignore_merges = bool(spec["model"].get("ignore_merges", False))
    name = _PRE_TOKENIZERS.get((steps, ignore_merges))
    if name is None:
        described = " + ".join(str(s[0]) for s in steps) or "none"
        raise UserError(
            f"{path}: its pre-tokenizer ({described}, ignore_merges={ignore_merges}) has no "
            f"llama.cpp equivalent this exporter knows ({', '.join(_PRE_TOKENIZERS.values())}); "
            "llama.cpp would split text differently from the HF tokenizer"
        )
    return name


def _pre_steps(pre: dict) -> tuple[tuple, ...]:
    """The settings of each pre-tokenizer step that change how text is split."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    out = []
    for s in steps:
        kind = s.get("type")
        if kind == "ByteLevel":
            out.append((kind, s.get("add_prefix_space", True), s.get("use_regex", True)))
        elif kind == "Digits":
            out.append((kind, s.get("individual_digits", False)))
        elif kind == "Split":
            pattern = s.get("pattern", {})
            out.append((kind, pattern.get("Regex", pattern.get("String")), s.get("behavior"),
                        s.get("invert", False)))
        else:
            out.append((kind,))
    return tuple(out)


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab: HFVocab) -> None:
    """Tokens, types, merges, special ids, add_bos and chat template of an HF folder.

    Merges, special ids (tokenizer_config.json, then config.json), add_bos/add_eos and the
    chat template are read by gguf-py's ``SpecialVocab``, the code llama.cpp's converter
    uses. add_bos is written even when the folder does not say: HF then adds no BOS, and
    llama.cpp's default for a pre-tokenizer may differ.
    """
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(vocab.tokens))
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(False)
