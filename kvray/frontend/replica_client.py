"""The Router's replica client: it sends a request to a replica and returns its token stream.

``ReplicaClient.send(hint, prompt_token_ids, params, on_bound)`` makes the request's
``LLMReplica.generate`` call through the deployment handle (Serve's request router follows the
hint's route) and returns the request's stream. The token-stream protocol lives behind it, and
on the replica side in ``kvray.platform.token_streams``; its records are ``kvray.records``'
``TokenBatch``, ``Refusal`` and ``Bound``.

* Token channels (``router.token_channels``, the default): ``TokenChannels`` keeps one
  ``LLMReplica.channel`` streaming call open per replica this Router talks to (pinned there by
  the hint's ``pin_replica``), and hands each ``TokenBatch`` to the request it belongs to.
  ``ChannelRequestStream`` is one request: its own ``generate`` call (open for the request's
  lifetime: routing, Serve's ongoing-request accounting and cancellation go through it; it
  yields ``Bound`` once the replica has the request, or a ``Refusal``) plus its batches from
  the channel.
* ``DirectRequestStream``, the plain mode: ``Bound``, then the batches in the request's own
  stream.

Either stream calls ``on_bound(replica_id)`` once the replica that took the request is known,
and offers ``__anext__`` (the next ``TokenBatch`` or ``Refusal``; raises on errors),
``fail(error)`` (the next ``__anext__`` raises ``error`` at once: how the Router's drain ends a
request) and ``close(abort)``.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections import deque
from typing import Any, Callable

from kvray import tracing
from kvray.records import Bound, Refusal, RoutingHint, TokenBatch
from kvray.replica.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_ENDED = object()
FINISH_GRACE_S = 30.0  # after the request call ended, how long its last batches may take on the channel
CHANNEL_OPEN_TIMEOUT_S = 30.0


class ReplicaLost(RuntimeError):
    pass


class ReplicaClient:
    def __init__(self, handle, token_channels: bool = True):
        """``handle``: the LLMReplica deployment's handle."""
        self._stream = handle.options(stream=True)
        self._use_channels = token_channels
        self._channels: TokenChannels | None = None

    def send(self, hint: RoutingHint, prompt_token_ids: list[int], params: SamplingParams,
             on_bound: Callable[[str], None] | None = None):
        """Start the request on a replica (where its ``hint`` routes it); its token stream."""
        rid = hint.request_id
        if not self._use_channels or (self._channels is not None and self._channels.disabled):
            return DirectRequestStream(self._stream.generate.remote(rid, prompt_token_ids, params, hint=hint),
                                       on_bound)
        if self._channels is None:
            self._channels = TokenChannels(self._open_channel)
        call = self._stream.generate.remote(rid, prompt_token_ids, params, hint=hint,
                                            channel=self._channels.channel_id)
        return ChannelRequestStream(self._channels, rid, call, on_bound)

    def close_unlisted(self, listed) -> None:
        """Close the channels to replicas not in ``listed`` that no request is bound to."""
        if self._channels is not None:
            self._channels.close_unlisted(listed)

    def _open_channel(self, replica_id: str, channel_id: str):
        pin = RoutingHint(request_id=channel_id, num_prompt_tokens=0, decode_estimate=0, pin_replica=replica_id)
        return self._stream.channel.remote(channel_id, hint=pin)


class _Inbox:
    """One request's incoming batches (a deque and an event: it can be peeked, unlike asyncio.Queue)."""

    __slots__ = ("items", "event")

    def __init__(self):
        self.items: deque = deque()
        self.event = asyncio.Event()

    def put(self, item) -> None:
        self.items.append(item)
        self.event.set()

    async def get(self):
        while not self.items:
            self.event.clear()
            await self.event.wait()
        return self.items.popleft()


