"""A small, stdlib-only client for the HTTP API of an asp node."""

from .client import Client, Value
from .errors import (
    AspError,
    Conflict,
    Forbidden,
    NotFound,
    PreconditionFailed,
    Unauthorized,
)
from .sse import ChangeFeed, SSEEvent, SSEParser

__all__ = [
    "AspError",
    "ChangeFeed",
    "Client",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PreconditionFailed",
    "SSEEvent",
    "SSEParser",
    "Unauthorized",
    "Value",
]
__version__ = "0.1.0"
