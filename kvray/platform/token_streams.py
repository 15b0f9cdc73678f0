"""A replica's side of the token-stream protocol: how a request's tokens go back to the Router.
The Router's side is ``kvray.frontend.replica_client``; the records are ``kvray.records``'
``TokenBatch``, ``Refusal`` and ``Bound``. ``TokenStreams`` holds it, mixed into the deployment
class (``kvray.platform.replica.LLMReplica``), whose streaming methods ``generate`` and
``channel`` are.

Each request is one streaming handle call, ``generate``, that stays open while the request runs
(so Serve's ongoing-request count, ``max_ongoing_requests``, autoscaling and cancellation all see
real requests). Its tokens travel one of two ways:

* ``channel=None``: in that call's own stream: ``Bound`` (the replica's name), then one item
  per engine step;
* ``channel=<id>`` (what the Router uses): through the caller's token channel, one streaming
  ``channel(id)`` call per (Router process, replica) that carries every request's new tokens
  of an engine step in one item. Ray Serve's cost per streamed item is far larger than the
  per-token work, so at hundreds of streams this is what keeps the Router and the replica's
  event loop from becoming the bottleneck. The request's own stream then carries only a
  ``Bound`` once the engine has the request. A request's first batch goes ahead of the others
  in the channel.

Either way a request the engine refuses gets one ``Refusal`` instead (400 bad input, 429 its
queue is full, 503 it cannot serve). Batches are built by a per-request callback
(``_Request.on_delta``) when a step's results arrive: no coroutine is woken per request and
step. ``CHANNEL_SLOTS`` is what the protocol adds to a replica's ``max_ongoing_requests``.
"""
from __future__ import annotations

import asyncio
import time

from kvray import tracing
from kvray.records import Bound, Refusal, RoutingHint, TokenBatch
from kvray.replica.async_engine import QueueFull
from kvray.replica.sampling_params import SamplingParams

CHANNEL_SLOTS = 32  # ongoing calls beyond the engine's limit: token channels, refusals on their way back
CHANNEL_IDLE_CLOSE_S = 5.0  # a channel with no requests closes (so a draining replica can finish)
ORPHAN_TIMEOUT_S = 60.0  # requests whose channel never (re)connects are aborted after this


class _Active:
    __slots__ = ("prompt", "decode_budget", "generated", "started")

    def __init__(self, prompt: int, decode_budget: int):
        self.prompt = prompt
        self.decode_budget = decode_budget
        self.generated = 0
        self.started = False

    def outstanding(self) -> int:
        return (0 if self.started else self.prompt) + max(0, self.decode_budget - self.generated)


class _Outbox:
    """Batches waiting for one caller's channel. A request's first batch goes ahead of the
    batches of requests already streaming: the caller hands a channel item's batches to its
    streams in order, so a new request's first token (its TTFT) does not wait behind the
    SSE chunks of every running stream."""

    def __init__(self):
        self.items: list = []
        self.num_first = 0  # items[:num_first] are first batches
        self.event = asyncio.Event()
        self.readers = 0
        self.requests = 0
        self.last_read = time.monotonic()

    def push(self, request_id: str, batch: TokenBatch, first: bool = False) -> None:
        if not self.readers and time.monotonic() - self.last_read > ORPHAN_TIMEOUT_S:
            raise RuntimeError("no token channel has read this request's output for too long")
        if first:
            self.items.insert(self.num_first, (request_id, batch))
            self.num_first += 1
        else:
            self.items.append((request_id, batch))
        self.event.set()

    def take(self) -> list:
        items, self.items, self.num_first = self.items, [], 0
        return items


class _Request:
    """One request's token batches, built on the event loop straight from the engine's deltas
    (no coroutine wakes per step): into its caller's channel outbox, or its own queue. With a
    stream interval, batches that come sooner than it after the last one sent are merged into
    the next (the first and the last go out at once)."""

    __slots__ = ("replica", "request_id", "active", "box", "queue", "done", "finished", "pending", "last_sent")

    def __init__(self, replica: "TokenStreams", request_id: str, active: _Active, box: _Outbox | None):
        self.replica, self.request_id, self.active, self.box = replica, request_id, active, box
        self.queue: asyncio.Queue | None = asyncio.Queue() if box is None else None
        self.done = asyncio.get_running_loop().create_future()
        self.finished = False
        self.pending: TokenBatch | None = None
        self.last_sent = 0.0

    def on_delta(self, d) -> None:
        if isinstance(d, BaseException):
            self._end(d)
            return
        first = not self.active.started  # the first batch is never held back by the stream interval
        self.active.started = True
        if d.queue_time_s is not None:
            self.replica.metrics.queue_time(d.queue_time_s)
        batch = TokenBatch.of(d)
        self.active.generated += len(batch.ids)
        if self.replica._first_token_at is None and batch.ids:
            self.replica._first_token_at = time.time()
        if self.pending is not None:
            batch = self.pending.merge(batch)
            self.pending = None
        interval = self.replica._interval_s
        if not d.finished and interval:
            now = time.monotonic()
            if self.last_sent and now - self.last_sent < interval:
                self.pending = batch
                return
            self.last_sent = now
        try:
            if self.box is not None:
                self.box.push(self.request_id, batch, first=first)
            else:
                self.queue.put_nowait(batch)
        except RuntimeError as e:  # nobody reads this request's channel any more
            self._end(e)
            return
        if d.finished:
            self.finished = True
            if not self.done.done():
                self.done.set_result(None)

    def _end(self, error: BaseException) -> None:
        if self.queue is not None:
            self.queue.put_nowait(error)
        elif not self.done.done():
            self.done.set_exception(error)
            self.done.exception()  # retrieved: if the caller is already gone, nobody else will


