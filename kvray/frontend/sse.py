"""JSON and server-sent-event bytes, shared by every HTTP API of the Router, and the streaming
response that carries the events."""
from __future__ import annotations

import json
from typing import Any, Callable

from starlette.responses import StreamingResponse

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One ``data:`` event (OpenAI chat and completions streams)."""
    return b"data: " + dumps(obj) + b"\n\n"


def named_sse(event: str, obj: Any) -> bytes:
    """One event with its name on an ``event:`` line (Responses and Anthropic streams)."""
    return b"event: " + event.encode() + b"\ndata: " + dumps(obj) + b"\n\n"


class EventStream(StreamingResponse):
    """An SSE response whose client may leave at any time. Under Ray Serve, waiting for the
    disconnect raises (the proxy's receive call is cancelled) instead of returning a disconnect
    message; that ends the wait the same way here, so the stream is cancelled and cleaned up as
    on any disconnect and no exception escapes into Serve's request task (whose future nobody
    retrieves: "Future exception was never retrieved" in the replica log).

    A client that leaves before the body's first chunk is asked for leaves the generator
    unstarted, and closing an unstarted generator runs none of its code: ``abandoned`` then
    does its cleanup (abort the replica call, count the request)."""

    def __init__(self, content, abandoned: Callable[[], None], **kw):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kw)
        self._abandoned = abandoned

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._abandoned()

    async def listen_for_disconnect(self, receive) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except Exception:  # noqa: BLE001 - the client is gone
            pass
