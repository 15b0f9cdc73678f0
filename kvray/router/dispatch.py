"""The Router's side of routing, and the one owner of each request's life in the replica book
(pure Python, no Ray).

``Dispatcher`` is one Router's routing policy and replica book, and the requests it holds for
capacity. ``Dispatcher.life(hint)`` starts a ``RequestLife``: the only writer of the book's
dispatch, first-token and finish events, driven by the Router's serving loop
(``kvray.frontend.serving``) from admission to the request's end:

* ``admit()`` asks the policy. On ``DISPATCH`` it places the request at the first replica of
  the route in the book at once (so a burst of admissions sees its own load) and writes the
  route into the hint, which the Serve request-router plug-in follows. On ``QUEUE`` it holds
  the request and decides again whenever a first token or a completion frees capacity, and at
  the policy's ``recheck_at`` at the latest; the policy never holds a request past the last
  moment it could meet its TTFT. On ``REJECT`` the Router answers 429 with ``Retry-After``.
* ``follow(replica)``: the other choices of an ``n > 1`` request go where the first one went.
* ``retry(failed, full)``: a replica refused the request or failed it before its first token:
  decided again without that replica.
* ``bound(replica)``: the replica that took the request (Serve falls back to the next replica
  of the route when the first is at its ``max_ongoing_requests``): the request moves there.
* ``first_token()`` and ``finish(num_output_tokens)``: the book sees them at once, and the
  requests held for capacity are decided again.

Everything here runs on the Router's event loop, where the book lives, so nothing takes a lock.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter

from kvray.records import RoutingHint
from kvray.router.book import ReplicaBook
from kvray.router.policy import DISPATCH, QUEUE, Decision, RoutingPolicy, route_from


class Dispatcher:
    def __init__(self, book: ReplicaBook, policy: RoutingPolicy, clock=time.time):
        self.book = book
        self.policy = policy
        self._clock = clock
        self._held: set[asyncio.Event] = set()  # one per request held for capacity
        self.counts: Counter = Counter()  # dispatched, queued, rejected

    def life(self, hint: RoutingHint) -> RequestLife:
        """A request's life from its admission on (``hint`` is its routing hint)."""
        return RequestLife(self, hint)

    async def _hold(self, life: RequestLife, d: Decision) -> Decision:
        """Decide ``life`` again until it is no longer held: at each wake-up (capacity freed)
        and at the policy's ``recheck_at``."""
        woken = asyncio.Event()
        self._held.add(woken)
        try:
            while d.action == QUEUE:
                woken.clear()
                try:
                    await asyncio.wait_for(woken.wait(), max(0.0, d.recheck_at - self._clock()))
                except asyncio.TimeoutError:
                    pass
                d = life.decide()
        finally:
            self._held.discard(woken)
        return d

    def _wake(self) -> None:
        for woken in self._held:
            woken.set()

    @property
    def num_waiting(self) -> int:
        """Requests held in the router for a replica to free up."""
        return len(self._held)

    def snapshot(self) -> dict:
        return {"name": self.policy.name, **self.counts, "waiting": self.num_waiting}


class RequestLife:
    """One request (one choice of an HTTP request) as the replica book sees it, from its
    admission to its end; ``replica`` is where it is placed (None before its dispatch)."""

    __slots__ = ("_d", "hint", "replica", "_first", "_ended")

    def __init__(self, dispatcher: Dispatcher, hint: RoutingHint):
        self._d = dispatcher
        self.hint = hint
        self.replica: str | None = None
        self._first = False
        self._ended = False

    # ---- where it goes -------------------------------------------------------------------------
    def decide(self) -> Decision:
        """One decision now; on DISPATCH the request is placed and ``hint.route`` set. With no
        replica in the book (LLMReplica runs another request router, such as Serve's default,
        which never fills it) the request goes on with no route: that router picks."""
        d = self._d
        if not d.book.replicas:
            d.counts["dispatched"] += 1
            return Decision(DISPATCH, reason="no replica book: the deployment's request router picks")
        decision = d.policy.decide(self.hint, d.book, d._clock())
        if decision.action == DISPATCH:
            self._place(decision.route[0], decision.cached_tokens)
            self.hint.route = decision.route
            d.counts["dispatched"] += 1
        return decision

    async def admit(self) -> Decision:
        """DISPATCH (the route is in the hint) or REJECT; a QUEUE decision waits here."""
        decision = self.decide()
        if decision.action == QUEUE:
            self._d.counts["queued"] += 1
            decision = await self._d._hold(self, decision)
        if decision.action != DISPATCH:
            self._d.counts["rejected"] += 1
        return decision

    def follow(self, replica_id: str | None) -> Decision:
        """Dispatch to ``replica_id``, where a request with the same prompt went (the other
        choices of an ``n > 1`` request: they find its prompt there in the prefix cache); the
        policy decides instead when that replica is gone, unhealthy or draining."""
        book = self._d.book
        state = book.replicas.get(replica_id) if replica_id is not None else None
        if state is None or not state.healthy or not state.routable:
            return self.decide()
        self.hint.route = route_from(state, book, lambda s: s.load, self.hint.avoid)
        self._place(replica_id)
        self._d.counts["dispatched"] += 1
        return Decision(DISPATCH, self.hint.route, reason="same prompt as its first choice")

    def retry(self, failed: str | None, full: bool) -> bool:
        """``failed`` refused the request (``full``: its queue is full) or failed it before its
        first token: decide again, without it. False: answer the error now (every replica is
        full, or the policy will not dispatch)."""
        hint = self.hint
        hint.avoid += (failed,) if failed else ()
        if full and not set(self._d.book.replica_ids()) - set(hint.avoid):
            return False  # every replica is full: the client retries later
        return self.decide().action == DISPATCH

    def bound(self, replica_id: str) -> None:
        """The replica that took the request: it moves there if it was placed elsewhere."""
        if not self._ended and replica_id != self.replica:
            self._place(replica_id)

    def _place(self, replica_id: str, cached_tokens: int | None = None) -> None:
        self._d.book.on_dispatch(self.hint, replica_id, cached_tokens)
        self.replica = replica_id

    # ---- how it goes ---------------------------------------------------------------------------
    def first_token(self) -> None:
        if not self._first and not self._ended:
            self._first = True
            self._d.book.on_first_token(self.hint.request_id)
            self._d._wake()

    def finish(self, num_output_tokens: int = 0) -> None:
        """The request ended, however (done, refused, failed, the client left); once."""
        if self._ended:
            return
        self._ended = True
        if self.replica is not None:
            self._d.book.on_finish(self.hint.request_id, num_output_tokens)
            self._d._wake()
