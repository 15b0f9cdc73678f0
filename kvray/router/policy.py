"""Routing policies behind one interface (pure Python, no Ray).

A policy answers one question per request: ``decide(request, book, now) -> Decision``, where
``request`` is the request's ``RoutingHint`` and ``book`` the ``ReplicaBook`` (read only). The decision dispatches (a route: replica ids, best first; the
first is where the request goes, the rest are Serve's fallbacks when it is at its
``max_ongoing_requests``), holds the request in the router until ``recheck_at`` (``QUEUE``), or
refuses it (``REJECT``: a 429 with ``Retry-After``).

Policies are registered by name (``@register_policy``); ``router.policy`` in the app config picks
one and ``router.policy_options`` are its constructor's keyword arguments. The built-in ones
(``least_load``, ``slo_aware``, and the baselines ``round_robin`` and ``p2c``) register when
``kvray.router`` is imported. The Router's admission (``kvray.router.dispatch``) and
``benchmarks/router_sim.py`` both go through this registry, with the same names.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from kvray.records import RoutingHint
from kvray.router.book import ReplicaBook
from kvray.router.replica_state import ReplicaState

DISPATCH, QUEUE, REJECT = "dispatch", "queue", "reject"


@dataclass(frozen=True)
class Decision:
    action: str                        # DISPATCH | QUEUE | REJECT
    route: tuple[str, ...] = ()        # DISPATCH: replica ids, best first
    recheck_at: float | None = None    # QUEUE: decide again by then (router clock)
    retry_after_s: float | None = None  # REJECT: seconds for the Retry-After header
    cached_tokens: int | None = None   # DISPATCH: prompt tokens believed cached at route[0]
    predicted_ttft_s: float | None = None
    reason: str = ""


class RoutingPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def decide(self, request: RoutingHint, book: ReplicaBook, now: float) -> Decision:
        """Where ``request`` goes now, if anywhere. Reads the book; changes nothing."""


POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
    POLICIES[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(POLICIES)


def make_policy(name: str, **options) -> RoutingPolicy:
    """Build a policy; ValueError for an unknown name, TypeError/ValueError for bad options."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(policy_names())}")
    return cls(**options)


def route_from(first: ReplicaState, book: ReplicaBook, key, avoid: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``first``, then the other healthy replicas by ``key``, then the unhealthy ones (none of
    ``avoid``, none draining): Serve tries them in this order when one is at its
    ``max_ongoing_requests``."""
    rest = sorted((s for s in book.routable() if s is not first and s.replica_id not in avoid),
                  key=lambda s: (not s.healthy, key(s)))
    return (first.replica_id, *(s.replica_id for s in rest))
