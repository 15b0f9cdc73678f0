"""JSON and server-sent-event bytes, shared by every HTTP API of the Router."""
from __future__ import annotations

import json
from typing import Any

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
