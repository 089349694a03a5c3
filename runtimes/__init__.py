"""Inference engines behind one :class:`~runtimes.base.Backend` protocol, one module each."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from edgespec.errors import UserError
from runtimes.base import Backend, MemoryReport, TokenizerInfo

# backend name → (module, class); a new engine is one module plus one line here
BACKENDS = {
    "llamacpp": ("runtimes.llamacpp", "LlamaCppBackend"),
    "onnx": ("runtimes.onnxrt", "OnnxBackend"),
    "reference": ("runtimes.reference", "ReferenceBackend"),
}
_BY_SUFFIX = {".gguf": ("llamacpp", "reference"), ".onnx": ("onnx",)}


def backend_for(path: Path, requested: str = "auto") -> str:
    """The backend to use for ``path``: the requested one, or the first installed that fits."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise UserError(f"unknown backend {requested!r}; choose one of: {', '.join(BACKENDS)}")
        return requested
    candidates = _BY_SUFFIX.get(path.suffix.lower())
    if candidates is None:
        raise UserError(f"{path}: unsupported model format {path.suffix!r}; pass a .gguf file")
    for name in candidates:
        if name != "llamacpp" or importlib.util.find_spec("llama_cpp") is not None:
            return name
    return candidates[-1]


def open_backend(path: Path, backend: str = "auto", **options) -> Backend:
    """Load ``path`` with the chosen engine; ``options`` go to the backend's constructor."""
    name = backend_for(path, backend)
    module_name, class_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"the {name} backend is not available here: {e}") from None
    return getattr(module, class_name)(path, **options)


__all__ = ["BACKENDS", "Backend", "MemoryReport", "TokenizerInfo", "backend_for", "open_backend"]
