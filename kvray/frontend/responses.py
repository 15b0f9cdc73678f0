"""``POST /v1/responses``: the Responses API on kvray's serving loop (request: ``responses_protocol``).

A response's ``output`` is built from the choice's chat deltas (``Choice.deltas``: content, and
tool calls parsed in the model's template format): text becomes a ``message`` item, each tool
call a ``function_call`` item. The stream is the typed event sequence the openai SDK expects:
``response.created``, ``response.in_progress``, then per item ``response.output_item.added``,
(messages) ``response.content_part.added``, ``response.output_text.delta``...,
``response.output_text.done``, ``response.content_part.done`` / (calls)
``response.function_call_arguments.delta``, ``response.function_call_arguments.done``, then
``response.output_item.done``; and ``response.completed``, or ``response.incomplete`` when
``max_output_tokens`` cut it. Every event has a ``sequence_number``.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import AsyncIterator

from kvray.frontend.api import API, Outputs
from kvray.frontend.body import parse_json, parse_request
from kvray.frontend.choice import RequestState
from kvray.frontend.errors import APIError
from kvray.frontend.prepare import Prepared, Served, prepare_parsed
from kvray.frontend.responses_protocol import ResponsesRequest, renamed, to_chat
from kvray.frontend.sse import named_sse


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems:
    """The output items of one response as its chat deltas come, and the events (type, fields)
    that announce them."""

    def __init__(self):
        self.items: list[dict] = []
        self._open: dict | None = None  # the item being written (a message or a function call)
        self._text = ""  # the open message's text

    def feed(self, delta: dict) -> list[tuple[str, dict]]:
        events = []
        if "content" in delta:
            if self._open is None or self._open["type"] != "message":
                events += self.close() + self._add({"id": _id("msg"), "type": "message", "role": "assistant",
                                                    "status": "in_progress", "content": []})
                events.append(("response.content_part.added", {**self._where(), "content_index": 0,
                                                               "part": _text_part("")}))
                self._text = ""
            self._text += delta["content"]
            events.append(("response.output_text.delta", {**self._where(), "content_index": 0,
                                                          "delta": delta["content"], "logprobs": []}))
            return events
        call = delta["tool_calls"][0]
        if "id" in call:  # a new call, its name
            return self.close() + self._add({"id": _id("fc"), "type": "function_call", "call_id": call["id"],
                                             "name": call["function"]["name"], "arguments": "",
                                             "status": "in_progress"})
        args = call["function"]["arguments"]
        self._open["arguments"] += args
        return [("response.function_call_arguments.delta", {**self._where(), "delta": args})]

    def close(self, status: str = "completed") -> list[tuple[str, dict]]:
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        item["status"] = status
        if item["type"] == "message":
            part = _text_part(self._text)
            item["content"] = [part]
            events = [("response.output_text.done", {**where, "content_index": 0, "text": self._text, "logprobs": []}),
                      ("response.content_part.done", {**where, "content_index": 0, "part": part})]
        else:
            events = [("response.function_call_arguments.done", {**where, "arguments": item["arguments"],
                                                                  "name": item["name"]})]
        return events + [("response.output_item.done", {"output_index": where["output_index"], "item": item})]

    def finish(self, status: str) -> list[tuple[str, dict]]:
        """Close the last item; an output with no item at all gets an empty message."""
        events = [] if self.items else self.feed({"content": ""})
        return events + self.close(status)

    def _add(self, item: dict) -> list[tuple[str, dict]]:
        self.items.append(item)
        self._open = item
        return [("response.output_item.added", {"output_index": len(self.items) - 1, "item": dict(item)})]

    def _where(self) -> dict:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponsesAPI(API):
    kind = "responses"

    async def prepare(self, body: bytes, headers, t0: float, served: Served) -> Prepared:
        req = parse_request(ResponsesRequest, parse_json(body))
        try:
            p = await prepare_parsed("chat", to_chat(req), len(body), headers, t0, served)
        except APIError as e:
            raise renamed(e) from None
        return dataclasses.replace(p, kind=self.kind, rid=_id("resp"), source=req)

    @staticmethod
    def _status(req: RequestState) -> str:
        return "incomplete" if req.choices[0].finish_reason == "length" else "completed"

    def _response(self, req: RequestState, created: int, status: str, output: list[dict]) -> dict:
        p, src = req.p, req.p.source
        done = status != "in_progress"
        usage = None
        if done:
            n_in, n_out = req.num_prompt_tokens, req.num_generated
            usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": req.num_cached},
                     "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": n_in + n_out}
        fmt = (src.text.format if src.text else None) or {"type": "text"}
        return {"id": p.rid, "object": "response", "created_at": created, "status": status, "background": False,
                "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": src.instructions, "max_output_tokens": src.max_output_tokens,
                "metadata": src.metadata or {}, "model": p.model, "output": output,
                "parallel_tool_calls": src.parallel_tool_calls is not False, "previous_response_id": None,
                "reasoning": None, "store": False, "temperature": p.params.temperature, "text": {"format": fmt},
                "tool_choice": src.tool_choice or "auto", "tools": src.tools or [], "top_p": p.params.top_p,
                "truncation": "disabled", "usage": usage, "user": src.user}

    def body(self, req: RequestState, texts: list[str], lps: list[list[dict]]) -> dict:
        out, status = OutputItems(), self._status(req)
        for d in req.choices[0].deltas(texts[0], True):
            out.feed(d)
        out.finish(status)
        return self._response(req, int(time.time()), status, out.items)

    async def events(self, req: RequestState, outputs: Outputs) -> AsyncIterator[bytes]:
        created, c, out = int(time.time()), req.choices[0], OutputItems()
        yield self._event(req, "response.created", response=self._response(req, created, "in_progress", []))
        yield self._event(req, "response.in_progress", response=self._response(req, created, "in_progress", []))
        async for _, (text, _lp, finished) in outputs:
            for d in c.deltas(text, finished):
                for kind, fields in out.feed(d):
                    yield self._event(req, kind, **fields)
        status = self._status(req)
        for kind, fields in out.finish(status):
            yield self._event(req, kind, **fields)
        yield self._event(req, f"response.{status}", response=self._response(req, created, status, out.items))

    def stream_error(self, e: APIError, req: RequestState) -> bytes:
        return self._event(req, "error", code=e.code or e.type, message=e.message, param=e.param)

    @staticmethod
    def _event(req: RequestState, kind: str, **fields) -> bytes:
        n, req.num_events = req.num_events, req.num_events + 1
        return named_sse(kind, {"type": kind, "sequence_number": n, **fields})


RESPONSES = ResponsesAPI()
