"""The error every HTTP route answers with: an OpenAI-style body ``{"error": {...}}`` and a status."""

from __future__ import annotations

from typing import Any

from stlm.errors import StlmError

__all__ = ["RETRY_AFTER", "ApiError"]

#: ``Retry-After`` seconds sent with these statuses (429: the queue is full; 503: draining or at
#: the connection cap).
RETRY_AFTER = {429: 1, 503: 5}


class ApiError(StlmError):
    """An error answered as an OpenAI-style body ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers (``Retry-After`` for 429/503)."""
        seconds = RETRY_AFTER.get(self.status)
        return [] if seconds is None else [(b"retry-after", str(seconds).encode())]
