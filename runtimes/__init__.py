"""Inference engines behind one :class:`~runtimes.base.Backend` protocol, one module each."""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from edgespec.errors import UserError
from runtimes.base import Backend, MemoryReport, Sizing, TokenizerInfo
from runtimes.formats import FORMATS, MANIFEST

# backend name → (module, class); a new engine is one module plus one line here
BACKENDS = {
    "llamacpp": ("runtimes.llamacpp", "LlamaCppBackend"),
    "onnx": ("runtimes.onnxrt", "OnnxBackend"),
    "openvino": ("runtimes.openvino", "OpenVinoBackend"),
    "reference": ("runtimes.reference", "ReferenceBackend"),
}
_BY_SUFFIX = {".gguf": ("llamacpp", "reference"), ".onnx": ("onnx",), ".xml": ("openvino",)}
# an export directory names its engine in its manifest (edgespec.json "format")
_BY_FORMAT = {fmt.name: backend for backend, fmt in FORMATS.items()}


def backend_for(path: Path, requested: str = "auto") -> str:
    """The backend to use for ``path``: the requested one, or the first installed that fits."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise UserError(f"unknown backend {requested!r}; choose one of: {', '.join(BACKENDS)}")
        return requested
    if path.is_dir():
        return _by_manifest(path)
    candidates = _BY_SUFFIX.get(path.suffix.lower())
    if candidates is None:
        raise UserError(f"{path}: unsupported model format {path.suffix!r}; pass a .gguf file")
    for name in candidates:
        if name != "llamacpp" or importlib.util.find_spec("llama_cpp") is not None:
            return name
    return candidates[-1]


def _by_manifest(directory: Path) -> str:
    """The backend of an edgespec export directory, from its manifest's format."""
    try:
        fmt = json.loads((directory / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt not in _BY_FORMAT:
        raise UserError(f"{directory} is not an edgespec export (no edgespec.json naming "
                        f"one of {', '.join(_BY_FORMAT)}); export it first "
                        f"(edgespec export {directory} --to gguf -o model.gguf) or pass a .gguf")
    return _BY_FORMAT[fmt]


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (a key of :data:`BACKENDS`), imported on first use."""
    module_name, class_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"the {name} backend is not available here: {e}") from None
    return getattr(module, class_name)


def open_backend(path: Path, backend: str = "auto", **options) -> Backend:
    """Load ``path`` with the chosen engine; ``options`` go to the backend's constructor."""
    return backend_class(backend_for(path, backend))(path, **options)


def estimate_memory(path: Path, backend: str, sizings: Sequence[Sizing],
                    limit: int | None = None) -> list[MemoryReport]:
    """What :func:`open_backend` with each sizing would allocate, without allocating it (an
    estimate that runs the engine stays under ``limit`` bytes)."""
    return backend_class(backend_for(path, backend)).estimate_memory(path, sizings, limit)


def model_vocab_size(path: Path, backend: str) -> int:
    """Rows of the logits ``path`` gives on ``backend``, without loading it."""
    return backend_class(backend_for(path, backend)).model_vocab_size(path)


__all__ = ["BACKENDS", "Backend", "MemoryReport", "Sizing", "TokenizerInfo", "backend_class",
           "backend_for", "estimate_memory", "model_vocab_size", "open_backend"]
