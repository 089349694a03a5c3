"""Drafters: each in its own module behind the :class:`Drafter` protocol."""

from __future__ import annotations

from edgespec.drafting.base import AcceptanceStats, Drafter
from edgespec.drafting.fused import FusedDrafter
from edgespec.drafting.prompt_lookup import PromptLookupDrafter
from edgespec.drafting.token_recycling import TokenRecyclingDrafter
from edgespec.errors import UserError

DRAFTERS = ("fused", "lookup", "recycling", "none")


def make_drafter(name: str, vocab_size: int, *, recycling_k: int = 4) -> Drafter | None:
    """The drafter called ``name``; ``none`` means plain decoding (no drafter at all).
    ``recycling_k``: Token Recycling's successors per token (its table is vocab × k)."""
    if name == "none":
        return None
    if name == "lookup":
        return PromptLookupDrafter()
    if name == "recycling":
        return TokenRecyclingDrafter(vocab_size, recycling_k)
    if name == "fused":
        return FusedDrafter([PromptLookupDrafter(), TokenRecyclingDrafter(vocab_size, recycling_k)])
    raise UserError(f"unknown draft method {name!r}; choose one of: {', '.join(DRAFTERS)}")


__all__ = [
    "DRAFTERS",
    "AcceptanceStats",
    "Drafter",
    "FusedDrafter",
    "PromptLookupDrafter",
    "TokenRecyclingDrafter",
    "make_drafter",
]
