"""The Router's serving loop: every generation API on top of a replica token stream.

One ``OpenAIServing`` per Router replica. For each request it sheds load when every replica's
queue is full, has the request's API prepare it (``kvray.frontend.api``: OpenAI completions and
chat, Responses, Anthropic Messages), has its ``Sender`` (``kvray.frontend.sending``) admit each
prompt through the routing policy, send it to a replica and read its batches back, and hands
the choices' outputs to the API for a JSON response or an SSE stream. Errors use the API's error
shape; a client that goes away cancels the replica call, which aborts the request in the
engine. Each request ends once (``_done``): its lives leave the replica book, its metrics are
recorded.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from starlette.responses import Response

from kvray import tracing
from kvray.frontend.api import API
from kvray.frontend.apis import API_BY_KIND
from kvray.frontend.choice import Choice, RequestState
from kvray.frontend.drain import Drain
from kvray.frontend.errors import APIError
from kvray.frontend.logprobs import TokenStrings
from kvray.frontend.prepare import ModelInfo, Served
from kvray.frontend.replica_client import ReplicaClient
from kvray.frontend.sending import Sender, replica_failed
from kvray.frontend.sse import EventStream, dumps
from kvray.metrics import RouterMetrics
from kvray.replica.detokenizer import FastDecoder
from kvray.router.dispatch import Dispatcher
from kvray.slo import SLOTarget

logger = logging.getLogger(__name__)

QUEUE_FULL_RETRY_AFTER_S = 1


class OpenAIServing:
    def __init__(self, *, info: ModelInfo, model_names: list[str], slo_classes: dict[str, SLOTarget],
                 default_slo_class: str, decode_estimate_cap: int, client: ReplicaClient, metrics: RouterMetrics,
                 dispatcher: Dispatcher, drain: Drain | None = None):
        """``client`` sends a request to a replica and returns its token stream; ``dispatcher``
        routes and admits every request. A Router that alone holds as many requests as the
        replicas admit (``dispatcher.book.capacity()``) refuses new ones with a 429 before parsing
        them; the replicas' own queue limits catch what several Routers send together. ``drain``
        (``kvray.frontend.drain``) ends the requests still running when the Router, or the replica
        they are on, has been stopping for ``graceful_shutdown_timeout_s``."""
        self.info = info
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.drain = drain if drain is not None else Drain(30.0)
        self.sender = Sender(client, dispatcher, self.drain, metrics, info.block_size, decode_estimate_cap)
        self.decoder = FastDecoder.wrap(info.tokenizer)
        self.strings = TokenStrings(self.decoder)
        self.served = Served(info, model_names, slo_classes, default_slo_class)
        self.num_in_flight = 0  # requests of this Router dispatched (or being dispatched), not yet done

    # ---- entry point -------------------------------------------------------------------------
    async def handle(self, kind: str, body: bytes, headers) -> Response:
        """One request of the API ``kind`` (``kvray.frontend.apis.API_BY_KIND``)."""
        api = API_BY_KIND[kind]
        if api.local:
            return await self._answer(api, body)
        try:
            req = await self._admit(api, body, headers)
        except APIError as e:
            return api.error_response(e)
        self.num_in_flight += 1
        self.drain.add(req)
        try:  # the first batches decide between an error status and a 200
            firsts = await self.sender.send_all(req)
            if tracing.ENABLED:
                tracing.trace(req.p.rid, "router_first_out")
        except asyncio.CancelledError:
            self._end(req, 499)
            raise
        except APIError as err:
            self._end(req, err.status)
            return api.error_response(err)
        if api.streams(req.p):
            def abandoned() -> None:  # the response ended: a no-op unless the stream never ran to its end
                if not req.closed:
                    for c in req.choices:
                        if c.stream is not None:
                            c.stream.close(abort=True)
                    self._done(req, 499)

            return EventStream(self._sse(api, req, firsts), abandoned)
        return await self._collect(api, req, firsts)

    async def _admit(self, api: API, body: bytes, headers) -> RequestState:
        """The request prepared by its API, with each prompt admitted by the routing policy. A
        request that goes no further is counted here (its status), and leaves the book."""
        t0 = time.monotonic()
        slo_label, status, choices = "none", 500, []
        try:
            self.drain.check()
            self._shed_if_full()
            p = await api.prepare(body, headers, t0, self.served)
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_in", t0)
            slo_label = p.slo.name
            choices = [Choice(k, p.choice(k), self.decoder, self.strings, self.info.tool_format)
                       for k in range(p.num_choices)]
            predicted = [await self.sender.admit(c) for c in choices[::p.n]]  # each prompt is routed on its own
            status = 0
            return RequestState(p, choices, predicted[0])
        except APIError as e:
            status = e.status
            raise
        except asyncio.CancelledError:  # the client left while the request waited for admission
            status = 499
            raise
        finally:  # a bug (500: the handler answers) or a refusal still counts; admitted prompts leave the book
            if status:
                self.metrics.request_done(endpoint=api.kind, status=status, slo_class=slo_label)
                for c in choices:
                    if c.life is not None:
                        c.life.finish()

    async def _answer(self, api: API, body: bytes) -> Response:
        """A request the Router answers itself (tokenize)."""
        try:
            out, status = await api.answer(body, self.served), 200
        except APIError as e:
            out, status = e, e.status
        self.metrics.request_done(endpoint=api.kind, status=status, slo_class="none")
        if isinstance(out, APIError):
            return api.error_response(out)
        return Response(dumps(out), media_type="application/json")

    def _shed_if_full(self) -> None:
        limit = self.dispatcher.book.capacity()
        if limit is not None and self.num_in_flight >= limit:
            raise APIError(429, f"the model is at capacity ({self.num_in_flight} requests in flight, every replica's "
                           "queue is full); retry later", code="queue_full",
                           headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})

    # ---- responses ---------------------------------------------------------------------------
    def _end(self, req: RequestState, status: int) -> None:
        req.close_streams()
        self._done(req, status)

    def _done(self, req: RequestState, status: int) -> None:
        if req.closed:
            return
        req.closed = True
        self.num_in_flight -= 1
        self.drain.discard(req)
        p, first = req.p, req.choices[0]
        for c in req.choices:
            if c.life is not None:
                c.life.finish(c.num_generated)
        e2e = time.monotonic() - p.t0
        ttft = None if first.t_first is None else first.t_first - p.t0
        tpot = first.tpot()
        attained = p.slo.attained(ttft, tpot) if status == 200 else None
        self.metrics.request_done(endpoint=p.kind, status=status, slo_class=p.slo.name,
                                  prompt_tokens=req.num_prompt_tokens if first.t_first is not None else 0,
                                  completion_tokens=req.num_generated,
                                  ttft_s=ttft, tpot_s=tpot, e2e_s=e2e if status == 200 else None, attained=attained,
                                  predicted_ttft_s=req.predicted_ttft_s)

    async def _outputs(self, req: RequestState, firsts: list[tuple]) -> AsyncIterator[tuple[int, tuple]]:
        """``(choice index, (text, logprobs, finished))`` as the choices' batches come, starting
        with ``firsts``, until every choice has finished. Raises what a batch raised."""
        next_output = self.sender.next_output
        if len(req.choices) == 1:  # the common case, without a task per choice
            c, out = req.choices[0], firsts[0]
            while True:
                yield 0, out
                if out[2]:
                    return
                out = await next_output(c)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice, out: tuple) -> None:
            try:
                while True:
                    queue.put_nowait((c.index, out))
                    if out[2]:
                        return
                    out = await next_output(c)
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((c.index, e))

        tasks = [asyncio.ensure_future(pump(c, out)) for c, out in zip(req.choices, firsts)]
        try:
            left = len(tasks)
            while left:
                i, out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield i, out
                left -= out[2]
        finally:
            for t in tasks:
                t.cancel()

    async def _collect(self, api: API, req: RequestState, firsts: list[tuple]) -> Response:
        texts: list[list[str]] = [[] for _ in req.choices]
        lps: list[list[dict]] = [[] for _ in req.choices]
        try:
            async for i, (text, lp, _) in self._outputs(req, firsts):
                texts[i].append(text)
                if lp is not None:
                    lps[i].append(lp)
        except asyncio.CancelledError:
            self._end(req, 499)
            raise
        except APIError as e:
            self._end(req, e.status)
            return api.error_response(e)
        except Exception as e:
            req.close_streams()
            logger.exception("request %s failed", req.p.rid)
            self._done(req, 503)
            return api.error_response(replica_failed(e))
        req.close_streams()
        body = api.body(req, ["".join(t) for t in texts], lps)
        self._done(req, 200)
        return Response(dumps(body), media_type="application/json")

    async def _sse(self, api: API, req: RequestState, firsts: list[tuple]) -> AsyncIterator[bytes]:
        status = 499  # unless the stream gets to its end
        try:
            async for event in api.events(req, self._outputs(req, firsts)):
                yield event
            status = 200
        except APIError as e:
            status = e.status
            yield api.stream_error(e, req)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            logger.exception("stream %s failed", req.p.rid)
            status = 503
            yield api.stream_error(replica_failed(e), req)
        finally:
            self._end(req, status)
