"""``slo_aware``: the SLO-aware policy (``kvray.router.slo_policy``) as a platform routing policy.

Selected with ``router: {policy: slo_aware, policy_options: {...}}`` in the app args. It adapts
``SLOAwarePolicy.choose`` (one decision per request: dispatch to a replica, queue in the router,
or reject) to the platform's hooks (``kvray.router.policy.RoutingPolicy``):

* ``admit(hint, views)`` — asked by the Router ingress before dispatch. Dispatch: the replica is
  reserved for the request at once (so a burst of admissions sees each other's load), and
  ``rank`` later puts it first. Queue: an awaitable that re-decides whenever a first token or a
  completion frees capacity, and at the policy's re-check time at the latest; it ends in a
  dispatch, or in a reject once the request can no longer meet its TTFT target (never held past
  its deadline). Reject: ``(False, retry_after_s)``, which the ingress answers with HTTP 429 and
  ``Retry-After``.
* ``rank(hint, views)`` — asked by the Serve request-router plug-in: the reserved replica first,
  the others by predicted TTFT (Serve falls back to them only if the first is at its
  ``max_ongoing_requests``). A call that did not go through ``admit`` is decided here.
* ``on_dispatch`` (plug-in), ``on_first_token`` / ``on_finish`` (ingress) and ``on_complete``
  (plug-in: the replica call ended) keep each replica's ``SLOReplicaState`` fresh between stats
  polls.

The replica states live in the Router process; they are fed by the replicas' routing stats
(``LLMReplica.record_routing_stats``: queue, KV blocks, step records for the step-time fit) and by
this router's own events. Every method takes one lock: Serve's router loop and the ingress loop
may run on different threads. All times are wall-clock seconds (``time.time()``), the clock of
the stats snapshots and of ``RoutingHint.arrival_time``.

Options (``policy_options``): ``mode`` (``pack`` | ``spread``), ``on_infeasible`` (one of
``queue`` | ``reject`` | ``best_effort`` for every class, or a mapping class -> one of them;
default ``queue``), ``step_coeffs`` (prior ``{a, b, c, d}`` of the step-time model before a
replica's own step records refine it), and ``SLOAwarePolicy``'s tuning keywords
(``ttft_margin``, ``tpot_margin``, ``min_prefix_blocks``, ``recheck_interval_s``,
``min_prefill_tokens``, ``pack_wait_s``, ``max_candidates``).
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

from kvray.router.hints import RoutingHint
from kvray.router.latency_model import DEFAULT_COEFFS, SLOReplicaState, StepCoeffs, StepTimeModel
from kvray.router.load_book import ReplicaView
from kvray.router.policy import RoutingPolicy, register_policy
from kvray.router.slo_policy import DISPATCH, QUEUE, Decision, RouteRequest, SLOAwarePolicy, SLOClass

_CHOICES = ("queue", "reject", "best_effort")
_TUNING = ("ttft_margin", "tpot_margin", "min_prefix_blocks", "recheck_interval_s", "min_prefill_tokens",
           "pack_wait_s", "max_candidates")


def _step_coeffs(raw) -> StepCoeffs:
    if raw is None:
        return DEFAULT_COEFFS
    if not isinstance(raw, dict) or set(raw) - set("abcd") or not all(k in raw for k in "abcd"):
        raise ValueError(f"step_coeffs={raw!r}: must be a mapping with the keys a, b, c, d")
    if not all(isinstance(raw[k], (int, float)) and raw[k] >= 0 for k in "abcd"):
        raise ValueError(f"step_coeffs={raw!r}: every coefficient must be a number >= 0")
    return StepCoeffs(*(float(raw[k]) for k in "abcd"))


@register_policy
class SLOAwareRoutingPolicy(RoutingPolicy):
    name = "slo_aware"

    def __init__(self, mode: str = "pack", on_infeasible: str | dict[str, str] = "queue",
                 step_coeffs: dict | None = None, clock: Callable[[], float] = time.time, **tuning):
        unknown = set(tuning) - set(_TUNING)
        if unknown:
            raise ValueError(f"unknown slo_aware option(s): {', '.join(sorted(unknown))}; known: mode, "
                             f"on_infeasible, step_coeffs, {', '.join(_TUNING)}")
        choices = on_infeasible.values() if isinstance(on_infeasible, dict) else [on_infeasible]
        if not all(c in _CHOICES for c in choices):
            raise ValueError(f"on_infeasible={on_infeasible!r}: each must be one of {', '.join(_CHOICES)}")
        self.policy = SLOAwarePolicy(mode, **tuning)
        self.on_infeasible = on_infeasible
        self.prior = _step_coeffs(step_coeffs)
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, SLOReplicaState] = {}
        self._requests: dict[str, RouteRequest] = {}  # admitted and not finished
        self._where: dict[str, str] = {}             # request id -> replica id holding its reservation
        self._wakers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.counts = {"dispatched": 0, "queued": 0, "rejected": 0}

    # ---- replica states ------------------------------------------------------------------------
    def _sync(self, views: list[ReplicaView], prune: bool) -> list[SLOReplicaState]:
        states = []
        for v in views:
            st = self._states.get(v.replica_id)
            if st is None:
                st = self._states[v.replica_id] = SLOReplicaState(v.replica_id, model=StepTimeModel(self.prior))
            if v.stats is not None and v.stats.time > st.stats_time:
                st.update_stats(v.stats.raw, v.stats.time)
            states.append(st)
        if prune:
            live = {v.replica_id for v in views}
            for rid in [r for r in self._states if r not in live]:
                del self._states[rid]
        healthy = [st for st, v in zip(states, views) if v.stats is None or v.stats.healthy]
        return healthy or states

    def _request(self, hint: RoutingHint) -> RouteRequest:
        req = self._requests.get(hint.request_id)
        if req is None:
            name = hint.slo_class or "default"
            policy = self.on_infeasible.get(name, "queue") if isinstance(self.on_infeasible, dict) \
                else self.on_infeasible
            slo = SLOClass(name, hint.ttft_ms or 1e9, hint.tpot_ms, hint.priority, policy)
            req = RouteRequest(hint.request_id, hint.num_prompt_tokens, max(1, hint.decode_estimate), slo,
                               hint.arrival_time or self._clock(), hint.block_hashes)
        return req

    def _decide(self, hint: RoutingHint, views: list[ReplicaView], prune: bool) -> Decision:
        """Decide for a request without a reservation; on DISPATCH reserve the replica (lock held)."""
        states = self._sync(views, prune)
        req = self._request(hint)
        now = self._clock()
        d = self.policy.choose(req, states, now)
        if d.action == DISPATCH:
            self._reserve(req, d.replica_id, d.cached_tokens, now)
        return d

    def _reserve(self, req: RouteRequest, replica_id: str, cached_tokens: int, now: float) -> None:
        self._requests[req.request_id] = req
        self._where[req.request_id] = replica_id
        self._states[replica_id].on_dispatch(req.request_id, req.prompt_tokens, req.max_tokens, req.block_hashes,
                                             now, cached_tokens=cached_tokens, deadline=req.deadline,
                                             tpot_s=req.slo.tpot_s, priority=req.slo.priority)
        self.counts["dispatched"] += 1

    # ---- admission (ingress) -------------------------------------------------------------------
    def admit(self, hint: RoutingHint, replicas: list[ReplicaView] | Callable[[], list[ReplicaView]]):
        get_views = replicas if callable(replicas) else (lambda: replicas)
        with self._lock:
            d = self._decide(hint, get_views(), prune=True)
            if d.action == QUEUE:
                self.counts["queued"] += 1
        if d.action == DISPATCH:
            return True, None
        if d.action == QUEUE:
            return self._wait(hint, d, get_views)
        with self._lock:
            self.counts["rejected"] += 1
        return False, d.retry_after_s

    async def _wait(self, hint: RoutingHint, d: Decision, get_views) -> tuple[bool, float | None]:
        loop = asyncio.get_running_loop()
        waker = (loop, asyncio.Event())
        with self._lock:
            self._wakers.add(waker)
        try:
            while d.action == QUEUE:
                waker[1].clear()
                try:
                    await asyncio.wait_for(waker[1].wait(), max(0.0, d.recheck_at - self._clock()))
                except asyncio.TimeoutError:
                    pass
                with self._lock:
                    d = self._decide(hint, get_views(), prune=True)
        finally:
            with self._lock:
                self._wakers.discard(waker)
        if d.action == DISPATCH:
            return True, None
        with self._lock:
            self.counts["rejected"] += 1
        return False, d.retry_after_s

    def _wake(self) -> None:  # lock held
        for loop, event in self._wakers:
            loop.call_soon_threadsafe(event.set)

    @property
    def num_waiting(self) -> int:
        """Requests held in the router for a replica to free up."""
        with self._lock:
            return len(self._wakers)

    # ---- routing (Serve plug-in) ---------------------------------------------------------------
    def rank(self, hint: RoutingHint | None, replicas: list[ReplicaView]) -> list[str]:
        if not replicas:
            return []
        with self._lock:
            states = self._sync(replicas, prune=False)
            if hint is None:
                return [st.replica_id for st in sorted(states, key=lambda s: s.outstanding_tokens)]
            first = self._where.get(hint.request_id)
            if first is None:  # not admitted by the ingress (a direct handle call): decide now
                d = self._decide(hint, replicas, prune=False)
                if d.action == DISPATCH:
                    first = d.replica_id
            req = self._request(hint)
            now = self._clock()
            others = sorted((st for st in states if st.replica_id != first),
                            key=lambda st: self.policy.estimate(req, st, now).ttft_s)
        return ([first] if first is not None else []) + [st.replica_id for st in others]

    def on_dispatch(self, hint: RoutingHint | None, replica_id: str) -> None:
        """Serve sent the request to ``replica_id``; move the reservation if it went elsewhere."""
        if hint is None:
            return
        with self._lock:
            rid = hint.request_id
            where = self._where.get(rid)
            if where == replica_id or replica_id not in self._states:
                return
            now = self._clock()
            if where is not None and where in self._states:
                self._states[where].on_complete(rid, now)
            self._reserve(self._request(hint), replica_id, 0, now)
            self.counts["dispatched"] -= 1  # a move, not a new dispatch

    def on_first_token(self, hint: RoutingHint | None, t: float) -> None:
        if hint is None:
            return
        with self._lock:
            st = self._states.get(self._where.get(hint.request_id, ""))
            if st is not None:
                st.on_first_token(hint.request_id, self._clock())
                self._wake()

    def on_finish(self, hint: RoutingHint | None, num_generated: int, status: int, t: float) -> None:
        if hint is not None:
            self.on_complete(hint.request_id, num_generated)

    def on_complete(self, request_id: str, num_generated: int = 0) -> None:
        with self._lock:
            self._requests.pop(request_id, None)
            where = self._where.pop(request_id, None)
            st = self._states.get(where) if where is not None else None
            if st is not None:
                st.on_complete(request_id, self._clock(), num_generated)
                self._wake()

    def snapshot(self) -> dict:
        """Per replica: what the policy predicts from (for ``/v1/kvray/replicas``)."""
        with self._lock:
            return {rid: {"requests": st.num_requests, "queued_prefill_tokens": st.queued_prefill_tokens,
                          "decoding": st.num_decoding, "step_coeffs": st.model.coeffs.as_tuple()}
                    for rid, st in self._states.items()} | {"_router": dict(self.counts, waiting=len(self._wakers))}
