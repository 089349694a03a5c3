"""A fast, defensive read of a GGUF header: what a model is, and whether it is safe to load.

llama.cpp aborts the whole process (no exception) on some malformed files — notably a
vocabulary whose declared tokenizer model cannot encode every byte. Everything a loader
needs to refuse such a file with a clear message is in the header, so this module parses
it with ``struct`` from a memory map (the gguf package's reader takes seconds on a 49k
vocabulary; this takes milliseconds) and checks it before any engine touches the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from edgespec.errors import UserError

_MAGIC = b"GGUF"
_SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"
}
_STRING, _ARRAY = 8, 9
_TOKENIZER_MODELS = {"llama", "gpt2", "bert", "t5", "rwkv", "plamo2", "none", "no_vocab"}
# SentencePiece-style models fall back to byte tokens for text the merges cannot cover;
# llama.cpp looks those up with std::map::at, so a missing one terminates the process.
_BYTE_FALLBACK_MODELS = {"llama", "t5"}


@dataclass
class GGUFInfo:
    """The header of a GGUF file: metadata values and tensor layout."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], GGMLQuantizationType, int]] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def tokens(self) -> list[str]:
        return self.metadata.get("tokenizer.ggml.tokens", [])

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """KV cache bytes one token costs across all layers (f16 cache by default)."""
        n_layer = int(self.arch_value("block_count", 0))
        n_embd = int(self.arch_value("embedding_length", 0))
        n_head = int(self.arch_value("attention.head_count", 1) or 1)
        n_head_kv = int(self.arch_value("attention.head_count_kv", n_head) or n_head)
        head_k = int(self.arch_value("attention.key_length", n_embd // n_head))
        head_v = int(self.arch_value("attention.value_length", n_embd // n_head))
        return n_layer * n_head_kv * (head_k + head_v) * bytes_per_value


# Bounds after ollama's reader (a CVE taught it to bound them): no real model comes near.
MAX_STRING = 16 * 2**20
MAX_ARRAY = 64 * 2**20
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 2**50  # of one tensor: ggml's sizes are int64 byte counts
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: llama.cpp asserts (aborts) above it
# ggml's CPU ops abort on weights of these types (an I32 norm weight: "unsupported types")
_NOT_WEIGHTS = {GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                GGMLQuantizationType.I64, GGMLQuantizationType.F64}


def _shown(value: Any) -> str:
    """A name or value from the file for a message: quoted and cut short, since it may
    hold anything (newlines, a million elements)."""
    if isinstance(value, str) and len(value) > 64:
        value = value[:64] + "..."
    if isinstance(value, list) and len(value) > 8:
        value = [*value[:8], "..."]
    return repr(value)[:120]


class _Cursor:
    """Reads GGUF values, refusing any length the rest of the file cannot hold."""

    def __init__(self, buf: bytes | mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            raise ValueError(f"{what} runs past the end of the file")

    def scalar(self, code: str) -> Any:
        size = struct.calcsize(code)
        self.need(size, "a value")
        value = struct.unpack_from("<" + code, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str = "a string") -> str:
        n = self.scalar("Q")
        if n > MAX_STRING:
            raise ValueError(f"{what} claims {n:,} bytes (at most {MAX_STRING:,})")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        """The value of metadata entry ``key`` (already quoted for messages)."""
        if vtype == _STRING:
            return self.string(key)
        if vtype != _ARRAY:
            if vtype not in _SCALARS:
                raise ValueError(f"{key} has unknown value type {vtype}")
            return self.scalar(_SCALARS[vtype])
        sub, count = self.scalar("I"), self.scalar("Q")
        if count > MAX_ARRAY:
            raise ValueError(f"{key} claims {count:,} elements (at most {MAX_ARRAY:,})")
        if sub in _SCALARS:
            code = _SCALARS[sub]
            self.need(count * struct.calcsize(code), key)
            values = list(struct.unpack_from(f"<{count}{code}", self.buf, self.pos))
            self.pos += count * struct.calcsize(code)
            return values
        if sub != _STRING:
            raise ValueError(f"{key} is an array of unsupported type {sub}")
        self.need(count * 8, key)  # every string starts with its length
        return [self.string(key) for _ in range(count)]


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse and check a GGUF header; :class:`UserError` if the file is not usable."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) != _MAGIC:
                raise UserError(f"{path} is not a GGUF file (bad magic); pass a .gguf model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return check_gguf(path, buf)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def check_gguf(path: Path, buf: bytes | mmap.mmap) -> GGUFInfo:
    """The checks of :func:`read_gguf` on a file's bytes (the fuzz tests call it directly).

    A file that passes is one llama.cpp reads without running past a buffer: lengths and
    counts within bounds and within the file, every tensor of a known type, aligned and
    inside the file, shapes that match the hyperparameters, a tokenizer llama.cpp can use.
    """
    if buf[:4] != _MAGIC:
        raise UserError(f"{path} is not a GGUF file (bad magic); pass a .gguf model")
    try:
        info = _parse(path, buf)
    except (struct.error, ValueError, OverflowError, MemoryError) as e:
        raise UserError(f"{path} is a corrupt or truncated GGUF file ({e})") from None
    _check_size(info, len(buf))
    _check_tokenizer(info)
    _check_hparams(info)
    return info


def _parse(path: Path, buf: bytes | mmap.mmap) -> GGUFInfo:
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.scalar("I")
    if version not in (2, 3):
        raise UserError(f"{path} has GGUF version {version}; only versions 2 and 3 are supported")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    cur.need(n_kv * 12, f"the table of {n_kv:,} metadata entries")  # key length + value type
    cur.need(n_tensors * 32, f"the table of {n_tensors:,} tensor descriptions")  # the smallest one
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        if key in metadata:
            raise ValueError(f"metadata key {_shown(key)} appears twice")
        metadata[key] = cur.value(cur.scalar("I"), _shown(key))
    tensors = {}
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        shown = _shown(name)
        if name in tensors:
            raise ValueError(f"tensor {shown} appears twice")
        dims, qtype = _dims(cur, shown), _tensor_type(cur.scalar("I"), shown)
        if len(dims) == 1 and qtype != GGMLQuantizationType.F32:
            # ggml's CPU ops abort on it ("binary_op: unsupported types"); converters write
            # every 1-D tensor as F32
            raise ValueError(f"tensor {shown} is a vector in {qtype.name}; norms and biases "
                             "are F32 in every model file")
        tensors[name] = (dims, qtype, cur.scalar("Q"))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ValueError(f"general.alignment = {_shown(align)} is not a power of two")
    data_start = (cur.pos + align - 1) // align * align
    for name, (_, _, offset) in tensors.items():
        if offset % align:
            raise ValueError(f"tensor {_shown(name)} starts at offset {offset}, "
                             f"not a multiple of {align}")
    tensors = {k: (d, t, data_start + off) for k, (d, t, off) in tensors.items()}
    return GGUFInfo(path, metadata, tensors)


def _dims(cur: _Cursor, name: str) -> tuple[int, ...]:
    n_dims = cur.scalar("I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise ValueError(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
    dims = tuple(cur.scalar("Q") for _ in range(n_dims))
    elements = 1
    for d in dims:
        elements *= d
    if not 0 < elements <= MAX_ELEMENTS:
        raise ValueError(f"tensor {name} has shape {list(dims)}")
    return dims


def _tensor_type(value: int, name: str) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(value)
    except ValueError:
        raise ValueError(f"tensor {name} has unknown type {value}") from None
    if qtype not in GGML_QUANT_SIZES or qtype in _NOT_WEIGHTS:
        raise ValueError(f"tensor {name} has type {qtype.name}, which no model file uses")
    return qtype


def _tensor_bytes(name: str, dims: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if dims[0] % block:
        raise UserError(f"tensor {_shown(name)}: a row of {dims[0]} values is not a whole number "
                        f"of {qtype.name} blocks of {block}; the file is corrupt")
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def _check_size(info: GGUFInfo, file_size: int) -> None:
    """A download cut short leaves the header intact but the tensor data short."""
    end = max((off + _tensor_bytes(name, d, t) for name, (d, t, off) in info.tensors.items()),
              default=0)
    if end > file_size:
        raise UserError(
            f"{info.path} is truncated: its tensors need {end:,} bytes but the file has "
            f"{file_size:,}; download or export it again"
        )


def _check_hparams(info: GGUFInfo) -> None:
    """Shapes that contradict the hyperparameters: llama.cpp trusts the hyperparameters."""
    arch = info.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise UserError(f"{info.path} names no architecture (general.architecture)")
    arch = _shown(arch)[1:-1]
    # a missing key is llama.cpp's to report (it does, as an error); a wrong one is ours
    for key in ("block_count", "embedding_length"):
        value = info.arch_value(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{info.path}: {arch}.{key} = {_shown(value)}; "
                            "it must be a positive count")
    n_layer, n_embd = info.arch_value("block_count"), info.arch_value("embedding_length")
    if n_layer is not None and n_layer > MAX_LAYERS:
        raise UserError(f"{info.path}: {arch}.block_count = {n_layer}; llama.cpp runs at most "
                        f"{MAX_LAYERS} layers")
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        eps = info.arch_value(key)
        if eps is not None and not (isinstance(eps, float) and 0 <= eps < 1):
            raise UserError(f"{info.path}: {arch}.{key} = {_shown(eps)}; "
                            "it must be a small non-negative number")
    for name in info.tensors:
        layer = name.split(".")[1] if name.startswith("blk.") else "0"
        if not layer.isdigit() or n_layer is not None and int(layer) >= n_layer:
            raise UserError(f"{info.path}: tensor {_shown(name)} is outside the {n_layer} layers "
                            f"{arch}.block_count declares")
    n_vocab = len(info.tokens)
    declared = info.arch_value("vocab_size", n_vocab)
    embedding = info.tensors.get("token_embd.weight")
    if embedding is not None and n_embd is not None and embedding[0][:2] != (n_embd, n_vocab):
        raise UserError(f"{info.path}: token_embd.weight has shape {list(embedding[0])} but the "
                        f"model declares {n_embd} x {n_vocab} tokens")
    if declared != n_vocab:
        raise UserError(f"{info.path}: {arch}.vocab_size = {_shown(declared)} but the tokenizer "
                        f"has {n_vocab} tokens")


def _check_tokenizer(info: GGUFInfo) -> None:
    """Refuse vocabularies llama.cpp would abort on or index out of bounds with."""
    model = info.metadata.get("tokenizer.ggml.model")
    tokens = info.tokens
    if model is None or not tokens:
        raise UserError(f"{info.path} has no tokenizer (tokenizer.ggml.*); re-export it with one")
    if model not in _TOKENIZER_MODELS:
        raise UserError(f"{info.path} declares an unknown tokenizer model {_shown(str(model))}")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{info.path}: tokenizer.ggml.tokens is not a list of strings")
    if len(set(tokens)) != len(tokens):  # llama.cpp asserts one id per token text
        seen: set[str] = set()
        twice = next(t for t in tokens if t in seen or seen.add(t))
        raise UserError(f"{info.path}: the vocabulary has the token {_shown(twice)} twice "
                        f"(token {tokens.index(twice)} and a later one); the file is corrupt")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        values = info.metadata.get(key)
        if values is not None and (not isinstance(values, list) or len(values) != len(tokens)):
            length = len(values) if isinstance(values, list) else "no"
            raise UserError(f"{info.path}: {key} has {length} entries for {len(tokens)} tokens")
    merges = info.metadata.get("tokenizer.ggml.merges")
    if model == "gpt2" and (not isinstance(merges, list) or not merges):
        raise UserError(f"{info.path}: its BPE ('gpt2') tokenizer has no merges "
                        "(tokenizer.ggml.merges); re-export the GGUF")
    missing = 0
    if model in _BYTE_FALLBACK_MODELS:
        vocab = set(tokens)
        missing = sum(f"<0x{b:02X}>" not in vocab and chr(b) not in vocab for b in range(256))
    if missing:
        raise UserError(
            f"{info.path}: its {model!r} tokenizer cannot encode {missing} of the 256 byte values "
            "(the vocabulary does not match the declared tokenizer model, which crashes "
            "llama.cpp); re-export the GGUF with the tokenizer's real type"
        )
    for key, token_id in info.metadata.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and (
                not isinstance(token_id, int) or not 0 <= token_id < len(tokens)):
            raise UserError(f"{info.path}: {_shown(key)} = {_shown(token_id)} "
                            "is outside the vocabulary")
