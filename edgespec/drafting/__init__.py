"""Drafters: each in its own module behind the :class:`Drafter` protocol."""

from __future__ import annotations

from edgespec.drafting.base import AcceptanceStats, Drafter
from edgespec.drafting.draft_model import DraftModelDrafter
from edgespec.drafting.fused import FusedDrafter
from edgespec.drafting.prompt_lookup import PromptLookupDrafter
from edgespec.drafting.token_recycling import TokenRecyclingDrafter
from edgespec.errors import UserError

DRAFTERS = ("fused", "lookup", "recycling", "model", "none")
MODEL_DRAFTS = ("fused", "model")  # the drafters a draft model takes part in


def make_drafter(name: str, vocab_size: int, *, recycling_k: int = 4,
                 model: DraftModelDrafter | None = None) -> Drafter | None:
    """The drafter called ``name``; ``none`` means plain decoding (no drafter at all).
    ``recycling_k``: Token Recycling's successors per token (its table is vocab × k).
    ``model``: the draft model's drafter, if one was loaded: ``model`` is it alone, and
    ``fused`` merges it with lookup and recycling."""
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
    if name == "fused":
        return FusedDrafter([PromptLookupDrafter(), TokenRecyclingDrafter(vocab_size, recycling_k),
                             *([model] if model else [])])
    raise UserError(f"unknown draft method {name!r}; choose one of: {', '.join(DRAFTERS)}")


__all__ = [
    "DRAFTERS",
    "MODEL_DRAFTS",
    "AcceptanceStats",
    "DraftModelDrafter",
    "Drafter",
    "FusedDrafter",
    "PromptLookupDrafter",
    "TokenRecyclingDrafter",
    "make_drafter",
]
