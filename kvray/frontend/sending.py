"""A request's replica side in the Router: each choice sent to a replica and its batches read back.

``Sender`` admits each prompt of a request through the routing policy (the choice's
``RequestLife``, ``kvray.router.dispatch``: dispatch, hold, or a 429), sends it with the
``ReplicaClient`` (``kvray.frontend.replica_client``), retries elsewhere a replica that refused it
or failed before its first token, and hands back each batch turned into output (``Choice.add``),
telling the request's life its first token and the metrics its inter-token gaps.
"""
from __future__ import annotations

import asyncio
import logging
import math

from kvray import tracing
from kvray.frontend.choice import Choice, RequestState
from kvray.frontend.drain import Drain
from kvray.frontend.errors import APIError
from kvray.frontend.replica_client import ReplicaClient
from kvray.metrics import RouterMetrics
from kvray.records import Refusal, TokenBatch
from kvray.router.dispatch import Dispatcher
from kvray.router.policy import DISPATCH

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # dispatches of one request: a replica that is full or gone before its first token is skipped


class Sender:
    def __init__(self, client: ReplicaClient, dispatcher: Dispatcher, drain: Drain, metrics: RouterMetrics,
                 block_size: int, decode_estimate_cap: int):
        self.client = client
        self.dispatcher = dispatcher
        self.drain = drain
        self.metrics = metrics
        self.block_size = block_size
        self.decode_cap = decode_estimate_cap

    async def admit(self, c: Choice) -> float | None:
        """Route the choice's prompt (its ``RequestLife``, admitted by the policy); the policy's
        predicted TTFT (if it predicts one). Raises the 429 (or the drain's 503) of a refusal."""
        c.life = life = self.dispatcher.life(c.p.hint(self.block_size, self.decode_cap))
        d = await life.admit()
        if d.action != DISPATCH:
            raise self.drain.no_replica_error() or APIError(
                429, f"no replica can meet the {c.p.slo.name!r} SLO now; retry later", code="slo_unattainable",
                headers={"Retry-After": str(max(1, int(round(d.retry_after_s or 1))))})
        return d.predicted_ttft_s

    async def send_all(self, req: RequestState) -> list[tuple]:
        """Send every choice, prompt after prompt, and return each one's first output. A prompt's
        first choice goes where the policy sent it (admitted already). Its other choices
        (``n > 1``) follow it to that replica once its first token shows that the prompt is
        computed there: they find it in the prefix cache, so the prompt is prefilled once."""
        n, outs = req.p.n, []
        for i in range(0, len(req.choices), n):
            first, *others = req.choices[i:i + n]
            outs.append(await self.send(first))
            # One after another: dispatched together, a choice's call was at times never delivered
            # (Ray Serve 2.60 routed only some of a burst of calls made from one HTTP request).
            for c in others:
                c.life = self.dispatcher.life(c.p.hint(self.block_size, self.decode_cap))
                c.life.follow(first.life.replica)
                outs.append(await self.send(c))
        return outs

    async def send(self, c: Choice) -> tuple:
        """Send the choice to a replica (``c.stream``) and return its first output. A replica
        that answers before any token that it is full (429) or cannot serve (503: its engine
        died), or that is gone (the call fails), is left out and the request goes to another one,
        up to ``MAX_ATTEMPTS`` dispatches; a full queue everywhere is a 429 with Retry-After at once."""
        p, life = c.p, c.life
        for attempt in range(MAX_ATTEMPTS):
            self.drain.check()
            if tracing.ENABLED:
                tracing.trace(p.rid, "router_submitted")
            c.stream = stream = self.client.send(life.hint, p.prompt_ids, p.params, life.bound)
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
                replica = life.replica
                logger.warning("request %s: replica %s failed before its first token (%s: %s)", p.rid, replica,
                               type(e).__name__, e)
                err, status = replica_failed(e), 503
            else:
                if not isinstance(item, Refusal):
                    return self.received(c, item)
                stream.close(abort=True)
                status, replica = item.status, item.replica_id
                headers = {"Retry-After": str(max(1, math.ceil(item.retry_after_s or 1)))} if status == 429 else None
                err = APIError(status, item.message, code="queue_full" if status == 429 else None, headers=headers)
            if status not in (429, 503) or attempt + 1 >= MAX_ATTEMPTS or not life.retry(replica, status == 429):
                raise err
        raise AssertionError("unreachable")

    def received(self, c: Choice, batch: TokenBatch | Refusal) -> tuple:
        """One batch of the choice -> ``(text, logprobs, finished)``; its first token goes to the
        request's life (the book, and the requests held for capacity), its gaps to the metrics."""
        out = c.add(batch)
        if c.gap is not None:
            self.metrics.token_gap(c.gap, len(batch.ids), c.p.slo.name)
        elif c.new_first:
            c.life.first_token()
        return out

    async def next_output(self, c: Choice) -> tuple:
        try:
            batch = await c.stream.__anext__()
        except StopAsyncIteration:  # the replica ended the stream without a last batch
            c.finish_reason = c.finish_reason or "abort"
            return "", None, True
        return self.received(c, batch)


def replica_failed(e: BaseException) -> APIError:
    """The 503 for a replica that failed mid-request, saying why: a Ray call error carries the
    replica's own exception as ``cause`` ("the engine process died (killed by SIGKILL)"), not a
    bare ``RayTaskError(RuntimeError)``."""
    cause = getattr(e, "cause", None) or e
    return APIError(503, f"the model replica failed: {str(cause).strip() or type(cause).__name__}")