class TokenChannels:
    def __init__(self, open_channel: Callable[[str, str], Any]):
        """``open_channel(replica_id, channel_id)`` starts the pinned ``channel`` call."""
        self.channel_id = f"router-{uuid.uuid4().hex[:12]}"
        self._open = open_channel
        self._queues: dict[str, _Inbox] = {}
        self._where: dict[str, str] = {}  # request id -> replica id
        self._tasks: dict[str, asyncio.Task] = {}
        self.disabled = False  # set when the request router does not honour replica pins

    def register(self, request_id: str) -> _Inbox:
        q = self._queues[request_id] = _Inbox()
        return q

    def bind(self, request_id: str, replica_id: str) -> None:
        if request_id in self._queues:
            self._where[request_id] = replica_id
            self.ensure(replica_id)

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._where.pop(request_id, None)

    def ensure(self, replica_id: str) -> None:
        if replica_id not in self._tasks:
            # A fresh context: the channel must not become a child of the HTTP request that
            # happens to open it (Ray Serve cancels a request's child calls with the request).
            self._tasks[replica_id] = asyncio.get_running_loop().create_task(
                self._read(replica_id), context=contextvars.Context())

    def close_unlisted(self, listed) -> None:
        """Close the channels to replicas not in ``listed`` (Serve is stopping them) that no
        request of this Router is bound to: a replica's drain waits for every open call, and an
        idle channel would hold it open for ``CHANNEL_IDLE_CLOSE_S`` more."""
        bound = set(self._where.values())
        for replica_id, task in list(self._tasks.items()):
            if replica_id not in listed and replica_id not in bound:
                task.cancel()

    @property
    def open_replicas(self) -> list[str]:
        return list(self._tasks)

    async def _read(self, replica_id: str) -> None:
        stream = self._open(replica_id, self.channel_id)
        error: BaseException | None = None
        try:
            first = await asyncio.wait_for(stream.__anext__(), CHANNEL_OPEN_TIMEOUT_S)
            if not isinstance(first, Bound):  # a channel opens with the replica's name
                raise ReplicaLost(f"unexpected first channel item from {replica_id}: {first!r}")
            if first.replica_id != replica_id:
                # The deployment's request router ignored the pin (not kvray's plug-in): tokens
                # would go to a channel on the wrong replica. Stop using channels.
                self.disabled = True
                logger.error("token channel for replica %s opened on %s: LLMReplica's request router does not "
                             "honour kvray's pins; falling back to one stream per request (set "
                             "router.token_channels: false with a custom request_router_config)",
                             replica_id, first.replica_id)
                raise ReplicaLost("token channels need kvray's request router; retry the request")
            async for items in stream:
                queues = self._queues
                for rid, batch in items:
                    if tracing.ENABLED:
                        tracing.trace(rid, "router_channel_recv", first_only=True)
                    q = queues.get(rid)
                    if q is not None:
                        q.put(batch)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # close(): this Router is going away
                raise
            # otherwise the call was cancelled from outside: reopen below if requests wait
        except StopAsyncIteration:
            pass
        except Exception as e:
            if type(e).__name__ != "RequestCancelledError":  # the replica died, or the channel could not open
                logger.warning("token channel to replica %s failed: %r", replica_id, e)
                error = e if isinstance(e, ReplicaLost) else \
                    ReplicaLost(f"lost the token channel to replica {replica_id}: {type(e).__name__}")
        finally:
            self._tasks.pop(replica_id, None)
            try:
                stream.cancel()
            except Exception:  # pragma: no cover
                pass
        # The channel closed (idle, or the replica is gone). Requests still bound to it either
        # get their batches on a reopened channel, or fail if it died.
        pending = [rid for rid, rep in self._where.items() if rep == replica_id]
        if error is not None:
            for rid in pending:
                q = self._queues.get(rid)
                if q is not None:
                    q.put(error)
        elif pending:
            self.ensure(replica_id)

    async def close(self) -> None:
        for t in list(self._tasks.values()):
            t.cancel()


class ChannelRequestStream:
    def __init__(self, channels: TokenChannels, request_id: str, call, on_bound: Callable[[str], None] | None = None):
        self._channels = channels
        self._rid = request_id
        self._call = call
        self._on_bound = on_bound
        self._q = channels.register(request_id)
        self._finished = False
        self._call_ended = False
        self._watch = asyncio.get_running_loop().create_task(self._watch_call())

    async def _watch_call(self) -> None:
        try:
            async for item in self._call:
                if isinstance(item, Bound):  # the tokens come through that replica's channel
                    self._channels.bind(self._rid, item.replica_id)
                    if self._on_bound is not None:
                        self._on_bound(item.replica_id)
                else:  # a Refusal
                    self._q.put(item)
            self._q.put(_ENDED)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._q.put(e)

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenBatch | Refusal:
        if self._finished:
            raise StopAsyncIteration
        while True:
            if self._call_ended:
                try:
                    item = await asyncio.wait_for(self._q.get(), FINISH_GRACE_S)
                except asyncio.TimeoutError:
                    raise ReplicaLost("the request ended on the replica but its last tokens never arrived") from None
            else:
                item = await self._q.get()
            if item is _ENDED:
                self._call_ended = True
                continue
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Refusal) or item.finish_reason is not None:
                self._finished = True
                return item
            # Batches that queued up while this request was busy become one: when the Router
            # falls behind, it sends fewer, larger SSE chunks instead of falling further behind.
            pending = self._q.items
            while pending and isinstance(pending[0], TokenBatch):
                item = item.merge(pending.popleft())
                if item.finish_reason is not None:
                    self._finished = True
                    break
            return item

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error``, ahead of any batch still queued."""
        if not self._finished:
            self._q.items.appendleft(error)
            self._q.event.set()

    def close(self, abort: bool) -> None:
        """Stop listening; with ``abort`` also cancel the request on the replica."""
        self._channels.unregister(self._rid)
        if abort:
            try:
                self._call.cancel()
            except Exception:  # pragma: no cover
                pass
            self._watch.cancel()


class DirectRequestStream:
    def __init__(self, call, on_bound: Callable[[str], None] | None = None):
        self._call = call
        self._on_bound = on_bound
        self._error: BaseException | None = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenBatch | Refusal:
        if self._error is not None:
            raise self._error
        try:
            item = await self._call.__anext__()
            if type(item) is Bound:  # the first item: the replica that took the request
                if self._on_bound is not None:
                    self._on_bound(item.replica_id)
                item = await self._call.__anext__()
            return item
        except Exception:
            if self._error is not None:  # fail() cancelled the call: its error, not Serve's
                raise self._error from None
            raise

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error`` (cancels the call, so a pending ``__anext__`` wakes)."""
        self._error = error
        try:
            self._call.cancel()
        except Exception:  # pragma: no cover
            pass

    def close(self, abort: bool) -> None:
        if abort:
            try:
                self._call.cancel()
            except Exception:  # pragma: no cover
                pass
