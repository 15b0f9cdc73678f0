"""OpenAI completions and chat completions on top of a replica token stream.

One ``OpenAIServing`` per Router replica. For each request it parses and validates the body,
resolves the SLO class, tokenizes (chat: through the chat template), computes prefix block
hashes, builds the engine's SamplingParams and the routing hint, submits the request (the
Serve handle call, routed by the kvray plug-in), then detokenizes the returned token batches
into a JSON response or an SSE stream. Errors use the OpenAI error shape; a client that goes
away cancels the replica call, which aborts the request in the engine.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.responses import JSONResponse, Response, StreamingResponse

from kvray import tracing
from kvray.platform.metrics import ServingMetrics
from kvray.platform.protocol import (APIError, ChatCompletionRequest, CompletionRequest, chat_chunk, chat_response,
                                     completion_chunk, completion_response, parse_request, usage, usage_chunk)
from kvray.replica.block_hash import prefix_block_hashes
from kvray.replica.sampling_params import SamplingParams
from kvray.router.hints import RoutingHint
from kvray.router.slo import SLOError, SLOTarget, resolve_slo
from kvray.router.text_stream import FastDecoder, TextStream, TokenStrings, chat_logprobs, completion_logprobs

logger = logging.getLogger(__name__)

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

_DONE = b"data: [DONE]\n\n"


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


@dataclass
class ModelInfo:
    tokenizer: Any
    max_model_len: int
    block_size: int
    vocab_size: int


@dataclass
class _Prepared:
    kind: str  # "completions" | "chat"
    req: Any
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    slo: SLOTarget
    t0: float


class _Run:
    """The state of one request while its tokens come back."""

    def __init__(self, p: _Prepared, serving: "OpenAIServing", hint: RoutingHint | None = None):
        self.p = p
        self.hint = hint
        self.events = serving.events
        self.text = TextStream(serving.decoder, p.prompt_ids, p.params.stop_strings)
        self.strings = serving.strings
        self.num_generated = 0
        self.cached = 0
        self.finish_reason: str | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.text_offset = 0
        self.engine_finished = False

    def add(self, item: dict) -> tuple[str, dict | None, bool]:
        """One replica batch -> (new text, logprobs object or None, finished)."""
        if item.get("error"):
            raise APIError(int(item.get("status", 500)), item["error"])
        ids = item.get("ids") or []
        now = time.monotonic()
        if ids:
            self.num_generated += len(ids)
            if self.t_first is None:
                self.t_first = now
                if self.events is not None:
                    self.events.on_first_token(self.hint, now)
            self.t_last = now
        self.cached = item.get("cached", self.cached) or 0
        finish = item.get("finish")
        if finish is not None:
            self.engine_finished = True
        text = self.text.add(ids, finish is not None)
        if self.text.stop_string is not None:
            finish = "stop"
        if finish is not None:
            self.finish_reason = finish
        lp = None
        if self.p.params.logprobs is not None and ids and item.get("lp") is not None:
            if self.p.kind == "completions":
                lp, self.text_offset = completion_logprobs(self.strings, ids, item["lp"], item.get("top"),
                                                           self.text_offset)
            else:
                lp = chat_logprobs(self.strings, ids, item["lp"], item.get("top"))
        return text, lp, finish is not None

    def usage(self) -> dict:
        return usage(len(self.p.prompt_ids), self.num_generated, self.cached)

    def tpot(self) -> float | None:
        if self.num_generated > 1 and self.t_first is not None and self.t_last is not None:
            return (self.t_last - self.t_first) / (self.num_generated - 1)
        return None


class OpenAIServing:
    def __init__(self, *, info: ModelInfo, model_names: list[str], slo_classes: dict[str, SLOTarget],
                 default_slo_class: str, decode_estimate_cap: int,
                 submit: Callable[[str, list[int], SamplingParams, RoutingHint], Any],  # -> a RequestStream
                 metrics: ServingMetrics, admit: Callable[[RoutingHint], Any] | None = None,
                 events: Any = None):
        """``admit(hint)`` -> ``(ok, retry_after_s)`` or an awaitable of it, asked before dispatch
        (an SLO-aware policy may wait there, or refuse: 429 with Retry-After). ``events``, if
        given, gets ``on_first_token(hint, t)`` and ``on_finish(hint, num_generated, status, t)``
        (``time.monotonic()`` times) for every dispatched request."""
        self.info = info
        self.model_names = model_names
        self.slo_classes = slo_classes
        self.default_slo_class = default_slo_class
        self.decode_cap = decode_estimate_cap
        self.submit = submit
        self.metrics = metrics
        self.admit = admit
        self.events = events
        self.decoder = FastDecoder.wrap(info.tokenizer)
        self.strings = TokenStrings(self.decoder)

    # ---- entry point -------------------------------------------------------------------------
    async def handle(self, kind: str, body: bytes, headers) -> Response:
        t0 = time.monotonic()
        slo_label = "none"
        try:
            p = self._prepare(kind, body, headers, t0)
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_in", t0)
            slo_label = p.slo.name
            hint = await self._admitted_hint(p)
            stream = self.submit(p.rid, p.prompt_ids, p.params, hint)
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_submitted")
        except APIError as e:
            self.metrics.request_done(endpoint=kind, status=e.status, slo_class=slo_label)
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except asyncio.CancelledError:  # the client left while the request waited for admission
            self.metrics.request_done(endpoint=kind, status=499, slo_class=slo_label)
            raise
        run = _Run(p, self, hint)
        try:  # the first batch decides between an error status and a 200
            first_out = run.add(await stream.__anext__())
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_first_out")
        except asyncio.CancelledError:
            stream.close(abort=True)
            self._done(run, 499)
            raise
        except Exception as e:
            stream.close(abort=True)
            if isinstance(e, APIError):
                err = e
            elif isinstance(e, StopAsyncIteration):
                err = APIError(500, "the replica ended the stream without output")
            else:  # the replica died, an engine error...
                logger.exception("request %s failed", p.rid)
                err = APIError(503, f"the model replica failed: {type(e).__name__}")
            self._done(run, err.status)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        if p.req.stream:
            return StreamingResponse(self._sse(run, stream, first_out), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(run, stream, first_out)

    # ---- request preparation -----------------------------------------------------------------
    def _prepare(self, kind: str, body: bytes, headers, t0: float) -> _Prepared:
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        req = parse_request(CompletionRequest if kind == "completions" else ChatCompletionRequest, obj)
        if req.model is not None and req.model not in self.model_names:
            raise APIError(404, f"The model '{req.model}' does not exist. Served: {', '.join(self.model_names)}",
                           param="model", code="model_not_found")
        try:
            slo = resolve_slo(self.slo_classes, self.default_slo_class, header_class=headers.get("x-slo-class"),
                              body_class=req.slo_class, header_ttft_ms=headers.get("x-slo-ttft-ms"),
                              header_tpot_ms=headers.get("x-slo-tpot-ms"))
        except SLOError as e:
            raise APIError(400, str(e), param=e.param) from None
        prompt_ids = self._completion_prompt(req) if kind == "completions" else self._chat_prompt(req)
        n = len(prompt_ids)
        limit = self.info.max_model_len
        if n == 0:
            raise APIError(400, "the prompt is empty", param="prompt" if kind == "completions" else "messages")
        if n >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has {n} "
                           "tokens; no room is left for the completion.", param="messages" if kind == "chat"
                           else "prompt", code="context_length_exceeded")
        if kind == "completions":
            max_tokens = req.max_tokens if req.max_tokens is not None else 16
            mt_param = "max_tokens"
        else:
            max_tokens = req.requested_max_tokens
            mt_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            if max_tokens is None:
                max_tokens = limit - n
        if n + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion).",
                           param=mt_param, code="context_length_exceeded")
        if kind == "completions":
            logprobs = req.logprobs
        else:
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p), top_k=-1 if req.top_k is None else req.top_k,
            max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=bool(req.ignore_eos), seed=req.seed, logprobs=logprobs, min_tokens=req.min_tokens or 0,
            slo_class=slo.name, ttft_ms=slo.ttft_ms, tpot_ms=slo.tpot_ms, priority=slo.priority)
        try:
            params.validate()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        rid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}"
        return _Prepared(kind, req, rid, prompt_ids, params, slo, t0)

    def _completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts (a list of several prompts) are not supported; send one "
                               "prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.info.tokenizer(prompt).input_ids)
        vocab = self.info.vocab_size
        for t in prompt:
            if t < 0 or t >= vocab:
                raise APIError(400, f"prompt token id {t} is outside the vocabulary [0, {vocab})", param="prompt")
        return list(prompt)

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        tok = self.info.tokenizer
        try:
            text = tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=req.add_generation_prompt is not False,
                                           **(req.chat_template_kwargs or {}))
        except Exception as e:  # no template, a template that rejects these messages...
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        return list(tok(text, add_special_tokens=False).input_ids)

    async def _admitted_hint(self, p: _Prepared) -> RoutingHint:
        bs = self.info.block_size
        hint = RoutingHint(request_id=p.rid, num_prompt_tokens=len(p.prompt_ids),
                           decode_estimate=min(p.params.max_tokens, self.decode_cap),
                           block_hashes=prefix_block_hashes(p.prompt_ids, bs), block_size=bs,
                           slo_class=p.slo.name, ttft_ms=p.slo.ttft_ms, tpot_ms=p.slo.tpot_ms,
                           priority=p.slo.priority,
                           # when the HTTP handler got it (parsing and tokenizing count against the TTFT)
                           arrival_time=time.time() - (time.monotonic() - p.t0))
        if self.admit is not None:
            verdict = self.admit(hint)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            ok, retry_after = verdict
            if not ok:
                headers = {"Retry-After": str(max(1, int(round(retry_after or 1))))}
                raise APIError(429, f"no replica can meet the {p.slo.name!r} SLO now; retry later",
                               code="slo_unattainable", headers=headers)
        return hint

    # ---- responses ---------------------------------------------------------------------------
    def _done(self, run: _Run, status: int) -> None:
        p = run.p
        if self.events is not None:
            self.events.on_finish(run.hint, run.num_generated, status, time.monotonic())
        e2e = time.monotonic() - p.t0
        ttft = None if run.t_first is None else run.t_first - p.t0
        tpot = run.tpot()
        attained = p.slo.attained(ttft, tpot) if status == 200 else None
        self.metrics.request_done(endpoint=p.kind, status=status, slo_class=p.slo.name,
                                  prompt_tokens=len(p.prompt_ids) if run.t_first is not None else 0,
                                  completion_tokens=run.num_generated,
                                  ttft_s=ttft, tpot_s=tpot, e2e_s=e2e if status == 200 else None, attained=attained)

    async def _collect(self, run: _Run, stream, first_out) -> Response:
        p = run.p
        texts = [first_out[0]]
        lps = [first_out[1]] if first_out[1] is not None else []
        finished = first_out[2]
        try:
            while not finished:
                item = await stream.__anext__()
                text, lp, finished = run.add(item)
                texts.append(text)
                if lp is not None:
                    lps.append(lp)
        except asyncio.CancelledError:
            stream.close(abort=True)
            self._done(run, 499)
            raise
        except StopAsyncIteration:
            run.finish_reason = run.finish_reason or "abort"
        except APIError as e:
            stream.close(abort=True)
            self._done(run, e.status)
            return JSONResponse(e.body(), status_code=e.status)
        except Exception as e:
            stream.close(abort=True)
            logger.exception("request %s failed", p.rid)
            self._done(run, 503)
            err = APIError(503, f"the model replica failed: {type(e).__name__}")
            return JSONResponse(err.body(), status_code=503)
        stream.close(abort=not run.engine_finished)  # not finished: a stop string seen here first
        logprobs = _merge_logprobs(p.kind, lps) if p.params.logprobs is not None else None
        created = int(time.time())
        name = p.req.model or self.model_names[0]
        build = completion_response if p.kind == "completions" else chat_response
        body = build(p.rid, created, name, "".join(texts), run.finish_reason, logprobs, run.usage())
        self._done(run, 200)
        return Response(_dumps(body), media_type="application/json")

    async def _sse(self, run: _Run, stream, first_out) -> AsyncIterator[bytes]:
        p = run.p
        created = int(time.time())
        name = p.req.model or self.model_names[0]
        with_usage = p.req.include_usage
        chat = p.kind == "chat"
        status = 499  # unless the stream gets to its end
        finished = False
        try:
            if chat:
                yield _sse(chat_chunk(p.rid, created, name, {"role": "assistant", "content": ""}, None, None,
                                      with_usage))
            out = first_out
            while True:
                text, lp, finished = out
                if text or lp is not None or finished:
                    reason = run.finish_reason if finished else None
                    if chat:
                        delta = {"content": text} if text else {}
                        yield _sse(chat_chunk(p.rid, created, name, delta, reason, lp, with_usage))
                    else:
                        yield _sse(completion_chunk(p.rid, created, name, text, reason, lp, with_usage))
                if finished:
                    break
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    run.finish_reason = "abort"
                    out = ("", None, True)
                    continue
                out = run.add(item)
            if with_usage:
                yield _sse(usage_chunk(p.rid, created, name, "chat.completion.chunk" if chat else "text_completion",
                                       run.usage()))
            yield _DONE
            status = 200
        except APIError as e:
            status = e.status
            yield _sse(e.body())
            yield _DONE
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            logger.exception("stream %s failed", p.rid)
            status = 503
            yield _sse(APIError(503, f"the model replica failed: {type(e).__name__}").body())
            yield _DONE
        finally:
            # not finished there: the client is gone, an error, or a stop string seen here first
            stream.close(abort=not run.engine_finished)
            self._done(run, status)


def _merge_logprobs(kind: str, parts: list[dict]) -> dict | None:
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
