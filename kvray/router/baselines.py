"""Baseline routing policies, for comparisons (pure Python, no Ray): ``round_robin``, and ``p2c``,
Ray Serve's default request router as kvray's simulator and benchmarks model it."""
from __future__ import annotations

import random

from kvray.records import RoutingHint
from kvray.router.book import ReplicaBook
from kvray.router.policy import DISPATCH, QUEUE, REJECT, Decision, RoutingPolicy, register_policy


@register_policy
class RoundRobinPolicy(RoutingPolicy):
    """Replicas in turn (a baseline)."""

    name = "round_robin"

    def __init__(self):
        self._next = 0

    def decide(self, request: RoutingHint, book: ReplicaBook, now: float) -> Decision:
        live = sorted(book.live(request.avoid), key=lambda v: v.replica_id)
        if not live:
            return Decision(REJECT, retry_after_s=1.0, reason="no replicas")
        i = self._next % len(live)
        self._next += 1
        return Decision(DISPATCH, tuple(v.replica_id for v in live[i:] + live[:i]), reason="round robin")


@register_policy
class PowerOfTwoChoicesPolicy(RoutingPolicy):
    """Ray Serve's default request router, as a baseline: two distinct replicas at random, the
    one with fewer of this router's requests in flight wins; a replica at ``max_ongoing_requests``
    is left out, and with every replica full the request waits in the router."""

    name = "p2c"

    def __init__(self, seed: int | None = None, max_ongoing_requests: int | None = None,
                 recheck_interval_s: float = 0.05):
        self._rng = random.Random(seed)
        self.max_ongoing = max_ongoing_requests
        self.recheck_interval_s = recheck_interval_s

    def decide(self, request: RoutingHint, book: ReplicaBook, now: float) -> Decision:
        cap = self.max_ongoing
        pool = [v for v in book.live(request.avoid) if cap is None or v.num_ongoing < cap]
        if not pool:
            return Decision(QUEUE, recheck_at=now + self.recheck_interval_s, reason="every replica at max_ongoing")
        pair = self._rng.sample(pool, 2) if len(pool) > 1 else pool
        first = min(pair, key=lambda v: v.num_ongoing)
        return Decision(DISPATCH, (first.replica_id, *(v.replica_id for v in pair if v is not first)), reason="p2c")
