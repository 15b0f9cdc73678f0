"""Draining: how a Router stops, and what it does with a replica that Serve is stopping.

Serve stops a replica (a scale-down, an update, a node drain, the app's deletion) by routing no
new requests to it and waiting for its open calls, up to the deployment's
``graceful_shutdown_timeout_s``; then it kills it. No hook tells the replica when this begins
(``__del__`` runs only once every call has ended), so the Router watches Serve's replica sets:

* its own (``watch_replica_stop``, Serve's long poll of the Router deployment's replicas). When
  its replica leaves the set, ``Drain.begin``: Serve sends it nothing new (what a stale route
  still brings is served), ``GET /health`` answers 503, running requests go on for up to the
  app's ``graceful_shutdown_timeout_s``, and then each one still running ends with a
  ``server_shutdown`` error: an SSE error event then ``data: [DONE]`` for a stream, a 503 with
  Retry-After for a request that was not streamed; any later one gets that 503 at once.
* LLMReplica's (the request-router plug-in's ``update_replicas``, into the replica book): a
  replica that leaves it while this Router has requests there stays in the book as draining, so no
  policy routes to it; ``Drain`` ends its requests still running ``graceful_shutdown_timeout_s``
  after it left in the same way, and closes this Router's token channel to it once none is left
  (so the replica's own drain ends at once).

The deadlines are the app's ``graceful_shutdown_timeout_s``; ``build_app`` gives both deployments
a Serve ``graceful_shutdown_timeout_s`` 5 s longer, so Serve kills nothing that is still writing.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable

from kvray.frontend.errors import APIError
from kvray.router.book import ReplicaBook

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
CHECK_PERIOD_S = 0.1  # how often the replica book's draining replicas are looked at
ERROR_TYPE = "server_shutdown"


def _error(message: str, code: str) -> APIError:
    return APIError(503, message, type=ERROR_TYPE, code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


class Drain:
    """One Router's drain, and its deadlines for the replicas that Serve is stopping.

    Requests register while they run (``add`` / ``discard``: serving's request objects, whose
    ``choices`` each carry the replica ``stream``, failed with ``stream.fail(error)``, and their
    ``life``, which says where they are)."""

    def __init__(self, timeout_s: float, book: ReplicaBook | None = None,
                 close_channels: Callable[[Iterable[str]], None] | None = None):
        """``close_channels(listed)`` closes the token channels to replicas not in ``listed``
        that no request is bound to."""
        self.timeout_s = timeout_s
        self.book = book
        self._close_channels = close_channels
        self.since: float | None = None  # monotonic time this Router's drain began
        self.expired = False             # its deadline has passed
        self._requests: set = set()
        self._replica_timers: dict[str, asyncio.TimerHandle] = {}
        self._task: asyncio.Task | None = None
        self._own_timer: asyncio.TimerHandle | None = None

    @property
    def draining(self) -> bool:
        return self.since is not None

    # ---- requests --------------------------------------------------------------------------
    def check(self) -> None:
        """Raise the 503 for a request (or a replica call) that would start after the deadline."""
        if self.expired:
            raise _error("this server is shutting down and takes no new requests; retry it (another replica of the "
                         "service, or this server once it is back, answers)", "draining")

    def no_replica_error(self) -> APIError | None:
        """The 503 for a request no policy could place because every replica is being stopped
        (instead of a 429 that blames the load)."""
        if self.book is not None and not self.book.replica_ids() and self.book.draining():
            return _error("the model's replicas are being stopped and none takes new requests; retry it", "draining")
        return None

    def add(self, req) -> None:
        self._requests.add(req)
        if self._task is None and self.book is not None:
            self._task = asyncio.get_running_loop().create_task(self._watch_book())

    def discard(self, req) -> None:
        self._requests.discard(req)

    # ---- this Router -----------------------------------------------------------------------
    def begin(self) -> None:
        """Serve is stopping this Router: end what still runs at the deadline; refuse what comes later."""
        if self.since is not None:
            return
        self.since = time.monotonic()
        logger.info("kvray: this Router is being stopped; %d requests running may continue for %.1f s "
                    "(graceful_shutdown_timeout_s)", len(self._requests), self.timeout_s)
        self._own_timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire)

    def resume(self) -> None:
        """Serve lists this Router again (it was not being stopped after all): serve as before."""
        if self.since is not None:
            logger.warning("kvray: this Router is back in its deployment's replica set; it no longer drains")
            self._own_timer.cancel()
            self.since, self.expired = None, False

    def _own_error(self) -> APIError:
        return _error(f"the server is shutting down, and this request was still running "
                      f"graceful_shutdown_timeout_s ({self.timeout_s:g} s) later; retry it", "shutdown_timeout")

    def _expire(self) -> None:
        self.expired = True
        if self._requests:
            logger.warning("kvray: ending %d requests still running at graceful_shutdown_timeout_s (%.1f s)",
                           len(self._requests), self.timeout_s)
        err = self._own_error()
        for req in list(self._requests):
            for c in req.choices:
                if c.stream is not None:
                    c.stream.fail(err)

    # ---- replicas Serve is stopping ----------------------------------------------------------
    async def _watch_book(self) -> None:
        while True:
            await asyncio.sleep(CHECK_PERIOD_S)
            try:
                self.check_replicas()
            except Exception:  # noqa: BLE001 - a bug here must not stop the watch
                logger.exception("kvray: checking the draining replicas failed")

    def check_replicas(self) -> None:
        """Arm a deadline for each replica newly draining; drop those of replicas gone (their
        last request of this Router ended) and close their channels."""
        book = self.book
        draining = dict(book.draining())
        now = book.now()
        loop = asyncio.get_running_loop()
        for rid, since in draining.items():
            if rid not in self._replica_timers:
                delay = max(0.0, since + self.timeout_s - now)
                self._replica_timers[rid] = loop.call_later(delay, self._expire_replica, rid)
        for rid in [r for r in self._replica_timers if r not in draining]:
            self._replica_timers.pop(rid).cancel()
        if self._close_channels is not None:
            self._close_channels(book.replica_ids() + list(draining))

    def _expire_replica(self, replica_id: str) -> None:
        err = _error(f"the model replica serving this request is being stopped (a scale-down, an update or the "
                     f"app's removal), and the request was still running graceful_shutdown_timeout_s "
                     f"({self.timeout_s:g} s) later; retry it", "shutdown_timeout")
        cut = 0
        for req in list(self._requests):
            for c in req.choices:
                if c.stream is not None and c.life is not None and c.life.replica == replica_id:
                    c.stream.fail(err)
                    cut += 1
        if cut:
            logger.warning("kvray: ended %d requests still running on replica %s at graceful_shutdown_timeout_s "
                           "(%.1f s) after Serve began stopping it", cut, replica_id, self.timeout_s)

    def close(self) -> None:
        for t in (self._task, self._own_timer):
            if t is not None:
                t.cancel()
        for t in self._replica_timers.values():
            t.cancel()


def watch_replica_stop(on_stop: Callable[[], None], on_back: Callable[[], None]):
    """Call ``on_stop()`` (on this event loop) when Serve takes this replica out of its
    deployment's replica set: Serve is stopping it (``on_back()`` if it lists it again). Returns
    the watcher (``.stop()`` it).

    The replica set comes from Serve's long poll (``DEPLOYMENT_TARGETS`` of the deployment, what
    every deployment handle follows to route), as the replica sees it: once it has been in the set
    and is no more. Ray Serve has no public hook for this (``__del__`` comes after the drain)."""
    from ray.serve import get_replica_context
    from ray.serve._private.long_poll import LongPollClient, LongPollNamespace
    from ray.serve.context import _get_global_client

    ctx = get_replica_context()
    me = ctx.replica_id
    seen = False

    def on_targets(info) -> None:
        nonlocal seen
        ids = {r.replica_id for r in getattr(info, "running_replicas", None) or ()}
        if me in ids and not seen:
            seen = True
            on_back()
        elif me not in ids and seen:
            seen = False
            on_stop()

    return LongPollClient(_get_global_client()._controller,
                          {(LongPollNamespace.DEPLOYMENT_TARGETS, me.deployment_id): on_targets},
                          call_in_event_loop=asyncio.get_running_loop(), client_id=f"kvray-drain:{me.unique_id}")
