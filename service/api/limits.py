"""Bounded work at the edge: request bodies and error answers have a size limit.

`BodyLimit` counts the bytes of a request body as they arrive, so neither a lying nor a
missing Content-Length gets a larger body past it; the answer is 413. `capped` keeps an
error message (which may repeat what the caller sent) well under MAX_ERROR_BYTES.
"""
from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit", "MAX_ERROR_BYTES", "MAX_ERRORS_LISTED", "capped", "too_large_body"]

MAX_ERROR_BYTES = 64 * 1024
MAX_ERRORS_LISTED = 20  # entries of a 422's `errors` list
_DETAIL_CHARS = 16 * 1024  # a detail string; the rest of the 64 KiB is the errors list


def capped(text: str, limit: int = _DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def too_large_body(max_bytes: int) -> bytes:
    return json.dumps({"detail": f"request body larger than {max_bytes} bytes"}).encode()


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        state: dict[str, Any] = {"received": 0, "over": False, "started": False}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            # Once the body overflowed, whatever the app makes of the exception (a 400 about
            # an unreadable body, a 500) is replaced by the 413.
            if state["over"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = too_large_body(self.max_bytes)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed one; counting still applies
    return None
