"""The Ray Serve ``RequestRouter`` plug-in: carries kvray's routing decisions to ``LLMReplica``.

Configured on the LLMReplica deployment (``build_app`` sets it as a default)::

    request_router_config:
      request_router_class: kvray.router.serve_router:KVRayRequestRouter
      request_routing_stats_period_s: 0.5

It lives in each process that holds a handle to LLMReplica (the Router ingress). It decides
nothing and writes nothing of a request's life: the Router's ``RequestLife``
(``kvray.router.dispatch``) does that, on the Router's own loop. Serve calls:

* ``update_replicas`` on every broadcast of the replica set, with each replica's latest
  ``record_routing_stats()`` (a ``ReplicaStats``): published to the Router's replica book
  through ``kvray.router.replica_set``;
* ``choose_replicas`` per request: the route the Router's admission wrote into the request's
  ``RoutingHint`` (the ``hint=`` keyword of the handle call), one replica per rank, so Serve
  tries them in that order (a replica at its ``max_ongoing_requests`` is skipped); a call pinned
  to one replica (``pin_replica``: a token channel) goes there or nowhere; a call with no route
  (not from the Router) goes to any replica Serve picks.
"""
from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from kvray import tracing
from kvray.records import ROUTING_STATS_KEY, hint_from_call
from kvray.router.replica_set import feed

PLUGIN_PATH = "kvray.router.serve_router:KVRayRequestRouter"


class KVRayRequestRouter(RequestRouter):
    def initialize_state(self, **_ignored):
        """Serve passes ``request_router_kwargs`` here; routing options belong to the Router
        (``router.policy``), which decides every route."""

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        dep = self._deployment_id
        feed(dep.app_name, dep.name).publish(
            {r.replica_id.unique_id: (r.routing_stats or {}).get(ROUTING_STATS_KEY) for r in replicas})
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
        if hint is None:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if hint.pin_replica is not None:
            r = by_id.get(hint.pin_replica)
            return [[r]] if r is not None else []
        if tracing.ENABLED:
            tracing.trace(hint.request_id, "route_chosen", first_only=True)
        route = [rid for rid in hint.route if rid in by_id and rid not in hint.avoid]
        rest = [r for rid, r in by_id.items() if rid not in route and rid not in hint.avoid]
        if not route:  # not admitted by the Router (a direct handle call): any replica
            return [rest or candidate_replicas]
        return [[by_id[rid]] for rid in route] + [[r] for r in rest]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        if tracing.ENABLED:  # observation only: where the request went is the replica's to say (Bound)
            hint = hint_from_call(pending_request.args, pending_request.kwargs)
            if hint is not None and hint.pin_replica is None:
                tracing.trace(hint.request_id, "route_sent")
