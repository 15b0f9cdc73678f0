"""The Router's serving loop: every generation API on top of a replica token stream.

One ``OpenAIServing`` per Router replica. For each request it sheds load when every replica's
queue is full, has the request's API prepare it (``kvray.frontend.api``: OpenAI completions and
chat, Responses, Anthropic Messages), has the routing policy admit each of its prompts
(``kvray.router.dispatch``: dispatch, hold, or a 429), submits it (the Serve handle call that
kvray's request router carries to the chosen replica), retries elsewhere a replica that refused
it or failed before its first token, then detokenizes the returned ``TokenBatch``es and hands
them to the API for a JSON response or an SSE stream. Errors use the API's error shape; a
client that goes away cancels the replica call, which aborts the request in the engine.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, AsyncIterator, Callable

from starlette.responses import Response

from kvray import tracing
from kvray.frontend.api import API
from kvray.frontend.apis import API_BY_KIND
from kvray.frontend.choice import Choice, RequestState
from kvray.frontend.drain import Drain
from kvray.frontend.prepare import ModelInfo, Prepared, Served
from kvray.frontend.protocol import APIError
from kvray.frontend.sse import EventStream, dumps
from kvray.frontend.logprobs import TokenStrings
from kvray.metrics import RouterMetrics
from kvray.records import Refusal, RoutingHint, TokenBatch
from kvray.replica.detokenizer import FastDecoder
from kvray.replica.sampling_params import SamplingParams
from kvray.router.dispatch import Dispatcher
from kvray.router.policy import DISPATCH
from kvray.slo import SLOTarget

logger = logging.getLogger(__name__)

QUEUE_FULL_RETRY_AFTER_S = 1
MAX_ATTEMPTS = 3  # dispatches of one request: a replica that is full or gone before its first token is skipped


class OpenAIServing:
    def __init__(self, *, info: ModelInfo, model_names: list[str], slo_classes: dict[str, SLOTarget],
                 default_slo_class: str, decode_estimate_cap: int,
                 submit: Callable[[str, list[int], SamplingParams, RoutingHint], Any],  # -> a RequestStream
                 metrics: RouterMetrics, dispatcher: Dispatcher | None = None, drain: Drain | None = None):
        """``dispatcher`` routes and admits every request (without one, each goes straight to
        ``submit``, unrouted: tests). A Router that alone holds as many requests as the replicas
        admit (``dispatcher.book.capacity()``) refuses new ones with a 429 before parsing them;
        the replicas' own queue limits catch what several Routers send together. ``drain``
        (``kvray.frontend.drain``) ends the requests still running when the Router, or the replica
        they are on, has been stopping for ``graceful_shutdown_timeout_s``."""
        self.info = info
        self.model_names = model_names
        self.slo_classes = slo_classes
        self.default_slo_class = default_slo_class
        self.decode_cap = decode_estimate_cap
        self.submit = submit
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.drain = drain if drain is not None else Drain(30.0)
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
        t0 = time.monotonic()
        slo_label, status, admitted = "none", 500, []
        try:
            self.drain.check()
            self._shed_if_full()
            p = await api.prepare(body, headers, t0, self.served)
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_in", t0)
            slo_label = p.slo.name
            choices = [Choice(k, p.choice(k), self) for k in range(p.num_choices)]
            for c in choices[::p.n]:  # each prompt is routed on its own
                admitted.append((c, *await self._admit(c.p)))
            status = 0
        except APIError as e:
            status = e.status
            return api.error_response(e)
        except asyncio.CancelledError:  # the client left while the request waited for admission
            status = 499
            raise
        finally:  # a bug (500: the handler answers) or a refusal still counts; admitted prompts leave the book
            if status:
                self.metrics.request_done(endpoint=kind, status=status, slo_class=slo_label)
                for c, _, _ in admitted if self.dispatcher is not None else ():
                    self.dispatcher.on_finish(c.p.rid)
        req = RequestState(p, choices, admitted[0][2])
        self.num_in_flight += 1
        self.drain.add(req)
        try:  # the first batches decide between an error status and a 200
            firsts = await self._dispatch_choices(req, [h for _, h, _ in admitted])
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_first_out")
        except asyncio.CancelledError:
            self._end(req, 499)
            raise
        except APIError as err:
            self._end(req, err.status)
            return api.error_response(err)
        if api.streams(p):
            def abandoned() -> None:  # the response ended: a no-op unless the stream never ran to its end
                if not req.closed:
                    for c in choices:
                        if c.stream is not None:
                            c.stream.close(abort=True)
                    self._done(req, 499)

            return EventStream(self._sse(api, req, firsts), abandoned)
        return await self._collect(api, req, firsts)

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
        limit = self.dispatcher.book.capacity() if self.dispatcher is not None else None
        if limit is not None and self.num_in_flight >= limit:
            raise APIError(429, f"the model is at capacity ({self.num_in_flight} requests in flight, every replica's "
                           "queue is full); retry later", code="queue_full",
                           headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})

    async def _admit(self, p: Prepared) -> tuple[RoutingHint, float | None]:
        """The request's hint, routed, and the policy's predicted TTFT (if it predicts one)."""
        hint = p.hint(self.info.block_size, self.decode_cap)
        if self.dispatcher is None:
            return hint, None
        d = await self.dispatcher.admit(hint)
        if d.action != DISPATCH:
            raise self.drain.no_replica_error() or APIError(
                429, f"no replica can meet the {p.slo.name!r} SLO now; retry later", code="slo_unattainable",
                headers={"Retry-After": str(max(1, int(round(d.retry_after_s or 1))))})
        return hint, d.predicted_ttft_s

    async def _dispatch_choices(self, req: RequestState, hints: list[RoutingHint]) -> list[tuple]:
        """Dispatch every choice, prompt after prompt, and return each one's first output. A
        prompt's first choice goes where the policy sends it (``hints``, one per prompt). Its
        other choices (``n > 1``) follow it to that replica once its first token shows that the
        prompt is computed there: they find it in the prefix cache, so the prompt is prefilled once."""
        n, outs = req.p.n, []

        async def one(c: Choice, where: str | None) -> tuple:
            h = c.p.hint(self.info.block_size, self.decode_cap)
            if self.dispatcher is not None:
                self.dispatcher.follow(h, where)
            return c.add(await self._dispatch(c, h))

        for i, hint in enumerate(hints):
            first, *others = req.choices[i * n:(i + 1) * n]
            outs.append(first.add(await self._dispatch(first, hint)))
            where = self.dispatcher.book.replica_of(first.p.rid) if others and self.dispatcher is not None else None
            # One after another: dispatched together, a choice's call was at times never delivered
            # (Ray Serve 2.60 routed only some of a burst of calls made from one HTTP request).
            for c in others:
                outs.append(await one(c, where))
        return outs

    async def _dispatch(self, c: Choice, hint: RoutingHint) -> TokenBatch:
        """Send the choice to a replica (``c.stream``) and wait for its first batch. A replica
        that answers before any token that it is full (429) or cannot serve (503: its engine
        died), or that is gone (the call fails), is left out and the request goes to another one,
        up to ``MAX_ATTEMPTS`` dispatches; a full queue everywhere is a 429 with Retry-After at once."""
        p = c.p
        for attempt in range(MAX_ATTEMPTS):
            self.drain.check()
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_submitted")
            c.stream = stream = self.submit(p.rid, p.prompt_ids, p.params, hint)
            try:
                item = await stream.__anext__()
            except (asyncio.CancelledError, APIError):  # the client left, or the drain ended it
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
                err, status = replica_failed(e), 503
            else:
                if not isinstance(item, Refusal):
                    return item
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
        if self.dispatcher is not None:
            for c in req.choices:
                self.dispatcher.on_finish(c.p.rid, c.num_generated)
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
        if len(req.choices) == 1:  # the common case, without a task per choice
            c, out = req.choices[0], firsts[0]
            while True:
                yield 0, out
                if out[2]:
                    return
                out = await _next_output(c)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice, out: tuple) -> None:
            try:
                while True:
                    queue.put_nowait((c.index, out))
                    if out[2]:
                        return
                    out = await _next_output(c)
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


def replica_failed(e: BaseException) -> APIError:
    """The 503 for a replica that failed mid-request, saying why: a Ray call error carries the
    replica's own exception as ``cause`` ("the engine process died (killed by SIGKILL)"), not a
    bare ``RayTaskError(RuntimeError)``."""
    cause = getattr(e, "cause", None) or e
    return APIError(503, f"the model replica failed: {str(cause).strip() or type(cause).__name__}")


async def _next_output(c: Choice) -> tuple:
    try:
        return c.add(await c.stream.__anext__())
    except StopAsyncIteration:  # the replica ended the stream without a last batch
        c.finish_reason = c.finish_reason or "abort"
        return "", None, True


