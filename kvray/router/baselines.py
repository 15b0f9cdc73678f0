"""Baseline routing policies with the ``choose(request, replicas, now) -> Decision`` shape of
``kvray.router.slo_policy.SLOAwarePolicy`` (pure Python, no Ray), for the router simulator.

* ``RoundRobinPolicy``: replicas in turn.
* ``PowerOfTwoChoicesPolicy``: Ray Serve's default request router: two distinct replicas at
  random, the one with fewer ongoing requests (this router's dispatched-but-unfinished
  requests, ``SLOReplicaState.num_ongoing``) wins; a replica at ``max_ongoing_requests`` is skipped
  (another pair is drawn), and with every replica full the request waits in the router.
* ``LeastLoadPolicy``: kvray's platform policy, reused as is: ``kvray.router.policy.LeastLoadPolicy``
  (least outstanding tokens, prefix affinity when balanced) over the platform's
  ``kvray.router.load_book.LoadBook``. This adapter feeds the book from the same events
  (``on_stats`` / ``on_dispatch`` / ``on_complete``) that the Serve plug-in feeds it.

Every policy here has the optional hooks ``on_stats(replica_id, stats, now)``,
``on_dispatch(request, replica_id, now)`` and ``on_complete(request_id, now)``; the simulator
calls them next to the ``SLOReplicaState`` updates.
"""
from __future__ import annotations

import random

from kvray.router.hints import RoutingHint
from kvray.router.latency_model import SLOReplicaState
from kvray.router.load_book import LoadBook
from kvray.router.policy import LeastLoadPolicy as _PlatformLeastLoad
from kvray.router.slo_policy import DISPATCH, QUEUE, Decision, RouteRequest


class _Hooks:
    def on_stats(self, replica_id: str, stats: dict, now: float) -> None:
        pass

    def on_dispatch(self, req: RouteRequest, replica_id: str, now: float) -> None:
        pass

    def on_complete(self, request_id: str, now: float) -> None:
        pass


class RoundRobinPolicy(_Hooks):
    name = "round-robin"

    def __init__(self):
        self._next = 0

    def choose(self, req: RouteRequest, replicas: list[SLOReplicaState], now: float) -> Decision:
        v = replicas[self._next % len(replicas)]
        self._next += 1
        return Decision(DISPATCH, v.replica_id, reason="round robin")


class PowerOfTwoChoicesPolicy(_Hooks):
    name = "p2c"

    def __init__(self, seed: int = 0, max_ongoing_requests: int | None = None, recheck_interval_s: float = 0.05):
        self._rng = random.Random(seed)
        self.max_ongoing = max_ongoing_requests
        self.recheck_interval_s = recheck_interval_s

    def choose(self, req: RouteRequest, replicas: list[SLOReplicaState], now: float) -> Decision:
        cap = self.max_ongoing
        pool = list(replicas) if cap is None else [v for v in replicas if v.num_ongoing < cap]
        if not pool:
            return Decision(QUEUE, recheck_at=now + self.recheck_interval_s, reason="all replicas at max_ongoing")
        if len(pool) == 1:
            return Decision(DISPATCH, pool[0].replica_id, reason="p2c")
        a, b = self._rng.sample(pool, 2)
        v = a if a.num_ongoing <= b.num_ongoing else b
        return Decision(DISPATCH, v.replica_id, reason="p2c")


class LeastLoadPolicy(_Hooks):
    """The platform's least-load policy and load book, driven through the simulator's hooks."""

    name = "least-load"

    def __init__(self, clock, decode_estimate_cap: int = 512, block_size: int = 16, seed: int = 0, **options):
        self.book = LoadBook(clock=clock)
        self.policy = _PlatformLeastLoad(seed=seed, **options)
        self.decode_cap = decode_estimate_cap
        self.block_size = block_size
        self._ids: list[str] | None = None

    def hint(self, req: RouteRequest) -> RoutingHint:
        return RoutingHint(request_id=req.request_id, num_prompt_tokens=req.prompt_tokens,
                           decode_estimate=min(req.max_tokens, self.decode_cap), block_hashes=list(req.block_hashes),
                           block_size=self.block_size, slo_class=req.slo.name, ttft_ms=req.slo.ttft_ms,
                           tpot_ms=req.slo.tpot_ms, priority=req.slo.priority, arrival_time=req.arrival_time)

    def choose(self, req: RouteRequest, replicas: list[SLOReplicaState], now: float) -> Decision:
        ids = [v.replica_id for v in replicas]
        hint = self.hint(req)
        order = self.policy.rank(hint, self.book.views(ids, hint))
        return Decision(DISPATCH, order[0], reason="least load")

    def on_stats(self, replica_id: str, stats: dict, now: float) -> None:
        self.book.update_stats(replica_id, stats)

    def on_dispatch(self, req: RouteRequest, replica_id: str, now: float) -> None:
        self.book.on_dispatch(req.request_id, replica_id, self.hint(req))

    def on_complete(self, request_id: str, now: float) -> None:
        self.book.on_complete(request_id)
