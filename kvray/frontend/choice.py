"""One choice of a request: the replica's token batches of one sequence, turned into text and
log-probs as they come (stop strings cut, TTFT and inter-token gaps measured)."""
from __future__ import annotations

import time

from kvray.frontend.protocol import APIError
from kvray.frontend.text_stream import TextStream, chat_logprobs, completion_logprobs
from kvray.frontend.tool_calls import tool_finish_reason
from kvray.frontend.tool_formats import parse_tool_calls, request_format
from kvray.records import Refusal, TokenBatch


class Choice:
    """The state of one sequence while its tokens come back. ``p`` is the request as prepared
    for this choice (its own request id and seed when ``n > 1``)."""

    def __init__(self, index: int, p, serving):
        self.index = index
        self.p = p
        self.dispatcher = serving.dispatcher
        self.metrics = serving.metrics
        self.stream = None  # the replica's RequestStream, once dispatched
        # chat with tools: the output goes through the parser of its tool-call format
        req = p.req
        self.tool_format = request_format(serving.info.tool_format, req.tools, req.tool_choice) if p.kind == "chat" \
            else None
        self.tools = self.tool_format.parser(req.tools) if self.tool_format is not None else None
        self.text = TextStream(serving.decoder, p.prompt_ids, p.params.stop_strings)
        self.strings = serving.strings
        self.num_generated = 0
        self.cached = 0
        self.finish_reason: str | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.text_offset = 0
        self.engine_finished = False

    def add(self, batch: TokenBatch | Refusal) -> tuple[str, dict | None, bool]:
        """One replica batch -> (new text, logprobs object or None, finished)."""
        if isinstance(batch, Refusal):
            raise APIError(batch.status, batch.message)
        ids = batch.ids
        now = time.monotonic()
        if ids:
            self.num_generated += len(ids)
            if self.t_first is None:
                self.t_first = now
                if self.dispatcher is not None:
                    self.dispatcher.on_first_token(self.p.rid)
            else:
                self.metrics.token_gap(now - self.t_last, len(ids), self.p.slo.name)
            self.t_last = now
        self.cached = batch.cached_tokens or self.cached
        finish = batch.finish_reason
        if finish is not None:
            self.engine_finished = True
        text = self.text.add(ids, finish is not None)
        if self.text.stop_string is not None:
            finish = "stop"
        if finish is not None:
            self.finish_reason = finish
        lp = None
        if self.p.params.logprobs is not None and ids and batch.logprobs is not None:
            if self.p.kind == "completions":
                lp, self.text_offset = completion_logprobs(self.strings, ids, batch.logprobs, batch.top_logprobs,
                                                           self.text_offset)
            else:
                lp = chat_logprobs(self.strings, ids, batch.logprobs, batch.top_logprobs)
        return text, lp, finish is not None

    # ---- what the client gets ---------------------------------------------------------------
    def deltas(self, text: str, finished: bool) -> list[dict]:
        """The chat ``delta`` objects for new text (none when there is nothing to send yet):
        content, or with tools the tool calls' deltas (a call goes out once it is complete)."""
        if self.tools is None:
            return [{"content": text}] if text else []
        out = self.tools.feed(text) if text else []
        return out + self.tools.finish() if finished else out

    def reason(self, finish_reason: str | None) -> str | None:
        """``"tool_calls"`` instead of ``"stop"`` when the output held tool calls."""
        if self.tools is None or finish_reason is None:
            return finish_reason
        return tool_finish_reason(finish_reason, self.tools.has_tool_calls)

    def final(self, kind: str, text: str, lps: list[dict]) -> dict:
        """This choice in a whole (not streamed) response."""
        logprobs = merge_logprobs(kind, lps) if self.p.params.logprobs is not None else None
        if kind == "completions":
            return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        message, reason = {"role": "assistant", "content": text}, self.finish_reason
        if self.tools is not None:  # the stream's parser, over the whole text: the same calls either way
            content, calls = parse_tool_calls(text, self.tool_format, self.p.req.tools)
            message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
            reason = tool_finish_reason(reason, bool(calls))
        return {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def tpot(self) -> float | None:
        if self.num_generated > 1 and self.t_first is not None and self.t_last is not None:
            return (self.t_last - self.t_first) / (self.num_generated - 1)
        return None


def response_body(kind: str, rid: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "text_completion" if kind == "completions" else "chat.completion",
            "created": created, "model": model, "choices": choices, "usage": usage}


def merge_logprobs(kind: str, parts: list[dict]) -> dict | None:
    if kind == "chat":
        return {"content": [c for part in parts for c in part["content"]]}
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": None, "text_offset": []}
    tops = []
    for part in parts:
        merged["tokens"] += part["tokens"]
        merged["token_logprobs"] += part["token_logprobs"]
        merged["text_offset"] += part["text_offset"]
        if part["top_logprobs"] is not None:
            tops += part["top_logprobs"]
    if tops:
        merged["top_logprobs"] = tops
    return merged
