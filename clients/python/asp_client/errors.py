"""Exceptions raised by the asp client."""

from __future__ import annotations

import json
from collections.abc import Mapping
from email.message import Message
from typing import Any


class AspError(Exception):
    """An error answer of an asp node: HTTP status, error code and message.

    ``body`` holds the whole decoded JSON answer (it may carry more fields, such as
    ``error.leader`` for ``not_leader`` or ``write`` for ``replication_timeout``);
    ``retry_after`` is the Retry-After header in seconds, if the node sent one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status!r}, {self.code!r}, {self.message!r})"


class Unauthorized(AspError):
    """401: no valid bearer token."""


class Forbidden(AspError):
    """403: the token does not cover this namespace, operation or key."""


class NotFound(AspError):
    """404: the key (or route) does not exist."""


class Conflict(AspError):
    """409: e.g. policy_fixed, wrong_policy, not_leader, stale_fence."""


class PreconditionFailed(AspError):
    """412: an If-Match / If-None-Match condition failed; nothing was applied."""


_BY_STATUS: dict[int, type[AspError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
}


def error_from_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str] | Message | None = None,
    reason: str = "",
) -> AspError:
    """Build the matching AspError from an error answer's status, body and headers."""
    decoded: Any = None
    code = f"http_{status}"
    message = reason or body.decode("utf-8", "replace").strip()
    try:
        decoded = json.loads(body) if body else None
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        err = decoded.get("error")
        if isinstance(err, dict):
            code = str(err.get("code", code))
            message = str(err.get("message", message))
        elif isinstance(decoded.get("status"), str):  # /healthz: {"status", "reason"}
            code = decoded["status"]
            message = str(decoded.get("reason", message))
    retry_after: float | None = None
    if headers is not None:
        raw = headers.get("Retry-After")
        if raw:
            try:
                retry_after = float(raw)
            except ValueError:
                retry_after = None
    cls = _BY_STATUS.get(status, AspError)
    return cls(status, code, message, body=decoded, retry_after=retry_after)
