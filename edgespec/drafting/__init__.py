"""Drafters: each in its own module behind the :class:`Drafter` protocol."""

from __future__ import annotations

from collections.abc import Callable

from edgespec.drafting.base import AcceptanceStats, Drafter
from edgespec.drafting.draft_model import ModelDrafter, SecondEngine
from edgespec.drafting.early_exit import PREFIX as EARLY_EXIT
from edgespec.drafting.early_exit import early_exit_drafter
from edgespec.drafting.fused import FusedDrafter
from edgespec.drafting.prompt_lookup import PromptLookupDrafter
from edgespec.drafting.token_recycling import TokenRecyclingDrafter
from edgespec.errors import UserError
from runtimes.base import Backend

DRAFTERS = ("fused", "lookup", "recycling", "model", f"{EARLY_EXIT}:E", "none")
MODEL_DRAFTS = ("fused", "model")  # the drafters a draft model takes part in


def make_drafter(name: str, backend: Backend, *, recycling_k: int = 4,
                 model: ModelDrafter | None = None,
                 token_seconds: Callable[[], float] = lambda: 1.0) -> Drafter | None:
    """The drafter called ``name`` for the target ``backend``; ``none`` means plain decoding
    (no drafter at all). ``recycling_k``: Token Recycling's successors per token (its table
    is vocab × k). ``model``: the draft model's drafter, if one was loaded: ``model`` is it
    alone, and ``fused`` merges it with lookup and recycling. ``early-exit:E`` drafts with
    the target cut after layer E. ``token_seconds``: what verifying one token costs now, the
    price of a model's passes."""
    vocab_size = backend.vocab_size
    if name == "none":
        return None
    if name == "lookup":
        return PromptLookupDrafter()
    if name == "recycling":
        return TokenRecyclingDrafter(vocab_size, recycling_k)
    if name == "model":
        if model is None:
            raise UserError("--draft model needs a draft model: give --draft-model PATH")
        return model
    if name.startswith(EARLY_EXIT):
        return early_exit_drafter(name, backend, token_seconds)
    if name == "fused":
        return FusedDrafter([PromptLookupDrafter(), TokenRecyclingDrafter(vocab_size, recycling_k),
                             *([model] if model else [])])
    raise UserError(f"unknown draft method {name!r}; choose one of: {', '.join(DRAFTERS)}")


__all__ = [
    "DRAFTERS",
    "EARLY_EXIT",
    "MODEL_DRAFTS",
    "AcceptanceStats",
    "Drafter",
    "FusedDrafter",
    "ModelDrafter",
    "PromptLookupDrafter",
    "SecondEngine",
    "TokenRecyclingDrafter",
    "make_drafter",
]
