"""Routing policies (pure Python, no Ray): rank the replicas for one request.

A policy gets the request's ``RoutingHint`` and a ``ReplicaView`` per live replica (estimated
outstanding tokens, predicted prefix-cache hit, latest stats) and returns replica ids, most
preferred first. The Serve plug-in (``kvray.router.serve_router``) tries them in that order.

Policies are registered by name; ``router.policy`` in the app config picks one and
``router.policy_options`` are its keyword arguments. ``least_load`` is the first; an SLO-aware
policy registers itself the same way (``@register_policy``) and may also implement ``admit``
for admission control in the ingress.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

from kvray.router.hints import RoutingHint
from kvray.router.load_book import ReplicaView

POLICIES: dict[str, type["RoutingPolicy"]] = {}


def register_policy(cls: type["RoutingPolicy"]) -> type["RoutingPolicy"]:
    POLICIES[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(POLICIES)


def make_policy(name: str, **options) -> "RoutingPolicy":
    """Build a policy; ValueError for an unknown name, TypeError/ValueError for bad options."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(policy_names())}")
    return cls(**options)


class RoutingPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def rank(self, hint: RoutingHint | None, replicas: list[ReplicaView]) -> list[str]:
        """Replica ids in preference order (may omit replicas that must not take the request)."""

    def admit(self, hint: RoutingHint, replicas: list[ReplicaView] | Callable[[], list[ReplicaView]]):
        """Admission control, asked by the ingress before dispatch: ``(admit, retry_after_s)``, or
        an awaitable of it (the request waits in the router). ``replicas`` is the views of every
        live replica, or a function returning fresh ones (for a policy that waits and re-checks).

        The default admits everything; an SLO-aware policy rejects what no replica can serve
        in time.
        """
        return True, None

    # Request lifecycle. ``on_dispatch``/``on_complete`` come from the Serve plug-in (the call
    # was sent to a replica / ended there); ``on_first_token``/``on_finish`` from the ingress
    # (``time.monotonic()`` times). The load book already counts dispatches and completions; a
    # policy that models latency (TTFT/TPOT) can use these too.
    def on_dispatch(self, hint: RoutingHint | None, replica_id: str) -> None:
        pass

    def on_complete(self, request_id: str, num_generated: int = 0) -> None:
        pass

    def on_first_token(self, hint: RoutingHint | None, t: float) -> None:
        pass

    def on_finish(self, hint: RoutingHint | None, num_generated: int, status: int, t: float) -> None:
        pass


@register_policy
class LeastLoadPolicy(RoutingPolicy):
    """Least outstanding tokens, with prefix-cache affinity when the load is balanced.

    Replicas whose estimated load is within ``max(affinity_slack_tokens, affinity_slack_ratio
    * min_load)`` of the least-loaded one count as balanced. Among those, the one predicted to
    hold the longest prefix of the request's KV blocks wins (ties: the lower load); with no
    prefix hit anywhere, the least-loaded replica wins. Exact ties break at random so that idle
    replicas share the first requests. Replicas that report themselves unhealthy go last.
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

    def rank(self, hint: RoutingHint | None, replicas: list[ReplicaView]) -> list[str]:
        if not replicas:
            return []
        healthy = [v for v in replicas if v.stats is None or v.stats.healthy]
        sick = [v for v in replicas if v.stats is not None and not v.stats.healthy]
        if not healthy:
            healthy, sick = sick, []
        min_load = min(v.load for v in healthy)
        pool = [v for v in healthy if v.load == min_load]
        if self.prefix_affinity and hint is not None and hint.block_hashes:
            slack = max(self.slack_tokens, self.slack_ratio * min_load)
            balanced = [v for v in healthy if v.load - min_load <= slack]
            best = max(v.prefix_blocks for v in balanced)
            if best > 0:
                matched = [v for v in balanced if v.prefix_blocks == best]
                low = min(v.load for v in matched)
                pool = [v for v in matched if v.load == low]
        first = pool[0] if len(pool) == 1 else self._rng.choice(pool)
        rest = sorted((v for v in healthy if v is not first), key=lambda v: (v.load, -v.prefix_blocks))
        rest += sorted(sick, key=lambda v: v.load)
        return [first.replica_id] + [v.replica_id for v in rest]


# Policies defined in their own modules register on import; import them here so that the
# registry (and the app config's check of ``router.policy``) always knows every policy.
from kvray.router import slo_routing  # noqa: E402,F401
