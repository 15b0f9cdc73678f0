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
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.responses import JSONResponse, Response, StreamingResponse

from kvray import tracing
from kvray.platform.metrics import ServingMetrics
from kvray.platform.protocol import (APIError, ChatCompletionRequest, CompletionRequest, chat_chunk, chat_response,
                                     completion_chunk, completion_response, parse_json, parse_request, usage,
                                     usage_chunk)
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


INLINE_TOKENIZE_CHARS = 16384  # longer prompts are tokenized (and chat-templated) off the event loop
QUEUE_FULL_RETRY_AFTER_S = 1
MAX_ATTEMPTS = 3  # dispatches of one request: a replica that is full or gone before its first token is skipped


@dataclass
class ModelInfo:
    tokenizer: Any
    max_model_len: int
    block_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        # The most characters one token can stand for (vocabulary strings hold at least one
        # character per character of text): a prompt of more than max_model_len * this many
        # characters cannot fit, and is refused without being tokenized. x2 for normalizers.
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        self.max_token_chars = 2 * max((len(t) for t in vocab), default=64)

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_model_len * self.max_token_chars:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the "
                           f"prompt has {num_chars} characters, more than that many tokens can hold.",
                           param=param, code="context_length_exceeded")


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
                 events: Any = None, replica_of: Callable[[str], str | None] | None = None,
                 replica_ids: Callable[[], list[str]] | None = None,
                 capacity: Callable[[], int | None] | None = None):
        """``admit(hint)`` -> ``(ok, retry_after_s)`` or an awaitable of it, asked before dispatch
        (an SLO-aware policy may wait there, or refuse: 429 with Retry-After). ``replica_of(request_id)``
        names the replica a request was last routed to and ``replica_ids()`` the live ones (for
        retries that leave a failed replica out). ``capacity()``: how many requests the replicas
        admit in all; with that many of this Router's own in flight, a new one gets a 429 at
        once, before it is parsed (the replicas' own queue limits catch what several Routers
        send together). ``events``, if
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
        self.replica_of = replica_of
        self.replica_ids = replica_ids
        self.capacity = capacity
        self.num_in_flight = 0  # requests of this Router dispatched (or being dispatched), not yet done
        self.decoder = FastDecoder.wrap(info.tokenizer)
        self.strings = TokenStrings(self.decoder)

    # ---- entry point -------------------------------------------------------------------------
    async def handle(self, kind: str, body: bytes, headers) -> Response:
        t0 = time.monotonic()
        slo_label = "none"
        try:
            self._shed_if_full()
            p = await self._prepare(kind, body, headers, t0)
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_in", t0)
            slo_label = p.slo.name
            hint = await self._admitted_hint(p)
        except APIError as e:
            self.metrics.request_done(endpoint=kind, status=e.status, slo_class=slo_label)
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except asyncio.CancelledError:  # the client left while the request waited for admission
            self.metrics.request_done(endpoint=kind, status=499, slo_class=slo_label)
            raise
        run = _Run(p, self, hint)
        self.num_in_flight += 1
        try:  # the first batch decides between an error status and a 200
            stream, first = await self._dispatch(p, hint)
            first_out = run.add(first)
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_first_out")
        except asyncio.CancelledError:
            self._done(run, 499)
            raise
        except APIError as err:
            self._done(run, err.status)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        if p.req.stream:
            return _EventStream(self._sse(run, stream, first_out), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(run, stream, first_out)

    def _shed_if_full(self) -> None:
        limit = self.capacity() if self.capacity is not None else None
        if limit is not None and self.num_in_flight >= limit:
            raise APIError(429, f"the model is at capacity ({self.num_in_flight} requests in flight, every replica's "
                           "queue is full); retry later", code="queue_full",
                           headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})

    async def _dispatch(self, p: _Prepared, hint: RoutingHint) -> tuple[Any, dict]:
        """Send the request to a replica and wait for its first batch. A replica that answers
        before any token that it is full (429) or cannot serve (503: its engine died), or that
        is gone (the call fails), is left out and the request goes to another one, up to
        ``MAX_ATTEMPTS`` dispatches; a full queue everywhere is a 429 with Retry-After at once."""
        for attempt in range(MAX_ATTEMPTS):
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_submitted")
            stream = self.submit(p.rid, p.prompt_ids, p.params, hint)
            try:
                item = await stream.__anext__()
            except asyncio.CancelledError:
                stream.close(abort=True)
                raise
            except StopAsyncIteration:
                stream.close(abort=True)
                raise APIError(500, "the replica ended the stream without output") from None
            except Exception as e:  # noqa: BLE001 - the replica died, a lost channel...
                stream.close(abort=True)
                replica = self.replica_of(p.rid) if self.replica_of is not None else None
                logger.warning("request %s: replica %s failed before its first token (%s: %s)", p.rid, replica,
                               type(e).__name__, e)
                err = APIError(503, f"the model replica failed: {type(e).__name__}")
                status = 503
            else:
                if not item.get("error"):
                    return stream, item
                stream.close(abort=True)
                status, replica = int(item.get("status", 500)), item.get("replica")
                headers = None
                if status == 429:
                    headers = {"Retry-After": str(max(1, math.ceil(item.get("retry_after") or 1)))}
                err = APIError(status, item["error"], code="queue_full" if status == 429 else None,
                               headers=headers)
            if status not in (429, 503) or attempt + 1 >= MAX_ATTEMPTS:
                raise err
            avoid = hint.avoid + ((replica,) if replica else ())
            if status == 429 and self.replica_ids is not None and not set(self.replica_ids()) - set(avoid):
                raise err  # every replica is full: answer now, the client retries later
            hint.avoid = avoid
        raise AssertionError("unreachable")

    # ---- request preparation -----------------------------------------------------------------
    async def _prepare(self, kind: str, body: bytes, headers, t0: float) -> _Prepared:
        req = parse_request(CompletionRequest if kind == "completions" else ChatCompletionRequest, parse_json(body))
        if req.model is not None and req.model not in self.model_names:
            raise APIError(404, f"The model '{req.model}' does not exist. Served: {', '.join(self.model_names)}",
                           param="model", code="model_not_found")
        try:
            slo = resolve_slo(self.slo_classes, self.default_slo_class, header_class=headers.get("x-slo-class"),
                              body_class=req.slo_class, header_ttft_ms=headers.get("x-slo-ttft-ms"),
                              header_tpot_ms=headers.get("x-slo-tpot-ms"))
        except SLOError as e:
            raise APIError(400, str(e), param=e.param) from None
        prompt_ids = await (self._completion_prompt(req) if kind == "completions" else self._chat_prompt(req))
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
        try:
            params = SamplingParams(
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p), top_k=-1 if req.top_k is None else req.top_k,
                max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
                ignore_eos=bool(req.ignore_eos), seed=req.seed, logprobs=logprobs, min_tokens=req.min_tokens or 0,
                slo_class=slo.name, ttft_ms=slo.ttft_ms, tpot_ms=slo.tpot_ms, priority=slo.priority)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        rid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}"
        return _Prepared(kind, req, rid, prompt_ids, params, slo, t0)

    async def _completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts (a list of several prompts) are not supported; send one "
                               "prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            self.info.check_prompt_chars(len(prompt), "prompt")
            return await _off_loop_if(len(prompt), lambda: list(self.info.tokenizer(prompt).input_ids))
        vocab = self.info.vocab_size
        for t in prompt:
            if t < 0 or t >= vocab:
                raise APIError(400, f"prompt token id {t} is outside the vocabulary [0, {vocab})", param="prompt")
        return list(prompt)

    async def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        chars = sum(len(m["content"]) for m in messages)
        self.info.check_prompt_chars(chars, "messages")
        tok = self.info.tokenizer

        def render() -> list[int]:
            try:
                text = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=req.add_generation_prompt is not False,
                                               **(req.chat_template_kwargs or {}))
                return list(tok(text, add_special_tokens=False).input_ids)
            except Exception as e:  # no template, a template that rejects these messages, bad kwargs...
                raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None

        return await _off_loop_if(chars, render)

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
        self.num_in_flight -= 1
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


class _EventStream(StreamingResponse):
    """An SSE response whose client may leave at any time. Under Ray Serve, waiting for the
    disconnect raises (the proxy's receive call is cancelled) instead of returning a disconnect
    message; that ends the wait the same way here, so the stream is cancelled and cleaned up as
    on any disconnect and no exception escapes into Serve's request task (whose future nobody
    retrieves: "Future exception was never retrieved" in the replica log)."""

    async def listen_for_disconnect(self, receive) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except Exception:  # noqa: BLE001 - the client is gone
            pass


async def _off_loop_if(num_chars: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` inline for short text; in a worker thread for long text, so that tokenizing a large
    prompt never stalls the event loop that streams every other request's tokens (the
    tokenizers library releases the GIL while it works)."""
    if num_chars <= INLINE_TOKENIZE_CHARS:
        return fn()
    return await asyncio.to_thread(fn)


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
