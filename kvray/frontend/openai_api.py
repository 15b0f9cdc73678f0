"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions``: request preparation
(``kvray.frontend.prepare``) and the response bodies and SSE chunks of both (built as plain
dicts: the streaming path is hot).

Completions may carry several prompts: choice ``k`` answers prompt ``k // n``. With ``echo``
each choice's text starts with its prompt, and with ``logprobs`` its log-probs start with the
prompt's (the engine's prompt log-probs: ``None`` for the first token, the top ``logprobs``
per position). vLLM's ``prompt_logprobs`` extension adds a ``prompt_logprobs`` list per choice
(chat: on the response, not streamed).
"""
from __future__ import annotations

import time
from typing import AsyncIterator

from kvray.frontend.api import API, Outputs
from kvray.frontend.choice import Choice, RequestState
from kvray.frontend.prepare import Prepared, Served, prepare
from kvray.frontend.sse import DONE, sse
from kvray.frontend.logprobs import prompt_completion_logprobs, vllm_prompt_logprobs


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


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None,
                     logprobs: dict | None, with_usage_field: bool) -> dict:
    d = {"id": rid, "object": "text_completion", "created": created, "model": model,
         "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage_field:
        d["usage"] = None
    return d


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None,
               logprobs: dict | None, with_usage_field: bool) -> dict:
    d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
         "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage_field:
        d["usage"] = None
    return d


def usage_chunk(rid: str, created: int, model: str, obj: str, usage_: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


def _at(chunk: dict, index: int) -> dict:
    """A chunk of choice ``index`` (the builders make choice 0's)."""
    if index:
        chunk["choices"][0]["index"] = index
    return chunk


class _OpenAI(API):
    async def prepare(self, body: bytes, headers, t0: float, served: Served) -> Prepared:
        return await prepare(self.kind, body, headers, t0, info=served.info, model_names=served.model_names,
                             slo_classes=served.slo_classes, default_slo_class=served.default_slo_class)


class CompletionsAPI(_OpenAI):
    kind = "completions"

    @staticmethod
    def _echo(c: Choice) -> tuple[str, dict | None]:
        """The text and the log-probs object the choice's echoed prompt adds."""
        p = c.p
        if p.req.logprobs is None or c.prompt_logprobs is None:
            return p.echo[0], None
        return p.echo[0], prompt_completion_logprobs(c.strings, p.prompt_ids, c.prompt_logprobs, p.req.logprobs)

    @staticmethod
    def _prompt_logprobs(c: Choice) -> list | None:
        k = c.p.req.prompt_logprobs
        return None if k is None or c.prompt_logprobs is None else \
            vllm_prompt_logprobs(c.strings, c.p.prompt_ids, c.prompt_logprobs, k)

    def body(self, req: RequestState, texts: list[str], lps: list[list[dict]]) -> dict:
        out = []
        for c in req.choices:
            text, parts = texts[c.index], lps[c.index]
            if c.p.echo:
                echo, echo_lp = self._echo(c)
                text, parts = echo + text, ([echo_lp] if echo_lp else []) + parts
            logprobs = merge_logprobs("completions", parts) if c.p.params.logprobs is not None else None
            d = {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}
            if c.p.req.prompt_logprobs is not None:
                d["prompt_logprobs"] = self._prompt_logprobs(c)
            out.append(d)
        p = req.p
        return response_body(self.kind, p.rid, int(time.time()), p.model, out, req.usage())

    async def events(self, req: RequestState, outputs: Outputs) -> AsyncIterator[bytes]:
        p = req.p
        created, name, with_usage = int(time.time()), p.model, p.req.include_usage
        started: set[int] = set()
        async for i, (text, lp, finished) in outputs:
            c = req.choices[i]
            first = i not in started
            started.add(i)
            if first and c.p.echo:
                echo, echo_lp = self._echo(c)
                yield sse(self._first(_at(completion_chunk(p.rid, created, name, echo, None, echo_lp, with_usage), i),
                                      c))
                first = False
            if text or lp is not None or finished:
                chunk = _at(completion_chunk(p.rid, created, name, text, c.finish_reason if finished else None, lp,
                                             with_usage), i)
                yield sse(self._first(chunk, c) if first else chunk)
        if with_usage:
            yield sse(usage_chunk(p.rid, created, name, "text_completion", req.usage()))
        yield DONE

    def _first(self, chunk: dict, c: Choice) -> dict:
        """The first chunk of a choice carries its prompt log-probs (vLLM's extension)."""
        if c.p.req.prompt_logprobs is not None:
            chunk["choices"][0]["prompt_logprobs"] = self._prompt_logprobs(c)
        return chunk


class ChatAPI(_OpenAI):
    kind = "chat"

    def body(self, req: RequestState, texts: list[str], lps: list[list[dict]]) -> dict:
        out = []
        for c in req.choices:
            content, calls, reason = c.message(texts[c.index])
            logprobs = merge_logprobs("chat", lps[c.index]) if c.p.params.logprobs is not None else None
            message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
            out.append({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": reason})
        p = req.p
        body = response_body(self.kind, p.rid, int(time.time()), p.model, out, req.usage())
        first = req.choices[0]
        if p.req.prompt_logprobs is not None and first.prompt_logprobs is not None:
            body["prompt_logprobs"] = vllm_prompt_logprobs(first.strings, p.prompt_ids, first.prompt_logprobs,
                                                           p.req.prompt_logprobs)
        return body

    async def events(self, req: RequestState, outputs: Outputs) -> AsyncIterator[bytes]:
        p = req.p
        created, name, with_usage = int(time.time()), p.model, p.req.include_usage
        for c in req.choices:
            yield sse(_at(chat_chunk(p.rid, created, name, {"role": "assistant", "content": ""}, None, None,
                                     with_usage), c.index))
        async for i, (text, lp, finished) in outputs:
            c = req.choices[i]
            if text or lp is not None or finished:
                reason = c.finish_reason if finished else None
                deltas = c.deltas(text, finished) or [{}]  # one chunk per batch, unless a tool call's deltas split it
                for k, delta in enumerate(deltas):
                    last = k == len(deltas) - 1
                    yield sse(_at(chat_chunk(p.rid, created, name, delta, c.reason(reason) if last else None,
                                             lp if k == 0 else None, with_usage), i))
        if with_usage:
            yield sse(usage_chunk(p.rid, created, name, "chat.completion.chunk", req.usage()))
        yield DONE


COMPLETIONS, CHAT = CompletionsAPI(), ChatAPI()
