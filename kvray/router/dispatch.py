"""The Router's side of routing: each request is decided once by the routing policy, and its life
enters the replica book (pure Python, no Ray).

``Dispatcher.admit(hint)`` asks the policy. On ``DISPATCH`` it reserves the first replica of
the route in the book at once (so a burst of admissions sees its own load) and writes the route
into the hint, which the Serve request-router plug-in follows. On ``QUEUE`` it holds the request
and decides again whenever a first token or a completion frees capacity, and at the policy's
``recheck_at`` at the latest; the policy never holds a request past the last moment it could
meet its TTFT. On ``REJECT`` the Router answers 429 with ``Retry-After``. The lifecycle events
(``on_routed`` from the plug-in, ``on_first_token`` and ``on_finish`` from the ingress and the
plug-in) keep the book fresh between stats polls.

One dispatcher per (application, deployment) and process (``get_dispatcher``): the ingress and
the plug-in share it, and every method takes the book's lock (Serve's router loop and the
ingress loop run on different threads).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

from kvray.records import RoutingHint
from kvray.router.book import ReplicaBook, get_book
from kvray.router.policy import DISPATCH, QUEUE, Decision, RoutingPolicy, make_policy, route_from


class Dispatcher:
    def __init__(self, book: ReplicaBook, policy: RoutingPolicy, clock=time.time):
        self.book = book
        self.policy = policy
        self._clock = clock
        self._wakers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.counts: Counter = Counter()  # dispatched, queued, rejected

    def decide(self, hint: RoutingHint) -> Decision:
        """One decision now; on DISPATCH the replica is reserved and ``hint.route`` set."""
        book = self.book
        with book.lock:
            d = self.policy.decide(hint, book, self._clock())
            if d.action == DISPATCH:
                book.on_dispatch(hint, d.route[0], d.cached_tokens)
                hint.route = d.route
                self.counts["dispatched"] += 1
        return d

    def follow(self, hint: RoutingHint, replica_id: str | None) -> Decision:
        """Dispatch ``hint``'s request to ``replica_id``, where a request with the same prompt
        went (the other choices of an ``n > 1`` request: they find its prompt there in the
        prefix cache); the policy decides instead when that replica is no longer healthy, or
        draining."""
        book = self.book
        with book.lock:
            state = book.replicas.get(replica_id) if replica_id is not None else None
            if state is None or not state.healthy or not state.routable:
                return self.decide(hint)
            route = route_from(state, book, lambda s: s.load, hint.avoid)
            book.on_dispatch(hint, replica_id)
            hint.route = route
            self.counts["dispatched"] += 1
            return Decision(DISPATCH, route, reason="same prompt as its first choice")

    async def admit(self, hint: RoutingHint) -> Decision:
        """DISPATCH (the route is in the hint) or REJECT; a QUEUE decision waits here."""
        d = self.decide(hint)
        if d.action == QUEUE:
            self.counts["queued"] += 1
            d = await self._wait(hint, d)
        if d.action != DISPATCH:
            self.counts["rejected"] += 1
        return d

    async def _wait(self, hint: RoutingHint, d: Decision) -> Decision:
        waker = (asyncio.get_running_loop(), asyncio.Event())
        with self.book.lock:
            self._wakers.add(waker)
        try:
            while d.action == QUEUE:
                waker[1].clear()
                try:
                    await asyncio.wait_for(waker[1].wait(), max(0.0, d.recheck_at - self._clock()))
                except asyncio.TimeoutError:
                    pass
                d = self.decide(hint)
        finally:
            with self.book.lock:
                self._wakers.discard(waker)
        return d

    def _wake(self) -> None:
        with self.book.lock:
            for loop, event in self._wakers:
                loop.call_soon_threadsafe(event.set)

    @property
    def num_waiting(self) -> int:
        """Requests held in the router for a replica to free up."""
        with self.book.lock:
            return len(self._wakers)

    # ---- a request's life (the book counts it; waiting requests may go now) -----------------
    def on_routed(self, hint: RoutingHint, replica_id: str) -> None:
        """Serve sent the request to ``replica_id`` (the reservation moves if it went elsewhere)."""
        self.book.on_dispatch(hint, replica_id)

    def on_first_token(self, request_id: str) -> None:
        self.book.on_first_token(request_id)
        self._wake()

    def on_finish(self, request_id: str, num_output_tokens: int = 0, replica_id: str | None = None) -> None:
        self.book.on_finish(request_id, num_output_tokens, replica_id)
        self._wake()

    def snapshot(self) -> dict:
        return {"name": self.policy.name, **self.counts, "waiting": self.num_waiting}


_dispatchers: dict[tuple[str, str], Dispatcher] = {}
_lock = threading.Lock()


def get_dispatcher(app_name: str, deployment_name: str, policy: str = "least_load",
                   policy_options: dict | None = None) -> Dispatcher:
    """The process's dispatcher for one deployment, made on first use with that policy (the
    ingress and the plug-in are configured with the same one by ``build_app``)."""
    with _lock:
        d = _dispatchers.get((app_name, deployment_name))
        if d is None:
            d = _dispatchers[(app_name, deployment_name)] = Dispatcher(
                get_book(app_name, deployment_name), make_policy(policy, **(policy_options or {})))
        return d
