"""The Ray Serve ``RequestRouter`` plug-in: routes ``LLMReplica`` calls with a kvray policy.

Configured on the LLMReplica deployment (``build_app`` sets it as a default)::

    request_router_config:
      request_router_class: kvray.router.serve_router:KVRayRequestRouter
      request_router_kwargs: {policy: least_load, policy_options: {}}
      request_routing_stats_period_s: 0.5

It lives in each process that holds a handle to LLMReplica (the Router ingress). Serve calls:

* ``update_replicas`` on every controller broadcast of the replica set; the broadcast carries
  each replica's latest ``record_routing_stats()`` dict, which goes into the shared LoadBook.
* ``choose_replicas`` per request: the policy ranks the replicas from the LoadBook's view
  and the request's ``RoutingHint`` (the ``hint=`` keyword of the handle call); each rank is
  one replica, so Serve tries them in the policy's order (a replica at its
  ``max_ongoing_requests`` is skipped).
* ``on_request_routed`` / ``on_request_completed``: the LoadBook (and the policy's own
  per-replica state) count the dispatch and the completion at once, so routing stays fresh
  between stats polls.

Only this module (and the ingress) import Ray; the policy and the book are plain Python.
"""
from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from kvray import tracing
from kvray.router import registry
from kvray.router.hints import hint_from_call

PLUGIN_PATH = "kvray.router.serve_router:KVRayRequestRouter"


class KVRayRequestRouter(RequestRouter):
    _kvray_book = None
    _kvray_policy = None

    def initialize_state(self, policy: str = "least_load", policy_options: Optional[dict] = None, **_ignored):
        app, dep = self._deployment_id.app_name, self._deployment_id.name
        self._kvray_book = registry.get_book(app, dep)
        self._kvray_policy = registry.set_policy(app, dep, policy, policy_options)
        self._kvray_requests: dict[str, str] = {}  # Serve's internal request id -> kvray request id

    def _book(self):
        if self._kvray_book is None:  # initialize_state not called: defaults
            self.initialize_state()
        return self._kvray_book

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._book().sync({r.replica_id.unique_id: (r.routing_stats or None) for r in replicas})
        # Keep Serve's own queue-length cache warm from the routing stats. Serve checks it before
        # each send, and where it has no entry (none yet, or none for 10 s: the first burst after
        # a quiet spell) it probes the replica with an actor call and a 0.1 s deadline, which a
        # replica busy taking in a burst misses ("Failed to get queue length"), backing off
        # every request. An entry Serve already keeps from its own sends and replies wins.
        cache = self.replica_queue_len_cache
        for r in replicas:
            stats = r.routing_stats or {}
            if "num_active_requests" in stats and cache.get(r.replica_id) is None:
                self.on_new_queue_len_info(r.replica_id, int(stats["num_active_requests"]) +
                                           int(stats.get("num_channels", 0)))

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
        book = self._book()
        hint = hint_from_call(pending_request.args, pending_request.kwargs)
        if tracing.ENABLED and hint is not None and hint.pin_replica is None:
            tracing.trace(hint.request_id, "route_chosen", first_only=True)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if hint is not None and hint.pin_replica is not None:
            r = by_id.get(hint.pin_replica)
            return [[r]] if r is not None else []
        if hint is not None and hint.avoid:  # a retry: leave out the replicas that failed it
            by_id = {rid: r for rid, r in by_id.items() if rid not in hint.avoid} or by_id
        order = self._kvray_policy.rank(hint, book.views(list(by_id), hint))
        ranks = [[by_id[rid]] for rid in order if rid in by_id]
        return ranks or [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        hint = hint_from_call(pending_request.args, pending_request.kwargs)
        if hint is not None and hint.pin_replica is not None:
            return  # a token channel, not a request: no load of its own
        key = pending_request.metadata.internal_request_id
        if tracing.ENABLED and hint is not None:
            tracing.trace(hint.request_id, "route_sent")
        self._book().on_dispatch(key, replica_id.unique_id, hint)
        self._kvray_policy.on_dispatch(hint, replica_id.unique_id)
        if hint is not None:
            self._kvray_requests[key] = hint.request_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._book().on_complete(internal_request_id, replica_id.unique_id)
        request_id = self._kvray_requests.pop(internal_request_id, None)
        if request_id is not None:
            self._kvray_policy.on_complete(request_id)
