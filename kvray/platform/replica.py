"""``LLMReplica``: one kvray engine per Serve replica (on ``engine.tensor_parallel_size`` GPUs of one
node, which ``ray_actor_options.num_gpus`` reserves).

Token streaming. Each request is one streaming handle call, ``generate``, that stays open
while the request runs (so Serve's ongoing-request count, ``max_ongoing_requests``,
autoscaling and cancellation all see real requests). Its tokens travel one of two ways:

* ``channel=None``: in that call's own stream, one item per engine step;
* ``channel=<id>`` (what the Router uses): through the caller's token channel, one streaming
  ``channel(id)`` call per (Router process, replica) that carries every request's new tokens
  of an engine step in one item. Ray Serve's cost per streamed item is far larger than the
  per-token work, so at hundreds of streams this is what keeps the Router and the replica's
  event loop from becoming the bottleneck. The request's own stream then carries only a
  ``Bound`` once the engine has the request, or a ``Refusal`` instead if the engine refuses
  it. A request's first batch goes ahead of the others in the channel.

A batch is a ``kvray.records.TokenBatch``.

The engine's step loop runs in a child process (``AsyncLLMEngine(process=True)``), so this
process's event loop only moves requests and tokens. Batches are built by a per-request
callback (``_Request.on_delta``) when a step's results arrive: no coroutine is woken per
request and step.

Also: ``record_routing_stats`` (polled by the Serve controller and broadcast to the routers: a
``ReplicaStats``, the engine's stats plus the outstanding-token count and a wall-clock ``time``),
``check_health`` (raises once the engine loop died, so Serve replaces the replica) and
shutdown. When Serve stops a replica it routes nothing new to it and waits for its open calls;
the Routers end their requests still running there after the app's
``graceful_shutdown_timeout_s`` and close their channels (``kvray.frontend.drain``), so the calls
end and Serve calls ``__del__``, which stops the engine (what little is left may finish for up
to that timeout) and its process.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from kvray import tracing
from kvray.metrics import MemorySink, ReplicaMetrics
from kvray.records import ROUTING_STATS_KEY, Bound, Refusal, ReplicaStats, RoutingHint, TokenBatch
from kvray.replica.async_engine import QueueFull
from kvray.replica.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

EXIT_GRACE_S = 1.0  # after the engine died: time for the error to reach every open stream, then exit
CHANNEL_IDLE_CLOSE_S = 5.0  # a channel with no requests closes (so a draining replica can finish)
METRICS_PERIOD_S = 1.0  # how often the engine gauges (kvray.metrics) are set
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

    def __init__(self, replica: "LLMReplica", request_id: str, active: _Active, box: _Outbox | None):
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


def _exit_soon(error: BaseException) -> None:
    """The engine is gone and this replica can serve nothing more: report unhealthy from now on
    (``check_health`` raises), and exit the process after ``EXIT_GRACE_S``, so the controller sees
    the actor die and starts a replacement at its next health check instead of waiting for
    several failed ones. Requests sent here meanwhile get a 503, which the Router retries on
    another replica."""
    logger.error("the engine died (%s): this replica exits in %.1f s so Serve replaces it", error, EXIT_GRACE_S)
    timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(1,))
    timer.daemon = True
    timer.start()


class LLMReplica:
    # set before anything in __init__ can fail: Serve calls __del__ on a replica whose start failed
    engine = None
    _metrics_task: asyncio.Task | None = None

    def __init__(self, model: str, engine_options: dict | None = None, shutdown_timeout_s: float = 30.0,
                 stream_interval_ms: float = 0.0, served_model_name: str | None = None):
        from kvray.platform.autoscaling import check_replica_gpus, pin_replica_gpus
        gpu_ids = pin_replica_gpus()  # before torch touches CUDA: a replica sees only the GPUs Ray gave it
        from kvray.replica.async_engine import AsyncLLMEngine  # the engine process loads torch, not this one
        from kvray.replica.config import EngineConfig

        config = EngineConfig(model=model, **(engine_options or {}))
        check_replica_gpus(gpu_ids, config.tensor_parallel_size)
        self._num_gpus = len(gpu_ids)

        try:
            from ray import serve
            self._replica_id = serve.get_replica_context().replica_id.unique_id
            in_serve = True
        except Exception:  # outside Serve (tests)
            self._replica_id, in_serve = "local", False
        # with tensor_parallel_size N the engine process is rank 0 and starts ranks 1..N-1 on the
        # replica's other GPUs (CUDA_VISIBLE_DEVICES, which the engine process inherits)
        self.engine = AsyncLLMEngine(config, process=True, on_death=_exit_soon if in_serve else None)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._interval_s = max(0.0, stream_interval_ms) / 1000.0
        self._active: dict[str, _Active] = {}
        self._outboxes: dict[str, _Outbox] = {}
        self._num_requests = 0
        self._num_aborted = 0  # requests that ended before the engine finished them (caller gone)
        self._started_at = time.time()  # wall clock: when this replica's engine was ready
        self._first_token_at: float | None = None  # wall clock of the first token it produced
        self.metrics = ReplicaMetrics(served_model_name or model, self._replica_id, None if in_serve else MemorySink())

    async def model_info(self) -> dict:
        """What the Router needs before it can tokenize: the tokenizer itself and the limits."""
        tok = self.engine.tokenizer
        stats = self.engine.stats()
        return {"tokenizer": tok, "max_model_len": self.engine.max_model_len,
                "block_size": self.engine.block_size, "model": self.engine.model_name,
                "vocab_size": self.engine.vocab_size, "quantization": self.engine.quantization,
                "kv_cache_dtype": self.engine.kv_cache_dtype,
                "kv_cache_tokens": stats.num_total_blocks * stats.block_size,
                "replica_id": self._replica_id}

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       hint: RoutingHint | None = None, channel: str | None = None):
        if tracing.ENABLED:
            tracing.trace(request_id, "replica_in")
        self._ensure_metrics_task()
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
            except ValueError as e:  # bad input: refused before touching the engine state
                req.finished = True
                yield Refusal(400, str(e), replica_id=self._replica_id)
                return
            except QueueFull as e:  # at its queue limit: the caller may try another replica, then 429
                req.finished = True
                yield Refusal(429, str(e), e.retry_after_s, self._replica_id)
                return
            except RuntimeError as e:  # shutting down, or the engine loop died: retry elsewhere
                req.finished = True
                yield Refusal(503, str(e), replica_id=self._replica_id)
                return
            self._active[request_id] = req.active
            if box is not None:
                yield Bound(self._replica_id)  # the caller binds the request to our channel
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

    # ---- stats, health, shutdown ---------------------------------------------------------------
    def _ensure_metrics_task(self) -> None:
        """The engine gauges, set every ``METRICS_PERIOD_S`` from the replica's event loop."""
        if self._metrics_task is None:
            self._metrics_task = asyncio.get_running_loop().create_task(self._update_metrics())

    async def _update_metrics(self) -> None:
        while True:
            try:
                self.metrics.update(self.engine.stats())
            except Exception:  # noqa: BLE001 - a metrics hiccup must not end the loop
                logger.exception("could not update the replica's metrics")
            await asyncio.sleep(METRICS_PERIOD_S)

    def record_autoscaling_stats(self) -> dict:
        """Load signal for kvray's SLO-headroom autoscaling policy (Serve pushes it to the controller)."""
        from kvray.platform.autoscaling import replica_autoscaling_stats
        return replica_autoscaling_stats(self.engine, self._num_gpus)

    async def record_routing_stats(self) -> dict:
        # async: it runs on the replica's event loop, with the request coroutines (a sync method
        # would run on Serve's thread pool, racing them)
        self._ensure_metrics_task()
        return {ROUTING_STATS_KEY: self.stats()}

    def stats(self) -> ReplicaStats:
        engine = self.engine
        return ReplicaStats(
            engine=engine.stats(), time=time.time(), replica_id=self._replica_id, healthy=engine.is_alive(),
            outstanding_tokens=sum(a.outstanding() for a in self._active.values()),
            num_active_requests=len(self._active), num_requests_total=self._num_requests,
            num_aborted_total=self._num_aborted, num_channels=sum(1 for b in self._outboxes.values() if b.readers),
            max_model_len=engine.max_model_len, max_queued_requests=engine.max_queued_requests,
            started_at=self._started_at, first_token_at=self._first_token_at)

    def check_health(self) -> None:
        self.engine.check_health()

    async def __del__(self):
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        if self.engine is None:  # the engine never started: nothing to stop
            return
        try:
            await self.engine.shutdown(timeout_s=self._shutdown_timeout_s)
        except Exception:  # pragma: no cover
            logger.exception("engine shutdown failed")
