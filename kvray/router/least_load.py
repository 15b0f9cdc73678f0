"""``least_load``: the default routing policy (pure Python, no Ray)."""
from __future__ import annotations

import random

from kvray.records import RoutingHint
from kvray.router.book import ReplicaBook
from kvray.router.policy import DISPATCH, REJECT, Decision, RoutingPolicy, register_policy, route_from


@register_policy
class LeastLoadPolicy(RoutingPolicy):
    """Least outstanding tokens, with prefix-cache affinity when the load is balanced.

    Replicas whose estimated load is within ``max(affinity_slack_tokens, affinity_slack_ratio
    * min_load)`` of the least-loaded one count as balanced. Among those, the one predicted to
    hold the longest prefix of the request's KV blocks wins (ties: the lower load); with no
    prefix hit anywhere, the least-loaded replica wins. Exact ties break at random so that idle
    replicas share the first requests. Replicas that report themselves unhealthy are not used
    while any other is healthy.
    """

    name = "least_load"

    def __init__(self, affinity_slack_tokens: int = 1024, affinity_slack_ratio: float = 0.1,
                 prefix_affinity: bool = True, seed: int | None = None):
        if not isinstance(affinity_slack_tokens, int) or affinity_slack_tokens < 0:
            raise ValueError(f"affinity_slack_tokens={affinity_slack_tokens!r}: must be an integer >= 0")
        if not isinstance(affinity_slack_ratio, (int, float)) or affinity_slack_ratio < 0:
            raise ValueError(f"affinity_slack_ratio={affinity_slack_ratio!r}: must be a number >= 0")
        if not isinstance(prefix_affinity, bool):
            raise ValueError(f"prefix_affinity={prefix_affinity!r}: must be a boolean")
        self.slack_tokens = affinity_slack_tokens
        self.slack_ratio = float(affinity_slack_ratio)
        self.prefix_affinity = prefix_affinity
        self._rng = random.Random(seed)

    def decide(self, request: RoutingHint, book: ReplicaBook, now: float) -> Decision:
        live = book.live(request.avoid)
        if not live:
            return Decision(REJECT, retry_after_s=1.0, reason="no replicas")
        min_load = min(v.load for v in live)
        pool = [v for v in live if v.load == min_load]
        if self.prefix_affinity and request.block_hashes:
            slack = max(self.slack_tokens, self.slack_ratio * min_load)
            balanced = [(v, v.prefix_hit_blocks(request.block_hashes)) for v in live if v.load - min_load <= slack]
            best = max(h for _, h in balanced)
            if best > 0:
                matched = [v for v, h in balanced if h == best]
                low = min(v.load for v in matched)
                pool = [v for v in matched if v.load == low]
        first = pool[0] if len(pool) == 1 else self._rng.choice(pool)
        return Decision(DISPATCH, route_from(first, book, lambda v: v.load, request.avoid), reason="least load")
