"""Byte-level BPE tokenization for the reference backend, without llama.cpp.

The reference backend is the oracle other engines are checked against, so it must not
borrow llama.cpp's tokenizer. Encoding uses Hugging Face ``tokenizers`` (an optional
dependency, a Rust wheel that runs on phones too), rebuilt from the GGUF's own vocabulary
and merges; decoding is a plain table lookup (GPT-2's byte ↔ unicode map) so ``detokenize``
works without any package and returns raw bytes that may end mid-character.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import gguf

from edgespec.errors import UserError
from runtimes.base import TokenizerInfo

# llama.cpp pre-tokenizer names whose rule is "digits one by one, then GPT-2's regex".
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder"})
_GPT2_PRE = frozenset({"gpt-2"})
_CONTROL = 3  # llama.cpp token type: rendered as nothing by detokenize, parsed only if special


def _byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters back to byte values."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class ByteLevelTokenizer:
    """Encode with a ``tokenizers.Tokenizer``; decode token pieces through the byte map."""

    def __init__(self, encoder: object, pieces: list[str], control: set[int]) -> None:
        self._encoder = encoder
        self._decoder = _byte_decoder()
        self._control = control
        self._pieces = pieces

    def encode(self, text: str, *, special: bool) -> list[int]:
        """Token ids; with ``special`` false, ``<|im_end|>`` in text is plain characters."""
        self._encoder.encode_special_tokens = not special
        return list(self._encoder.encode(text, add_special_tokens=False).ids)

    def to_hf_json(self) -> str:
        """This tokenizer as a Hugging Face ``tokenizer.json`` (to export a HF model folder)."""
        return self._encoder.to_str()

    def decode(self, ids: Sequence[int]) -> bytes:
        """Raw bytes; control tokens render as nothing, as llama.cpp renders them."""
        out = bytearray()
        for i in ids:
            if i not in self._control:
                piece = self._pieces[i]
                out += bytes(self._decoder[c] for c in piece if c in self._decoder)
        return bytes(out)


def _require_tokenizers() -> object:
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise UserError(
            "the reference backend tokenizes with the `tokenizers` package: pip install tokenizers"
        ) from e
    return tokenizers


def gguf_tokenizer(reader: gguf.GGUFReader) -> tuple[ByteLevelTokenizer, TokenizerInfo]:
    """Rebuild the GGUF's byte-level BPE tokenizer and its special-token facts."""

    def value(key: str, default: object = None) -> object:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    model, pre = value("tokenizer.ggml.model"), value("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in _DIGIT_SPLIT_PRE | _GPT2_PRE:
        raise UserError(
            f"the reference backend tokenizes byte-level BPE only (gpt2 model with pre-tokenizer "
            f"{sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE)}); this GGUF has {model!r}/{pre!r}"
        )
    tk = _require_tokenizers()
    pieces = list(value("tokenizer.ggml.tokens"))
    types = list(value("tokenizer.ggml.token_type", [1] * len(pieces)))
    merges = [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges", [])]
    encoder = tk.Tokenizer(tk.models.BPE({p: i for i, p in enumerate(pieces)}, merges))
    steps = [tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre in _DIGIT_SPLIT_PRE:
        steps.insert(0, tk.pre_tokenizers.Digits(individual_digits=True))
    encoder.pre_tokenizer = tk.pre_tokenizers.Sequence(steps)
    encoder.decoder = tk.decoders.ByteLevel()
    special = [i for i, t in enumerate(types) if t in (_CONTROL, 4)]
    encoder.add_special_tokens([tk.AddedToken(pieces[i], normalized=False) for i in special])
    control = {i for i, t in enumerate(types) if t == _CONTROL}
    eos = {value(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")}
    info = TokenizerInfo(
        bos_id=value("tokenizer.ggml.bos_token_id"),
        eos_ids=frozenset(int(e) for e in eos if e is not None),
        add_bos=bool(value("tokenizer.ggml.add_bos_token", False)),
        chat_template=value("tokenizer.chat_template"),
        special_texts={i: pieces[i] for i in special},
    )
    return ByteLevelTokenizer(encoder, pieces, control), info


def hf_tokenizer(folder: Path, config: dict) -> tuple[ByteLevelTokenizer, TokenizerInfo]:
    """The folder's ``tokenizer.json`` (byte-level BPE only) and its special-token facts."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json")
    spec = json.loads(path.read_text())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{path}: the reference backend reads byte-level BPE tokenizers only")
    encoder = _require_tokenizers().Tokenizer.from_file(str(path))
    vocab = encoder.get_vocab(with_added_tokens=True)
    pieces = [""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        pieces[i] = piece
    control = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    eos = config.get("eos_token_id")
    info = TokenizerInfo(
        bos_id=config.get("bos_token_id"),
        eos_ids=frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
        chat_template=tok_cfg.get("chat_template"),
        special_texts={i: pieces[i] for i in sorted(control)},
    )
    return ByteLevelTokenizer(encoder, pieces, control), info
