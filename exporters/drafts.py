"""Self-derived drafts: a target model's own first layers, or a lower-bit copy of it.

No second model and no training. An *early-exit* draft keeps the target's first E blocks
with its final norm and LM head (self-speculation as in LayerSkip or Kangaroo); a
*quant* draft is the same weights at fewer bits, cheaper to evaluate and mostly agreeing.
Either way the draft's vocabulary is the target's: speculation compares token ids, so a
draft with another vocabulary would be silently useless. The exporter checks that
identity and records it in the output — GGUF keys ``edgespec.draft.*``, or a ``draft``
entry in an ONNX export's edgespec.json — and :func:`check_same_vocab` lets a runtime
refuse a separate draft model that does not share it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from edgespec.errors import UserError
from exporters import Progress, no_progress
from exporters.atomic import atomic_output, check_disk_space, scratch_path
from exporters.gguf import (
    check_gguf_source,
    check_output,
    check_quant,
    copy_gguf,
    export_gguf,
    hf_vocab,
    quantize_gguf,
)
from runtimes.ggufinfo import read_gguf
from runtimes.weights import hf_config

KINDS = ("early-exit", "quant")
FORMATS = ("gguf", "onnx")
KEY_KIND = "edgespec.draft.kind"
KEY_VOCAB = "edgespec.draft.target_vocab_sha256"
KEY_EXIT = "edgespec.draft.exit_layer"
DEFAULT_QUANT = {"gguf": "q4_0", "onnx": "int4"}  # a quant draft's type when none is given
_CHECK_HINT = "use a draft exported from the target (edgespec export --with-draft)"


def export_draft(
    target: str | Path,
    out: str | Path,
    *,
    fmt: str = "gguf",
    kind: str = "early-exit",
    exit_layer: int | None = None,
    quant: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write a draft of ``target`` (GGUF or HF folder) to ``out``; returns ``out``.

    ``kind="early-exit"`` needs ``exit_layer`` (1 .. layers - 1); ``quant`` optionally
    quantizes it too (a GGUF draft otherwise keeps the target's tensor types; an HF
    target is written as f16). ``kind="quant"`` is the whole target as ``quant``
    (default :data:`DEFAULT_QUANT`). ``fmt="onnx"`` delegates to the ONNX exporter,
    whose early-exit graph shares the target's weights.
    """
    target, out = Path(target), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"unknown draft format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if kind not in KINDS:
        raise UserError(f"unknown draft kind {kind!r}; choose one of {', '.join(KINDS)}")
    if fmt == "gguf" and quant is not None:
        check_quant(quant)
    if not target.exists():
        raise UserError(f"model not found: {target}")
    meta: dict[str, object] = {KEY_KIND: kind, KEY_VOCAB: vocab_sha256(token_list(target))}
    if kind == "early-exit":
        meta[KEY_EXIT] = check_exit_layer(target, exit_layer)
    else:
        quant = quant or DEFAULT_QUANT[fmt]
    export = _gguf_draft if fmt == "gguf" else _onnx_draft
    export(target, out, meta, quant, force, progress or no_progress)
    return out


def token_list(path: Path) -> list[str]:
    """The vocabulary in id order of a GGUF file or of a folder with a tokenizer.json
    (an HF model, padded to its config's vocab_size as its GGUF would be, or an ONNX export)."""
    if not path.is_dir():
        return read_gguf(path).tokens
    config = path / "config.json"
    n_vocab = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    return hf_vocab(path, n_vocab).tokens


def vocab_sha256(tokens: list[str]) -> str:
    """A digest of the token list (JSON-encoded, so no two lists share an encoding)."""
    return hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode()).hexdigest()


def check_same_vocab(target_path: str | Path, draft_path: str | Path) -> str:
    """Refuse a draft whose vocabulary is not the target's; returns the shared digest."""
    target, draft = token_list(Path(target_path)), token_list(Path(draft_path))
    if target != draft:
        raise UserError(
            f"draft vocabulary differs from the target's: {_first_difference(target, draft)}; "
            f"{_CHECK_HINT}"
        )
    return vocab_sha256(target)


def _first_difference(target: list[str], draft: list[str]) -> str:
    for i, (a, b) in enumerate(zip(target, draft)):
        if a != b:
            return f"token {i} is {b!r} in the draft and {a!r} in the target"
    return f"the draft has {len(draft)} tokens, the target {len(target)}"


def _n_layers(target: Path) -> int:
    if target.is_dir():
        return hf_config(target)[0].n_layer
    return int(check_gguf_source(target).arch_value("block_count"))


def check_exit_layer(target: Path, exit_layer: int | None) -> int:
    """``exit_layer`` if the target has more layers than that (an exit must drop some)."""
    n = _n_layers(target)
    if exit_layer is None or not 1 <= exit_layer < n:
        raise UserError(
            f"an early-exit draft of this {n}-layer model needs an exit layer in 1..{n - 1}, "
            f"got {exit_layer}"
        )
    return exit_layer


def _gguf_draft(
    target: Path, out: Path, meta: dict[str, object], quant: str | None, force: bool,
    report: Progress,
) -> None:
    """A labelled (and, for early exit, truncated) GGUF copy, quantized when asked.

    A GGUF target is cut first and quantized after, so only the kept layers are
    quantized; an HF target or a quant draft goes through :func:`export_gguf` first.
    """
    with atomic_output(out, force=force) as tmp, scratch_path(tmp) as staged:
        src = target
        if target.is_dir() or meta[KEY_KIND] == "quant":
            src = export_gguf(target, staged, quant=quant or "f16", force=True, progress=report)
            quant = None
        check_disk_space(out.parent, 2 * src.stat().st_size, f"a draft of {target.name}")
        metadata, keep = dict(meta), None
        if KEY_EXIT in meta:
            exit_layer = int(meta[KEY_EXIT])
            metadata[f"{read_gguf(src).architecture}.block_count"] = exit_layer
            keep = _first_blocks(exit_layer)
        copy_gguf(src, tmp if quant is None else staged, metadata=metadata, keep=keep,
                  report=report)
        if quant is not None:
            quantize_gguf(staged, tmp, quant, report)
        check_output(tmp, out)


def _first_blocks(n: int) -> Callable[[str], bool]:
    """The tensors of an exit after block ``n``: blocks 0..n-1 and everything outside blocks."""
    return lambda name: not name.startswith("blk.") or int(name.split(".")[1]) < n


def _onnx_draft(
    target: Path, out: Path, meta: dict[str, object], quant: str | None, force: bool,
    report: Progress,
) -> None:
    """The ONNX exporter's output (early exit: full model + exit graph) plus a draft entry."""
    from exporters.onnx import export_onnx
    from runtimes.formats import MANIFEST

    draft = {key.removeprefix("edgespec.draft."): value for key, value in meta.items()}
    with atomic_output(out, force=force, directory=True) as tmp:
        report("export", 0, 1)
        export_onnx(target, tmp, quant=quant or "fp32", early_exit=draft.get("exit_layer"),
                    force=True)
        manifest = tmp / MANIFEST
        manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"draft": draft},
                                       indent=1))
        report("export", 1, 1)
