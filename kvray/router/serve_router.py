"""The Ray Serve ``RequestRouter`` plug-in: carries kvray's routing decisions to ``LLMReplica``.

Configured on the LLMReplica deployment (``build_app`` sets it as a default)::

    request_router_config:
      request_router_class: kvray.router.serve_router:KVRayRequestRouter
      request_router_kwargs: {policy: least_load, policy_options: {}}
      request_routing_stats_period_s: 0.5

It lives in each process that holds a handle to LLMReplica (the Router ingress) and shares that
process's ``Dispatcher`` and replica book (``kvray.router.dispatch``). Serve calls:

* ``update_replicas`` on every broadcast of the replica set, with each replica's latest
  ``record_routing_stats()`` (a ``ReplicaStats``), which goes into the book;
* ``choose_replicas`` per request: the route the Router's admission wrote into the request's
  ``RoutingHint`` (the ``hint=`` keyword of the handle call), one replica per rank, so Serve
  tries them in that order (a replica at its ``max_ongoing_requests`` is skipped); a call that
  carries no route (not from the Router) is decided here with the same policy;
* ``on_request_routed`` / ``on_request_completed``: the dispatch and the end of the call enter
  the book at once, so routing stays fresh between stats polls.
"""
from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from kvray import tracing
from kvray.records import ROUTING_STATS_KEY, hint_from_call
from kvray.router.dispatch import get_dispatcher

PLUGIN_PATH = "kvray.router.serve_router:KVRayRequestRouter"


class KVRayRequestRouter(RequestRouter):
    _kvray = None

    def initialize_state(self, policy: str = "least_load", policy_options: Optional[dict] = None, **_ignored):
        dep = self._deployment_id
        self._kvray = get_dispatcher(dep.app_name, dep.name, policy, policy_options)
        self._kvray_requests: dict[str, str] = {}  # Serve's internal request id -> kvray request id

    def _dispatcher(self):
        if self._kvray is None:  # initialize_state not called: defaults
            self.initialize_state()
        return self._kvray

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._dispatcher().book.sync({r.replica_id.unique_id: (r.routing_stats or {}).get(ROUTING_STATS_KEY)
                                      for r in replicas})
        # Keep Serve's own queue-length cache warm from the routing stats. Serve checks it before
        # each send, and where it has no entry (none yet, or none for 10 s: the first burst after
        # a quiet spell) it probes the replica with an actor call and a 0.1 s deadline, which a
        # replica busy taking in a burst misses ("Failed to get queue length"), backing off
        # every request. An entry Serve already keeps from its own sends and replies wins.
        cache = self.replica_queue_len_cache
        for r in replicas:
            stats = (r.routing_stats or {}).get(ROUTING_STATS_KEY)
            if stats is not None and cache.get(r.replica_id) is None:
                self.on_new_queue_len_info(r.replica_id, stats.num_active_requests + stats.num_channels)

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        # every rank names all live replicas: when none accepts, wait (backoff) before asking again
        pending_request.routing_context.should_backoff = True
        hint = hint_from_call(pending_request.args, pending_request.kwargs)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if hint is None:
            return [candidate_replicas]
        if hint.pin_replica is not None:
            r = by_id.get(hint.pin_replica)
            return [[r]] if r is not None else []
        if tracing.ENABLED:
            tracing.trace(hint.request_id, "route_chosen", first_only=True)
        if not hint.route:  # not admitted by the Router (a direct handle call): decide now
            self._dispatcher().decide(hint)
        route = [rid for rid in hint.route if rid in by_id and rid not in hint.avoid]
        rest = [rid for rid in by_id if rid not in route and rid not in hint.avoid]
        return [[by_id[rid]] for rid in route + rest] or [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        hint = hint_from_call(pending_request.args, pending_request.kwargs)
        if hint is None or hint.pin_replica is not None:
            return  # a token channel, not a request: no load of its own
        if tracing.ENABLED:
            tracing.trace(hint.request_id, "route_sent")
        self._dispatcher().on_routed(hint, replica_id.unique_id)
        self._kvray_requests[pending_request.metadata.internal_request_id] = hint.request_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        request_id = self._kvray_requests.pop(internal_request_id, None)
        if request_id is not None:
            self._dispatcher().on_finish(request_id, replica_id=replica_id.unique_id)

