"""The router's picture of each replica's load, fresh between stats polls (pure Python).

Two sources feed it:

* Stats snapshots: each replica's ``record_routing_stats()``, which Ray Serve's controller
  polls every ``request_routing_stats_period_s`` and broadcasts to the routers. A snapshot
  carries the replica's wall-clock ``time`` and its ``outstanding_tokens`` (uncached prompt
  tokens still to prefill plus generated tokens still budgeted, over its active requests).
* What this router did since: every dispatch and completion, counted at once.

The estimate for a replica is::

    max(0, snapshot.outstanding_tokens - cost of my requests that completed after the snapshot
                                         but were dispatched before it)
    + cost of my active requests dispatched after the snapshot

so a burst of dispatches between two polls is seen immediately, and a snapshot never counts a
request twice. Requests from other router processes appear with the next snapshot.

The book also remembers which prefix blocks it sent to each replica (bounded LRU of block
hashes), which predicts prefix-cache hits there. One book per (application, deployment) and
process, shared by the Serve plug-in (router event loop) and the ingress (its own loop): every
method takes the lock.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from kvray.router.hints import RoutingHint

ROUTED_KEPT = 10_000
_STAT_KEYS_INT = ("num_running", "num_waiting", "num_free_blocks", "num_total_blocks", "tokens_in_flight",
                  "queued_prefill_tokens", "outstanding_tokens", "num_active_requests")


@dataclass
class ReplicaStats:
    """A parsed ``record_routing_stats()`` snapshot (missing keys read as zero)."""

    time: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    tokens_in_flight: int = 0
    queued_prefill_tokens: int = 0
    outstanding_tokens: int = 0
    num_active_requests: int = 0
    prefix_hit_rate: float = 0.0
    healthy: bool = True
    step_times: list = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "ReplicaStats":
        s = cls(raw=dict(d))
        s.time = float(d.get("time", 0.0) or 0.0)
        for k in _STAT_KEYS_INT:
            v = d.get(k)
            if isinstance(v, (int, float)):
                setattr(s, k, int(v))
        s.prefix_hit_rate = float(d.get("prefix_hit_rate", 0.0) or 0.0)
        s.healthy = bool(d.get("healthy", True))
        s.step_times = list(d.get("step_times") or [])
        return s

    @property
    def kv_usage(self) -> float:
        if self.num_total_blocks <= 0:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks


@dataclass
class _Dispatch:
    replica_id: str
    cost: int
    t: float


@dataclass
class ReplicaView:
    """What a policy sees of one replica at decision time."""

    replica_id: str
    load: float  # estimated outstanding tokens
    num_active: int  # this router's requests in flight there
    prefix_blocks: int  # leading prefix blocks of the request predicted cached there
    stats: ReplicaStats | None
    stats_age_s: float | None


class _ReplicaState:
    def __init__(self, replica_id: str, max_prefix_hashes: int):
        self.replica_id = replica_id
        self.stats: ReplicaStats | None = None
        self.received_at: float | None = None
        self.active: dict[str, _Dispatch] = {}
        self.after_cost = 0  # cost of active dispatches newer than the snapshot
        self.done_cost = 0  # cost of dispatches older than the snapshot that completed after it
        self.recent_done: deque[tuple[float, float, int]] = deque()  # (t_done, t_dispatch, cost)
        self.prefix: OrderedDict[int, None] = OrderedDict()
        self.max_prefix_hashes = max_prefix_hashes
        self.dispatched_total = 0

    @property
    def snap_time(self) -> float:
        return self.stats.time if self.stats is not None else float("-inf")

    def load(self) -> float:
        base = self.stats.outstanding_tokens if self.stats is not None else 0
        return max(0, base - self.done_cost) + self.after_cost

    def set_stats(self, stats: ReplicaStats, now: float) -> None:
        if self.stats is not None and stats.time <= self.stats.time:
            return  # the same (or an older) snapshot broadcast again
        self.stats, self.received_at = stats, now
        t = stats.time
        self.after_cost = sum(d.cost for d in self.active.values() if d.t > t)
        while self.recent_done and self.recent_done[0][0] <= t:
            self.recent_done.popleft()
        self.done_cost = sum(c for _, td, c in self.recent_done if td <= t)

    def remember_prefix(self, hashes: list[int]) -> None:
        p = self.prefix
        for h in hashes:
            if h in p:
                p.move_to_end(h)
            else:
                p[h] = None
        while len(p) > self.max_prefix_hashes:
            p.popitem(last=False)

    def prefix_match(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.prefix:
                break
            n += 1
        return n


class LoadBook:
    def __init__(self, max_prefix_hashes: int = 200_000, clock=time.time):
        self._lock = threading.Lock()
        self._replicas: dict[str, _ReplicaState] = {}
        self._where: dict[str, _Dispatch] = {}  # request key -> dispatch
        self._max_prefix_hashes = max_prefix_hashes
        self._clock = clock
        self._routed: OrderedDict[str, str] = OrderedDict()  # request id -> replica, the latest routings

    # ---- replica set and snapshots -------------------------------------------------------------
    def sync(self, stats_by_replica: dict[str, dict | None]) -> None:
        """Set the replica set (ids -> latest stats dict or None); drop replicas not listed."""
        now = self._clock()
        with self._lock:
            for rid in list(self._replicas):
                if rid not in stats_by_replica:
                    st = self._replicas.pop(rid)
                    for key in list(st.active):
                        self._where.pop(key, None)
            for rid, raw in stats_by_replica.items():
                st = self._replicas.get(rid)
                if st is None:
                    st = self._replicas[rid] = _ReplicaState(rid, self._max_prefix_hashes)
                if raw:
                    st.set_stats(ReplicaStats.from_dict(raw), now)

    def update_stats(self, replica_id: str, raw: dict) -> None:
        now = self._clock()
        with self._lock:
            st = self._replicas.get(replica_id)
            if st is None:
                st = self._replicas[replica_id] = _ReplicaState(replica_id, self._max_prefix_hashes)
            st.set_stats(ReplicaStats.from_dict(raw), now)

    # ---- dispatch accounting -------------------------------------------------------------------
    def on_dispatch(self, key: str, replica_id: str, hint: RoutingHint | None) -> None:
        now = self._clock()
        with self._lock:
            st = self._replicas.get(replica_id)
            if st is None:
                st = self._replicas[replica_id] = _ReplicaState(replica_id, self._max_prefix_hashes)
            old = self._where.pop(key, None)
            if old is not None:  # a retry routed elsewhere: forget the first placement
                self._forget(old, key, now, completed=False)
            cost = hint.cost(st.prefix_match(hint.block_hashes)) if hint is not None else 1
            d = _Dispatch(replica_id, cost, now)
            st.active[key] = d
            self._where[key] = d
            st.after_cost += cost if now > st.snap_time else 0
            st.dispatched_total += 1
            if hint is not None and hint.block_hashes:
                st.remember_prefix(hint.block_hashes)
            if hint is not None:
                self._routed[hint.request_id] = replica_id
                self._routed.move_to_end(hint.request_id)
                if len(self._routed) > ROUTED_KEPT:
                    self._routed.popitem(last=False)

    def capacity(self) -> int | None:
        """Requests the healthy replicas admit in all (batch slots plus queue limit, as each
        reports); None while a replica has not reported them yet, or none is healthy."""
        with self._lock:
            total = 0
            for st in self._replicas.values():
                if st.stats is None or "max_queued_requests" not in st.stats.raw:
                    return None
                if st.stats.healthy:
                    total += int(st.stats.raw.get("max_num_seqs", 0)) + int(st.stats.raw["max_queued_requests"])
            return total or None

    def replica_of(self, request_id: str) -> str | None:
        """The replica the request was last routed to (kept for the latest ROUTED_KEPT routings)."""
        with self._lock:
            return self._routed.get(request_id)

    def on_complete(self, key: str, replica_id: str | None = None) -> None:
        """``key`` finished; with ``replica_id``, only if that is where it was dispatched (a
        request rejected by one replica and then routed to another completes twice)."""
        now = self._clock()
        with self._lock:
            d = self._where.get(key)
            if d is None or (replica_id is not None and d.replica_id != replica_id):
                return
            del self._where[key]
            self._forget(d, key, now, completed=True)

    def _forget(self, d: _Dispatch, key: str, now: float, completed: bool) -> None:
        st = self._replicas.get(d.replica_id)
        if st is None or st.active.pop(key, None) is None:
            return
        if d.t > st.snap_time:
            st.after_cost -= d.cost
        elif completed:
            st.done_cost += d.cost
        if completed:  # a snapshot taken before now but received later still counts this request
            st.recent_done.append((now, d.t, d.cost))
            if len(st.recent_done) > 100_000:
                st.recent_done.popleft()

    # ---- reads ---------------------------------------------------------------------------------
    def replica_ids(self) -> list[str]:
        with self._lock:
            return list(self._replicas)

    def views(self, replica_ids: list[str], hint: RoutingHint | None = None) -> list[ReplicaView]:
        now = self._clock()
        hashes = hint.block_hashes if hint is not None else []
        out = []
        with self._lock:
            for rid in replica_ids:
                st = self._replicas.get(rid)
                if st is None:
                    st = self._replicas[rid] = _ReplicaState(rid, self._max_prefix_hashes)
                age = None if st.received_at is None else max(0.0, now - st.received_at)
                out.append(ReplicaView(rid, st.load(), len(st.active), st.prefix_match(hashes) if hashes else 0,
                                       st.stats, age))
        return out

    def snapshot(self) -> dict[str, dict]:
        """Per replica: the latest stats dict plus the router's estimate (for /metrics and debugging)."""
        now = self._clock()
        with self._lock:
            return {
                rid: {
                    "stats": dict(st.stats.raw) if st.stats is not None else None,
                    "stats_age_s": None if st.received_at is None else max(0.0, now - st.received_at),
                    "estimated_outstanding_tokens": st.load(),
                    "router_active_requests": len(st.active),
                    "router_dispatched_total": st.dispatched_total,
                }
                for rid, st in self._replicas.items()
            }
