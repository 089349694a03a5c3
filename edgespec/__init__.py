"""edgespec: faster on-device generation through lossless speculative decoding."""

from edgespec.api import Engine, GenerationResult, TextIterator, load
from edgespec.engine import GenerationStats
from edgespec.errors import Cancelled, UserError

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "Engine",
    "GenerationResult",
    "GenerationStats",
    "TextIterator",
    "UserError",
    "__version__",
    "load",
]
