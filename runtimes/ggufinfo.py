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


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, code: str) -> Any:
        value = struct.unpack_from("<" + code, self.buf, self.pos)[0]
        self.pos += struct.calcsize(code)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub, count = self.scalar("I"), self.scalar("Q")
            if sub in _SCALARS:
                code = _SCALARS[sub]
                values = list(struct.unpack_from(f"<{count}{code}", self.buf, self.pos))
                self.pos += count * struct.calcsize(code)
                return values
            return [self.value(sub) for _ in range(count)]
        return self.scalar(_SCALARS[vtype])


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse and sanity-check a GGUF header; :class:`UserError` if the file is not usable."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) != _MAGIC:
                raise UserError(f"{path} is not a GGUF file (bad magic); pass a .gguf model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                info = _parse(path, buf)
                size = len(buf)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (struct.error, KeyError, ValueError, OverflowError, MemoryError) as e:
        raise UserError(f"{path} is a corrupt or truncated GGUF file ({e})") from None
    _check_size(info, size)
    _check_tokenizer(info)
    return info


def _parse(path: Path, buf: mmap.mmap) -> GGUFInfo:
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.scalar("I")
    if version not in (2, 3):
        raise UserError(f"{path} has GGUF version {version}; only versions 2 and 3 are supported")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"))
    tensors = {}
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.scalar("Q") for _ in range(cur.scalar("I")))
        qtype = GGMLQuantizationType(cur.scalar("I"))
        tensors[name] = (dims, qtype, cur.scalar("Q"))
    align = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    tensors = {k: (d, t, data_start + off) for k, (d, t, off) in tensors.items()}
    return GGUFInfo(path, metadata, tensors)


def _tensor_bytes(dims: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def _check_size(info: GGUFInfo, file_size: int) -> None:
    """A download cut short leaves the header intact but the tensor data short."""
    end = max((off + _tensor_bytes(d, t) for d, t, off in info.tensors.values()), default=0)
    if end > file_size:
        raise UserError(
            f"{info.path} is truncated: its tensors need {end:,} bytes but the file has "
            f"{file_size:,}; download or export it again"
        )


def _check_tokenizer(info: GGUFInfo) -> None:
    """Refuse vocabularies that would make llama.cpp abort while tokenizing."""
    model = info.metadata.get("tokenizer.ggml.model")
    tokens = info.tokens
    if model is None or not tokens:
        raise UserError(f"{info.path} has no tokenizer (tokenizer.ggml.*); re-export it with one")
    if model not in _TOKENIZER_MODELS:
        raise UserError(f"{info.path} declares an unknown tokenizer model {model!r}")
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
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        token_id = info.metadata.get(key)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise UserError(f"{info.path}: {key} = {token_id} is outside the vocabulary")
