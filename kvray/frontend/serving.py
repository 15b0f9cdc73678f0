"""OpenAI completions and chat completions on top of a replica token stream.

One ``OpenAIServing`` per Router replica. For each request it sheds load when every replica's
queue is full, prepares the request (``kvray.frontend.prepare``), has the routing policy admit
it (``kvray.router.dispatch``: dispatch, hold, or a 429), submits it (the Serve handle call that
kvray's request router carries to the chosen replica), retries elsewhere a replica that refused
it or failed before its first token, then detokenizes the returned ``TokenBatch``es into a JSON
response or an SSE stream. Errors use the OpenAI error shape; a client that goes away cancels
the replica call, which aborts the request in the engine.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, AsyncIterator, Callable

from starlette.responses import JSONResponse, Response, StreamingResponse

from kvray import tracing
from kvray.frontend.metrics import ServingMetrics
from kvray.frontend.prepare import ModelInfo, Prepared, prepare
from kvray.frontend.protocol import (APIError, chat_chunk, chat_response, completion_chunk, completion_response,
                                     usage, usage_chunk)
from kvray.frontend.text_stream import FastDecoder, TextStream, TokenStrings, chat_logprobs, completion_logprobs
from kvray.records import Refusal, RoutingHint, TokenBatch
from kvray.replica.sampling_params import SamplingParams
from kvray.router.dispatch import Dispatcher
from kvray.router.policy import DISPATCH
from kvray.slo import SLOTarget

logger = logging.getLogger(__name__)

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

_DONE = b"data: [DONE]\n\n"
QUEUE_FULL_RETRY_AFTER_S = 1
MAX_ATTEMPTS = 3  # dispatches of one request: a replica that is full or gone before its first token is skipped


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


class _Run:
    """The state of one request while its tokens come back."""

    def __init__(self, p: Prepared, serving: "OpenAIServing"):
        self.p = p
        self.dispatcher = serving.dispatcher
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
                 metrics: ServingMetrics, dispatcher: Dispatcher | None = None):
        """``dispatcher`` routes and admits every request (without one, each goes straight to
        ``submit``, unrouted: tests). A Router that alone holds as many requests as the replicas
        admit (``dispatcher.book.capacity()``) refuses new ones with a 429 before parsing them;
        the replicas' own queue limits catch what several Routers send together."""
        self.info = info
        self.model_names = model_names
        self.slo_classes = slo_classes
        self.default_slo_class = default_slo_class
        self.decode_cap = decode_estimate_cap
        self.submit = submit
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.decoder = FastDecoder.wrap(info.tokenizer)
        self.strings = TokenStrings(self.decoder)
        self.num_in_flight = 0  # requests of this Router dispatched (or being dispatched), not yet done

    # ---- entry point -------------------------------------------------------------------------
    async def handle(self, kind: str, body: bytes, headers) -> Response:
        t0 = time.monotonic()
        slo_label = "none"
        try:
            self._shed_if_full()
            p = await prepare(kind, body, headers, t0, info=self.info, model_names=self.model_names,
                              slo_classes=self.slo_classes, default_slo_class=self.default_slo_class)
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_in", t0)
            slo_label = p.slo.name
            hint = await self._admit(p)
        except APIError as e:
            self.metrics.request_done(endpoint=kind, status=e.status, slo_class=slo_label)
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except asyncio.CancelledError:  # the client left while the request waited for admission
            self.metrics.request_done(endpoint=kind, status=499, slo_class=slo_label)
            raise
        run = _Run(p, self)
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
        limit = self.dispatcher.book.capacity() if self.dispatcher is not None else None
        if limit is not None and self.num_in_flight >= limit:
            raise APIError(429, f"the model is at capacity ({self.num_in_flight} requests in flight, every replica's "
                           "queue is full); retry later", code="queue_full",
                           headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})

    async def _admit(self, p: Prepared) -> RoutingHint:
        hint = p.hint(self.info.block_size, self.decode_cap)
        if self.dispatcher is None:
            return hint
        d = await self.dispatcher.admit(hint)
        if d.action != DISPATCH:
            raise APIError(429, f"no replica can meet the {p.slo.name!r} SLO now; retry later", code="slo_unattainable",
                           headers={"Retry-After": str(max(1, int(round(d.retry_after_s or 1))))})
        return hint

    async def _dispatch(self, p: Prepared, hint: RoutingHint) -> tuple[Any, TokenBatch]:
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
                replica = self.dispatcher.book.replica_of(p.rid) if self.dispatcher is not None else None
                logger.warning("request %s: replica %s failed before its first token (%s: %s)", p.rid, replica,
                               type(e).__name__, e)
                err, status = APIError(503, f"the model replica failed: {type(e).__name__}"), 503
            else:
                if not isinstance(item, Refusal):
                    return stream, item
                stream.close(abort=True)
                status, replica = item.status, item.replica_id
                headers = {"Retry-After": str(max(1, math.ceil(item.retry_after_s or 1)))} if status == 429 else None
                err = APIError(status, item.message, code="queue_full" if status == 429 else None, headers=headers)
            if status not in (429, 503) or attempt + 1 >= MAX_ATTEMPTS:
                raise err
            hint.avoid += (replica,) if replica else ()
            if self.dispatcher is not None:  # decided again, without the replicas that failed it
                if status == 429 and not set(self.dispatcher.book.replica_ids()) - set(hint.avoid):
                    raise err  # every replica is full: answer now, the client retries later
                if self.dispatcher.decide(hint).action != DISPATCH:
                    raise err
        raise AssertionError("unreachable")

    # ---- responses ---------------------------------------------------------------------------
    def _done(self, run: _Run, status: int) -> None:
        self.num_in_flight -= 1
        p = run.p
        if self.dispatcher is not None:
            self.dispatcher.on_finish(p.rid, run.num_generated)
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
                text, lp, finished = run.add(await stream.__anext__())
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
        name = p.req.model or self.model_names[0]
        build = completion_response if p.kind == "completions" else chat_response
        body = build(p.rid, int(time.time()), name, "".join(texts), run.finish_reason, logprobs, run.usage())
        self._done(run, 200)
        return Response(_dumps(body), media_type="application/json")

    async def _sse(self, run: _Run, stream, first_out) -> AsyncIterator[bytes]:
        p = run.p
        created = int(time.time())
        name = p.req.model or self.model_names[0]
        with_usage = p.req.include_usage
        chat = p.kind == "chat"
        status = 499  # unless the stream gets to its end
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
                        yield _sse(chat_chunk(p.rid, created, name, {"content": text} if text else {}, reason, lp,
                                              with_usage))
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
