"""One replica as the router sees it (pure Python, no Ray): its latest ``ReplicaStats`` snapshot
(polled by Serve's controller every ``request_routing_stats_period_s`` and broadcast to the
routers), the requests this router has in flight there, and an LRU of the prefix blocks it sent
there (which predicts prefix-cache hits). The replica book (``kvray.router.book``) holds one per
replica and is the only caller of its updates; routing policies read its estimates.

The estimates combine the snapshot with what this router did since: each event is logged with
its time, and a snapshot taken at time ``t`` absorbs the events up to ``t``, so a burst of
dispatches between two polls is seen at once and nothing is counted twice. Requests from other
router processes appear with the next snapshot. Each estimate costs O(priority classes), not
O(requests). All times are wall clock (``time.time()``), the clock of the snapshots.
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque

from kvray.records import EngineStats, ReplicaStats, RoutingHint
from kvray.router.inflight import InFlight, Pending
from kvray.step_cost import DEFAULT_COEFFS, StepCoeffs, StepTimeModel

RATE_WINDOW_S = 10.0     # time constant of the per-class dispatch-rate estimate
PREFIX_CAPACITY = 65536  # block hashes remembered per replica (LRU), capped by the replica's pool
_EMPTY = ReplicaStats(engine=EngineStats(), time=-math.inf)


class ReplicaState:
    """One replica, as this router sees it. Mutated only through the book's events."""

    def __init__(self, replica_id: str, prior: StepCoeffs = DEFAULT_COEFFS):
        self.replica_id = replica_id
        self.stats: ReplicaStats = _EMPTY
        self.received_at: float | None = None
        self.model = StepTimeModel.fixed_coeffs(prior)  # the replica's published fit once it reports
        self._prior = prior
        self.inflight: dict[str, InFlight] = {}
        self.dispatched_total = 0
        self._prefix: OrderedDict[int, None] = OrderedDict()
        self._prefix_capacity = PREFIX_CAPACITY
        self._events: deque = deque()                  # (t, d_requests, d_prefill, d_decoding, d_tokens, d_cost)
        self._delta = [0, 0, 0, 0, 0]
        self._rates: dict[float, list] = {}            # priority -> [prompt tokens/s, as of time]
        self._pending: dict[float, Pending] = {}      # priority -> own requests before their first token
        self._own = [0, 0]                             # [own pending prompt tokens, own decoding]
        self._tpots: dict[float, int] = {}             # tpot_s -> count of own requests
        self.draining_since: float | None = None       # when it left Serve's replica set (book clock)

    # ---- updates (the book calls these) ------------------------------------------------------
    def update_stats(self, stats: ReplicaStats, received_at: float) -> None:
        if stats.time <= self.stats.time:
            return  # the same (or an older) snapshot broadcast again
        self.stats, self.received_at = stats, received_at
        ev = self._events
        while ev and ev[0][0] <= stats.time:
            _, *d = ev.popleft()
            self._delta[:] = [x - y for x, y in zip(self._delta, d)]
        if stats.engine.num_total_blocks:
            self._prefix_capacity = min(PREFIX_CAPACITY, stats.engine.num_total_blocks)
        coeffs = stats.engine.step_coeffs
        self.model = StepTimeModel.fixed_coeffs(StepCoeffs(*coeffs) if coeffs else self._prior)

    def _event(self, now: float, *d: int) -> None:
        self._events.append((now, *d))
        self._delta[:] = [x + y for x, y in zip(self._delta, d)]

    def on_dispatch(self, hint: RoutingHint, now: float, cached_tokens: int | None = None) -> None:
        hit = self.prefix_hit_blocks(hint.block_hashes)
        cached = hit * hint.block_size if cached_tokens is None else cached_tokens
        uncached = max(1, hint.num_prompt_tokens - cached)
        slo = hint.slo
        tpot_s = slo.tpot_s
        r = InFlight(hint.request_id, hint.num_prompt_tokens, uncached, hint.cost(hit),
                     slo.deadline(hint.arrival_time), tpot_s, slo.priority)
        self.inflight[r.request_id] = r
        self.dispatched_total += 1
        self._event(now, 1, uncached, 0, r.prompt_tokens, r.cost)
        self._pending.setdefault(r.priority, Pending()).add(r)
        self._own[0] += uncached
        if tpot_s:
            self._tpots[tpot_s] = self._tpots.get(tpot_s, 0) + 1
        rate = self._rates.setdefault(r.priority, [0.0, now])
        rate[0] = rate[0] * math.exp(-max(0.0, now - rate[1]) / RATE_WINDOW_S) + uncached / RATE_WINDOW_S
        rate[1] = now
        prefix = self._prefix
        for h in hint.block_hashes:
            prefix[h] = None
            prefix.move_to_end(h)
        while len(prefix) > self._prefix_capacity:
            prefix.popitem(last=False)

    def on_first_token(self, request_id: str, now: float) -> None:
        r = self.inflight.get(request_id)
        if r is None or r.first_token_at is not None:
            return
        r.first_token_at = now
        self._pending[r.priority].remove(r)
        self._own[0] -= r.uncached_tokens
        self._own[1] += 1
        self._event(now, 0, -r.uncached_tokens, 1, 0, 0)

    def on_finish(self, request_id: str, now: float, num_output_tokens: int = 0) -> None:
        r = self.inflight.pop(request_id, None)
        if r is None:
            return
        if r.tpot_s:
            self._tpots[r.tpot_s] -= 1
            if not self._tpots[r.tpot_s]:
                del self._tpots[r.tpot_s]
        if r.first_token_at is None:  # ended before its first token (abort, error, moved)
            self._pending[r.priority].remove(r)
            self._own[0] -= r.uncached_tokens
            self._event(now, -1, -r.uncached_tokens, 0, -r.prompt_tokens - num_output_tokens, -r.cost)
        else:
            self._own[1] -= 1
            self._event(now, -1, 0, -1, -r.prompt_tokens - num_output_tokens, -r.cost)

    # ---- estimates (what policies read) ------------------------------------------------------
    @property
    def engine(self) -> EngineStats:
        return self.stats.engine

    @property
    def healthy(self) -> bool:
        return self.stats.healthy

    @property
    def routable(self) -> bool:
        """In Serve's replica set (not draining): new requests may go there."""
        return self.draining_since is None

    @property
    def load(self) -> float:
        """Outstanding tokens (uncached prompt + budgeted decode), the least-load policy's measure."""
        return max(0, self.stats.outstanding_tokens + self._delta[4])

    @property
    def num_ongoing(self) -> int:
        """Requests this router sent there and has not seen finish (Ray Serve's queue length)."""
        return len(self.inflight)

    @property
    def num_requests(self) -> int:
        e = self.engine
        return max(len(self.inflight), e.num_running + e.num_waiting + self._delta[0])

    @property
    def queued_prefill_tokens(self) -> int:
        return max(self._own[0], self.engine.queued_prefill_tokens + self._delta[1])

    @property
    def num_decoding(self) -> int:
        return max(self._own[1], self.engine.num_running + self._delta[2])

    @property
    def context_tokens(self) -> int:
        """Tokens held or queued on the replica (KV in use + queued prompts), estimated."""
        return max(0, self.engine.tokens_in_flight + self._delta[3])

    @property
    def free_blocks(self) -> int | None:
        e = self.engine
        return e.num_free_blocks - self._delta[3] // e.block_size if e.num_total_blocks else None

    @property
    def max_num_seqs(self) -> int:
        return self.engine.max_num_seqs

    @property
    def full(self) -> bool:
        """As many requests there as it admits (batch slots plus its queue limit)."""
        return bool(self.stats.max_queued_requests) and self.num_requests >= self.stats.capacity

    def min_tpot_s(self) -> float | None:
        """The tightest TPOT target among the requests there: this router's, and the replica's own
        report (which covers other routers' requests)."""
        there = self.engine.min_tpot_s
        vals = list(self._tpots) + ([there] if there else [])
        return min(vals) if vals else None

    def prefill_rates(self, now: float, priority: float) -> tuple[float, float]:
        """Prompt tokens per second recently sent here: (by every class, by classes above
        ``priority`` -- which a deadline-ordered replica serves first even when they arrive later)."""
        total = above = 0.0
        for p, (r, t) in self._rates.items():
            x = r * math.exp(-(now - t) / RATE_WINDOW_S) if now > t else r
            total += x
            if p > priority:
                above += x
        return total, above

    def prefill_ahead_of(self, key: float, deadline: float | None, now: float) -> int:
        """Queued prompt tokens the replica serves before a new request whose ``urgency`` is
        ``key`` (``kvray.slo.urgency`` of its deadline and priority): all of them for FCFS; for a
        deadline-ordered replica, own pending requests that are more urgent, plus what the
        snapshot shows that the router cannot attribute (assumed ahead)."""
        if self.engine.scheduling_policy == "fcfs":
            return self.queued_prefill_tokens
        ahead = 0
        for p, pend in self._pending.items():
            if not pend.ids:
                continue
            if key < 1e9:  # on time: on-time requests with (d - now) / p <= key, and those of lower
                # classes due before the new request's deadline (their slack shrinks faster: they pass it)
                ahead += pend.tokens_between(now, max(now + key * p, deadline if deadline is not None else now))
            elif deadline is not None:  # late: every on-time request, then late ones by deadline
                ahead += pend.tokens_between(now, math.inf) + pend.tokens_between(-math.inf, min(deadline, now))
            else:
                ahead += sum(pend.tokens)
        unknown = max(0, self.engine.queued_prefill_tokens + self._delta[1] - self._own[0])
        return ahead + unknown

    def prefix_hit_blocks(self, block_hashes) -> int:
        """How many leading block hashes of a prompt the replica is believed to hold."""
        n = 0
        prefix = self._prefix
        for h in block_hashes:
            if h not in prefix:
                break
            n += 1
        return n

    def snapshot(self, now: float) -> dict:
        """For ``/v1/kvray/replicas`` and the per-replica gauges."""
        s = self.stats
        return {"stats": None if s is _EMPTY else s, "stats_age_s": None if self.received_at is None else
                max(0.0, now - self.received_at), "estimated_outstanding_tokens": self.load,
                "router_active_requests": len(self.inflight), "router_dispatched_total": self.dispatched_total,
                "estimated_requests": self.num_requests, "estimated_queued_prefill_tokens": self.queued_prefill_tokens,
                "step_coeffs": self.model.coeffs.as_tuple(), "draining_since": self.draining_since}