class TokenStreams:
    """The requests a replica streams, and its channels. The deployment class sets ``engine``
    (an ``AsyncLLMEngine``) and calls ``__init__``."""

    engine = None

    def __init__(self, replica_id: str, metrics, stream_interval_ms: float = 0.0):
        self._replica_id = replica_id
        self.metrics = metrics  # kvray.metrics.ReplicaMetrics
        self._interval_s = max(0.0, stream_interval_ms) / 1000.0
        self._active: dict[str, _Active] = {}
        self._outboxes: dict[str, _Outbox] = {}
        self._num_requests = 0
        self._num_aborted = 0  # requests that ended before the engine finished them (caller gone)
        self._first_token_at: float | None = None  # wall clock of the first token it produced

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       hint: RoutingHint | None = None, channel: str | None = None):
        if tracing.ENABLED:
            tracing.trace(request_id, "replica_in")
        box = None
        if channel is not None:
            box = self._outboxes.get(channel)
            if box is None:
                box = self._outboxes[channel] = _Outbox()
            box.requests += 1
        budget = hint.decode_estimate if hint is not None else params.max_tokens
        req = _Request(self, request_id, _Active(len(prompt_token_ids), budget), box)
        self._num_requests += 1
        try:
            # The engine gets the request before anything goes back to the caller: its first
            # step does not wait on Serve sending the stream's first item.
            try:
                self.engine.submit(request_id, prompt_token_ids, params, req.on_delta)
            except (ValueError, RuntimeError) as e:
                req.finished = True
                yield self._refusal(e)
                return
            self._active[request_id] = req.active
            yield Bound(self._replica_id)  # the caller binds the request to our channel, or reads on
            if box is not None:
                await req.done  # the tokens go through the channel
            else:
                while True:
                    batch = await req.queue.get()
                    if isinstance(batch, BaseException):
                        raise batch
                    yield batch
                    if batch.finish_reason is not None:
                        return
        finally:
            self._active.pop(request_id, None)
            if not req.finished:
                self._num_aborted += 1
                self.engine.abort(request_id)  # the caller went away (or an error): free the blocks now
            if box is not None:
                box.requests -= 1
                box.event.set()  # let an idle channel notice

    async def channel(self, channel: str, hint: RoutingHint | None = None):
        """One caller's token channel: yields lists of ``(request_id, batch)``, one list per wake-up.

        Ends by itself after ``CHANNEL_IDLE_CLOSE_S`` without requests of this caller (the
        caller reopens it on demand), so a draining replica is not held open by it.
        """
        box = self._outboxes.get(channel)
        if box is None:
            box = self._outboxes[channel] = _Outbox()
        box.readers += 1
        try:
            yield Bound(self._replica_id)  # the caller checks that the pin reached this replica
            while True:
                if not box.items:
                    if box.requests == 0:
                        try:
                            await asyncio.wait_for(box.event.wait(), CHANNEL_IDLE_CLOSE_S)
                        except asyncio.TimeoutError:
                            if box.requests == 0 and not box.items:
                                return
                    else:
                        await box.event.wait()
                box.event.clear()
                if box.items:
                    items = box.take()
                    box.last_read = time.monotonic()
                    yield items
        finally:
            box.readers -= 1
            box.last_read = time.monotonic()
            if box.readers == 0 and box.requests == 0 and not box.items:
                self._outboxes.pop(channel, None)

    def _refusal(self, e: Exception) -> Refusal:
        if isinstance(e, ValueError):  # bad input: refused before touching the engine state
            return Refusal(400, str(e), replica_id=self._replica_id)
        if isinstance(e, QueueFull):  # at its queue limit: the caller may try another replica, then 429
            return Refusal(429, str(e), e.retry_after_s, self._replica_id)
        # shutting down, or the engine loop died: retry elsewhere
        return Refusal(503, str(e), replica_id=self._replica_id)

    def stream_stats(self) -> dict:
        """The ``ReplicaStats`` fields this side counts."""
        return dict(outstanding_tokens=sum(a.outstanding() for a in self._active.values()),
                    num_active_requests=len(self._active), num_requests_total=self._num_requests,
                    num_aborted_total=self._num_aborted,
                    num_channels=sum(1 for b in self._outboxes.values() if b.readers),
                    first_token_at=self._first_token_at)
