"""BodyLimit at the ASGI level: what a server hands the app is counted, whatever the headers say."""
from __future__ import annotations

import asyncio
import json

from trainguard.service.api.limits import BodyLimit, capped


def _run(declared: int | None, chunks: list[bytes], limit: int = 100) -> tuple[list[dict], list[bytes]]:
    """Send `chunks` through BodyLimit to an app that reads the whole body and echoes its size."""
    seen: list[bytes] = []

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    asyncio.run(BodyLimit(app, max_bytes=limit)({"type": "http", "headers": headers}, receive, send))
    return sent, seen


def test_a_declared_length_over_the_limit_is_refused_before_the_app_runs():
    sent, seen = _run(declared=101, chunks=[b"x" * 101])
    assert sent[0]["status"] == 413 and seen == []
    assert json.loads(sent[1]["body"]) == {"detail": "request body larger than 100 bytes"}


def test_a_lying_content_length_does_not_get_a_larger_body_in():
    sent, seen = _run(declared=10, chunks=[b"x" * 60, b"x" * 60])
    assert sent[0]["status"] == 413 and len(sent) == 2 and seen == []


def test_a_body_without_content_length_is_counted_as_it_streams():
    sent, seen = _run(declared=None, chunks=[b"x" * 50, b"x" * 50, b"x"])
    assert sent[0]["status"] == 413 and seen == []


def test_a_body_at_the_limit_passes():
    sent, seen = _run(declared=None, chunks=[b"x" * 50, b"x" * 50])
    assert sent[0]["status"] == 200 and seen == [b"x" * 100]


def test_capped_text_says_how_much_was_cut():
    assert capped("abc", 5) == "abc"
    assert capped("x" * 10, 4) == "xxxx... (6 more characters)"
