"""``POST /v1/messages``: Anthropic's Messages API on kvray's serving loop (request:
``anthropic_protocol``).

The message's ``content`` is built from the choice's chat deltas: text becomes a ``text`` block,
each tool call (parsed in the model's template format) a ``tool_use`` block. ``stop_reason`` is
``tool_use`` when there were calls, ``max_tokens`` when ``max_tokens`` cut the output,
``stop_sequence`` (with ``stop_sequence``) when one of ``stop_sequences`` ended it, else
``end_turn``. The stream is Anthropic's: ``message_start``, per block ``content_block_start``,
``content_block_delta`` (``text_delta`` / ``input_json_delta``) and ``content_block_stop``,
then ``message_delta`` (stop reason, usage) and ``message_stop``; an error after the stream
started is an ``error`` event. Every error on this route has Anthropic's shape.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from typing import AsyncIterator

from kvray.frontend.anthropic_protocol import MessagesRequest, anthropic_error, to_chat
from kvray.frontend.api import API, Outputs
from kvray.frontend.body import parse_json, parse_request
from kvray.frontend.choice import Choice, RequestState
from kvray.frontend.errors import APIError
from kvray.frontend.prepare import Prepared, Served, prepare_parsed
from kvray.frontend.sse import named_sse


class ContentBlocks:
    """The content blocks of one message as its chat deltas come, and the stream events."""

    def __init__(self):
        self.blocks: list[dict] = []
        self._open: dict | None = None
        self._json = ""  # the open tool_use block's arguments, as JSON text

    def feed(self, delta: dict) -> list[dict]:
        events = []
        if "content" in delta:
            if self._open is None or self._open["type"] != "text":
                events += self.close() + self._start({"type": "text", "text": ""})
            self._open["text"] += delta["content"]
            return events + [self._delta({"type": "text_delta", "text": delta["content"]})]
        call = delta["tool_calls"][0]
        if "id" in call:
            return self.close() + self._start({"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"),
                                               "name": call["function"]["name"], "input": {}})
        self._json += call["function"]["arguments"]
        return [self._delta({"type": "input_json_delta", "partial_json": call["function"]["arguments"]})]

    def close(self) -> list[dict]:
        if self._open is None:
            return []
        if self._open["type"] == "tool_use":
            self._open["input"] = json.loads(self._json or "{}")
        self._open, self._json = None, ""
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def finish(self) -> list[dict]:
        """Close the last block; a message with no block at all gets an empty text block."""
        return ([] if self.blocks else self.feed({"content": ""})) + self.close()

    def _start(self, block: dict) -> list[dict]:
        self.blocks.append(block)
        self._open = block
        return [{"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": dict(block)}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}


def _stop(c: Choice, blocks: list[dict]) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)``."""
    if c.finish_reason == "length":
        return "max_tokens", None
    if any(b["type"] == "tool_use" for b in blocks):
        return "tool_use", None
    if c.stop_string is not None:
        return "stop_sequence", c.stop_string
    return "end_turn", None


class MessagesAPI(API):
    kind = "messages"

    async def prepare(self, body: bytes, headers, t0: float, served: Served) -> Prepared:
        req = parse_request(MessagesRequest, parse_json(body))
        p = await prepare_parsed("chat", to_chat(req), len(body), headers, t0, served)
        return dataclasses.replace(p, kind=self.kind, rid=f"msg_{uuid.uuid4().hex}", source=req, model=req.model)

    @staticmethod
    def _message(req: RequestState, content: list[dict], stop: tuple[str | None, str | None]) -> dict:
        return {"id": req.p.rid, "type": "message", "role": "assistant", "model": req.p.model, "content": content,
                "stop_reason": stop[0], "stop_sequence": stop[1],
                "usage": {"input_tokens": req.num_prompt_tokens, "output_tokens": req.num_generated,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": req.num_cached}}

    def body(self, req: RequestState, texts: list[str], lps: list[list[dict]]) -> dict:
        c, out = req.choices[0], ContentBlocks()
        for d in c.deltas(texts[0], True):
            out.feed(d)
        out.finish()
        return self._message(req, out.blocks, _stop(c, out.blocks))

    async def events(self, req: RequestState, outputs: Outputs) -> AsyncIterator[bytes]:
        c, out = req.choices[0], ContentBlocks()
        start = self._message(req, [], (None, None))
        start["usage"]["output_tokens"] = 0
        yield _event({"type": "message_start", "message": start})
        async for _, (text, _lp, finished) in outputs:
            for d in c.deltas(text, finished):
                for e in out.feed(d):
                    yield _event(e)
        for e in out.finish():
            yield _event(e)
        reason, sequence = _stop(c, out.blocks)
        yield _event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                      "usage": {"input_tokens": req.num_prompt_tokens, "output_tokens": req.num_generated,
                                "cache_read_input_tokens": req.num_cached}})
        yield _event({"type": "message_stop"})

    def error_body(self, e: APIError) -> dict:
        return anthropic_error(e)

    def stream_error(self, e: APIError, req: RequestState) -> bytes:
        return _event(anthropic_error(e))


def _event(e: dict) -> bytes:
    return named_sse(e["type"], e)


MESSAGES = MessagesAPI()
