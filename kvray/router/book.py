"""The replica book: the router's one picture of each replica (pure Python, no Ray).

One ``ReplicaState`` (``kvray.router.replica_state``) per replica in Serve's replica set. Every
lifecycle event of a request enters the book once, from one writer, the request's
``RequestLife`` (``kvray.router.dispatch``): ``on_dispatch`` when it is sent to a replica (again,
if it moves), ``on_first_token``, and ``on_finish`` (any end). Routing policies only read the
book (``kvray.router.policy``).

A replica that leaves Serve's replica set (Serve is stopping it: a scale-down, an update, a node
drain, the app's deletion; or it died) while this router still has requests there stays in the
book as *draining*: no policy routes to it, its requests are still counted, and it leaves the
book with the last of them. ``draining()`` lists them for the Router's drain
(``kvray.frontend.drain``), which ends what runs past ``graceful_shutdown_timeout_s``.

The book lives on its Router's event loop and is only ever touched there (the replica-set
broadcasts of Serve's request-router plug-in are posted to that loop: ``kvray.router.replica_set``),
so it takes no lock.
"""
from __future__ import annotations

import time

from kvray.records import ReplicaStats, RoutingHint
from kvray.router.replica_state import ReplicaState
from kvray.step_cost import DEFAULT_COEFFS, StepCoeffs


class ReplicaBook:
    def __init__(self, clock=time.time, prior: StepCoeffs = DEFAULT_COEFFS):
        self.replicas: dict[str, ReplicaState] = {}
        self._clock = clock
        self._prior = prior
        self._where: dict[str, str] = {}  # request id -> replica it is in flight at

    def now(self) -> float:
        return self._clock()

    def _state(self, replica_id: str) -> ReplicaState:
        st = self.replicas.get(replica_id)
        if st is None:
            st = self.replicas[replica_id] = ReplicaState(replica_id, self._prior)
        return st

    # ---- the replica set and snapshots -------------------------------------------------------
    def sync(self, stats_by_replica: dict[str, ReplicaStats | None]) -> None:
        """Set Serve's replica set (ids -> latest stats or None). A replica not listed is dropped,
        or, while this router has requests there, kept as draining until they end."""
        now = self._clock()
        for rid in [r for r in self.replicas if r not in stats_by_replica]:
            st = self.replicas[rid]
            if not st.inflight:
                del self.replicas[rid]
            elif st.draining_since is None:
                st.draining_since = now
        for rid, stats in stats_by_replica.items():
            st = self._state(rid)
            st.draining_since = None
            if stats is not None:
                st.update_stats(stats, now)

    def update_stats(self, replica_id: str, stats: ReplicaStats) -> None:
        self._state(replica_id).update_stats(stats, self._clock())

    # ---- a request's life (kvray.router.dispatch.RequestLife is the one caller) -------------
    def on_dispatch(self, hint: RoutingHint, replica_id: str, cached_tokens: int | None = None) -> None:
        """``hint``'s request went (or is reserved) to ``replica_id``; a request already placed
        elsewhere moves (a retry, or Serve's fallback to the next replica of the route)."""
        now = self._clock()
        rid = hint.request_id
        where = self._where.get(rid)
        if where == replica_id:
            return
        if where is not None and where in self.replicas:
            self.replicas[where].on_finish(rid, now)
        self._state(replica_id).on_dispatch(hint, now, cached_tokens)
        self._where[rid] = replica_id

    def on_first_token(self, request_id: str) -> None:
        st = self.replicas.get(self._where.get(request_id, ""))
        if st is not None:
            st.on_first_token(request_id, self._clock())

    def on_finish(self, request_id: str, num_output_tokens: int = 0) -> None:
        """The request ended (however: done, refused, aborted, failed)."""
        where = self._where.pop(request_id, None)
        if where is None:
            return
        st = self.replicas.get(where)
        if st is not None:
            st.on_finish(request_id, self._clock(), num_output_tokens)
            if not st.routable and not st.inflight:  # a draining replica's last request
                del self.replicas[where]

    # ---- reads -------------------------------------------------------------------------------
    def routable(self) -> list[ReplicaState]:
        """The replicas in Serve's replica set (none draining)."""
        return [s for s in self.replicas.values() if s.routable]

    def live(self, avoid: tuple[str, ...] = ()) -> list[ReplicaState]:
        """The replicas a request may go to: of those not draining, the healthy ones not in
        ``avoid`` (those that failed it), or, when there is none, every one not in ``avoid``, or
        every one."""
        routable = self.routable()
        states = [s for s in routable if s.replica_id not in avoid] or routable
        return [s for s in states if s.healthy] or states

    def replica_ids(self) -> list[str]:
        """The replicas new requests may go to (none draining)."""
        return [s.replica_id for s in self.routable()]

    def draining(self) -> list[tuple[str, float]]:
        """``(replica id, since)`` of each draining replica (``since`` on the book's clock)."""
        return [(s.replica_id, s.draining_since) for s in self.replicas.values() if not s.routable]

    def capacity(self) -> int | None:
        """Requests the healthy replicas admit in all; None while one has not reported its limit."""
        states = self.routable()
        if not states or any(not s.stats.max_queued_requests for s in states):
            return None
        return sum(s.stats.capacity for s in states if s.healthy) or None

    def snapshot(self) -> dict[str, dict]:
        now = self._clock()
        return {rid: st.snapshot(now) for rid, st in self.replicas.items()}
