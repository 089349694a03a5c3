"""Early exit: the target drafts for itself, cut after one of its layers (self-speculation).

No second model and no memory of its own: the exit's layers read the KV cache the full
model wrote for the context, so only the drafted chain is computed, through the first E
layers, the final norm and the LM head (:meth:`Backend.draft_logits`). Nothing is kept for
the chain, so each pass runs the chain drafted so far, a few tokens. Engines whose graph
has no exit (llama.cpp) take a draft model instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edgespec.drafting.draft_model import ModelDrafter
from edgespec.errors import UserError
from runtimes.base import Backend

PREFIX = "early-exit"


class EarlyExit:
    """The target cut after ``exit_layer`` blocks, as a :class:`DraftSource`."""

    def __init__(self, backend: Backend, exit_layer: int) -> None:
        layers = list(backend.exit_layers)
        if not layers:
            raise UserError(f"the {backend.name} backend has no early exit inside the model; "
                            "export one (export --with-draft early-exit:E) and give it as "
                            "--draft-model")
        if exit_layer not in layers:
            raise UserError(f"no early exit after layer {exit_layer} in this model; it has "
                            f"exits after layers {_ranges(layers)}")
        self.backend, self.exit_layer = backend, exit_layer
        self._chain: list[int] = []

    def logits_after(self, context: Sequence[int]) -> np.ndarray:
        self._chain = [context[-1]]  # the target holds the rest of the context
        return self.backend.draft_logits(self._chain, self.exit_layer)[-1]

    def extend(self, token: int) -> np.ndarray:
        self._chain.append(token)
        return self.backend.draft_logits(self._chain, self.exit_layer)[-1]

    def close(self) -> None:
        """Nothing: the engine is the target's."""


def early_exit_drafter(name: str, backend: Backend,
                       token_seconds: Callable[[], float]) -> ModelDrafter:
    """The drafter ``early-exit:E`` names, on the target's own ``backend``."""
    layer = name.removeprefix(f"{PREFIX}:")
    if not layer.isdigit():
        raise UserError(f"--draft {name} needs the layer to exit after, e.g. {PREFIX}:8")
    return ModelDrafter(EarlyExit(backend, int(layer)), token_seconds, name=name)


def _ranges(layers: list[int]) -> str:
    """``1..29`` for a run of layers, else the list."""
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))
