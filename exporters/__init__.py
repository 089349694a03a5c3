"""Exporters: a model a user has (GGUF or HF folder) → what an edge device runs, plus a draft.

One module per format (``gguf``, ``onnx``, ``openvino``) and ``drafts`` for self-derived
drafts; :func:`export_model` is the single entry the ``edgespec export`` command calls.
Every output is written atomically (``exporters.atomic``): it appears complete or not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgespec.errors import UserError
from runtimes.formats import Exporter

Progress = Callable[[str, int, int], None]
"""A progress callback: stage name ("read", "write", "quantize", "copy", "export"), done,
total — what a progress bar per stage needs. Stages without finer steps report 0 of 1, then
1 of 1."""

# format → (default quantization, quantizations it accepts)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gguf": ("q4_k_m", ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m")),
    "onnx": ("int4", ("fp32", "int8", "int4")),
    "openvino": ("int8", ("fp32", "fp16", "int8", "int4")),
}


@dataclass(frozen=True)
class DraftSpec:
    """``early-exit:E`` (first E layers of the target) or ``quant[:Q]`` (a lower-bit copy)."""

    kind: str
    exit_layer: int | None = None
    quant: str | None = None

    @classmethod
    def parse(cls, text: str) -> DraftSpec:
        kind, _, arg = text.partition(":")
        if kind == "early-exit":
            if not arg.isdigit() or int(arg) < 1:
                raise UserError(f"--with-draft early-exit needs a layer count, e.g. early-exit:4 "
                                f"(got {text!r})")
            return cls("early-exit", exit_layer=int(arg))
        if kind == "quant":
            return cls("quant", quant=arg or None)
        raise UserError(f"unknown draft {text!r}; use early-exit:E or quant[:TYPE]")


def on_the_fly(backend: str) -> Exporter | None:
    """The exporter an engine that runs exports needs for a model that is not one (a GGUF
    or an HF folder), at its exact default (float32 ONNX, fp16 OpenVINO); None for an engine
    that reads the model as it is."""
    if backend == "onnx":
        from exporters.onnx import export_onnx

        return export_onnx
    if backend == "openvino":
        from exporters.openvino import export_openvino

        return export_openvino
    return None


def no_progress(stage: str, done: int, total: int) -> None:
    """The default callback: exports report progress only to a caller that asks for it."""


def export_model(
    src: str | Path,
    out: str | Path,
    *,
    to: str,
    quant: str | None = None,
    draft: DraftSpec | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> list[Path]:
    """Export ``src`` to ``out`` in format ``to``; returns every path written (model, draft).

    ONNX and OpenVINO keep an early-exit draft inside the export directory (ONNX's graph
    points into the target's weight file, OpenVINO's has its own ``exit{E}.bin``); a GGUF
    draft is a second file beside ``out``.
    """
    src, out = Path(src), Path(out)
    if to not in FORMATS:
        raise UserError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    default, accepted = FORMATS[to]
    quant = quant or default
    if quant not in accepted:
        raise UserError(f"{to} exports take --quant {'|'.join(accepted)} (got {quant!r})")
    if not src.exists():
        raise UserError(f"model not found: {src}")
    progress = progress or no_progress
    exits = draft.exit_layer if draft is not None and draft.kind == "early-exit" else None
    if exits is not None:  # checked before anything is written
        from exporters.drafts import check_exit_layer

        check_exit_layer(src, exits)
    written = [_export_target(src, out, to, quant, exits if to != "gguf" else None, force,
                              progress)]
    if draft is not None and (to == "gguf" or draft.kind == "quant"):
        written.append(_export_draft(src, out, to, quant, draft, force, progress))
    return written


def _export_target(src: Path, out: Path, to: str, quant: str, exit_layer: int | None,
                   force: bool, progress: Progress) -> Path:
    if to == "gguf":
        from exporters.gguf import export_gguf

        return export_gguf(src, out, quant=quant, force=force, progress=progress)
    if to == "onnx":
        from exporters.onnx import export_onnx

        progress("export", 0, 1)
        path = export_onnx(src, out, quant=quant, early_exit=exit_layer, force=force)
        progress("export", 1, 1)
        return path
    from exporters.openvino import export_openvino

    return export_openvino(src, out, quant=quant, early_exit=exit_layer, force=force,
                           progress=lambda line: progress(line, 1, 1))  # one line a stage


def _export_draft(src: Path, out: Path, to: str, quant: str, draft: DraftSpec, force: bool,
                  progress: Progress) -> Path:
    """The draft beside ``out``: ``NAME.draft-exitE.gguf`` or ``NAME.draft-Q`` (+ suffix)."""
    from exporters.drafts import export_draft

    if to == "openvino":
        raise UserError("OpenVINO exports take early-exit drafts only (--with-draft early-exit:E)")
    draft_quant = draft.quant if draft.kind == "quant" else (quant if to == "gguf" else None)
    tag = f"exit{draft.exit_layer}" if draft.kind == "early-exit" else (draft_quant or "quant")
    target = out.with_name(f"{out.stem}.draft-{tag}{out.suffix}")
    return export_draft(src, target, fmt=to, kind=draft.kind, exit_layer=draft.exit_layer,
                        quant=draft_quant, force=force, progress=progress)
