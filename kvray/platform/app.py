"""``build_app``: the Serve application builder (``import_path: kvray.platform:build_app``).

Wires ``Router`` (HTTP ingress) -> ``LLMReplica`` (engine) and sets defaults for the
deployment options, which the Serve config file overrides key by key (a key under
``deployments:`` replaces the code's value; ``ray_actor_options`` and
``request_router_config`` are replaced as a whole):

* LLMReplica: ``max_ongoing_requests`` above what the engine admits (its batch, ``max_num_seqs``,
  plus its bounded queue, ``max_queued_requests``, plus ``CHANNEL_SLOTS`` for the token-stream
  protocol's own calls: ``kvray.platform.token_streams``),
  so the engine's own limit answers first, at once, with a 429 the Router passes on, and no
  request waits unboundedly at a handle; the kvray request router with the args' policy, routing stats every ``router.stats_period_s``, a health
  check every 2 s (a replica whose engine died exits by itself; the check finds it gone), no
  access log (the Router logs each HTTP request; these are its internal calls).
* Router: ``max_ongoing_requests = 4096`` (it only waits on streams).
* Both: Serve's ``graceful_shutdown_timeout_s`` (when Serve kills a replica it is stopping) is the
  args' ``graceful_shutdown_timeout_s`` plus ``SHUTDOWN_GRACE_S``: the Router ends what still runs
  at the args' timeout (``kvray.frontend.drain``), and has that long to write the last events.
  ``graceful_shutdown_wait_loop_s`` (how often Serve looks whether a stopping replica is idle) is
  ``SHUTDOWN_WAIT_LOOP_S``, so a replica goes soon after its last request.

Replica counts, resources and autoscaling are never set here: they belong to the config file.
"""
from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig

from kvray.app_config import AppArgs, parse_args
from kvray.frontend.ingress import Router
from kvray.platform.autoscaling.defaults import apply_autoscaling_defaults
from kvray.platform.replica import LLMReplica
from kvray.platform.token_streams import CHANNEL_SLOTS
from kvray.router.serve_router import PLUGIN_PATH

ROUTER_MAX_ONGOING = 4096
SHUTDOWN_GRACE_S = 5.0
SHUTDOWN_WAIT_LOOP_S = 0.5


def shutdown_options(a: AppArgs) -> dict:
    return dict(graceful_shutdown_timeout_s=a.graceful_shutdown_timeout_s + SHUTDOWN_GRACE_S,
                graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S)


def replica_options(a: AppArgs) -> dict:
    max_num_seqs = a.engine.max_num_seqs
    queued = a.engine.max_queued_requests or max_num_seqs
    return dict(
        max_ongoing_requests=max_num_seqs + queued + CHANNEL_SLOTS,
        **shutdown_options(a),
        health_check_period_s=2.0,
        # Every request makes a generate call here and streams through a token channel: an
        # access-log line per internal call costs more CPU than the call under load. The
        # Router's log keeps one line per HTTP request.
        logging_config={"enable_access_log": False},
        request_router_config=RequestRouterConfig(
            request_router_class=PLUGIN_PATH,
            request_routing_stats_period_s=a.router.stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 10 * a.router.stats_period_s),
        ),
    )


def build_app(args: dict | None = None):
    """Validate ``args`` (raising a ConfigError that names each bad field) and bind the app."""
    return make_app(parse_args(args))


def make_app(a: AppArgs, replica_overrides: dict | None = None, router_overrides: dict | None = None):
    """Bind the app from validated args. The overrides are extra code-side deployment options
    (for Python callers such as tests: ``serve.run(make_app(a, {"num_replicas": 2}))``)."""
    overrides = dict(replica_overrides or {})
    if overrides.get("autoscaling_config") is not None:
        overrides["autoscaling_config"] = apply_autoscaling_defaults(overrides["autoscaling_config"],
                                                                     a.engine.max_num_seqs)
    replica = serve.deployment(LLMReplica, name="LLMReplica").options(**{**replica_options(a), **overrides})
    router = serve.deployment(Router, name="Router").options(
        **{"max_ongoing_requests": ROUTER_MAX_ONGOING, **shutdown_options(a), **(router_overrides or {})})
    llm = replica.bind(a.model, a.engine_options(), a.graceful_shutdown_timeout_s, a.stream_interval_ms,
                       a.served_model_name)
    return router.bind(llm, a.model_dump(mode="json"))
