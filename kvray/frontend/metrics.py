"""Prometheus metrics served by the Router at ``GET /metrics``.

Metrics live in the process that records them. The Router records the request-level ones
(counts, latencies, tokens, SLO attainment); the per-replica gauges (queue depth, KV usage,
tokens in flight) come from the replica stats the Router's request-router plug-in already
receives, read at scrape time. With several Router replicas each serves its own counters:
scrape them all (or sum in Prometheus).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                    7.5, 10.0, 20.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                 1.0, 2.0)

_REPLICA_GAUGES = (  # (name, help, value of a ReplicaStats)
    ("kvray_replica_num_waiting", "Requests waiting in the replica's engine queue", lambda s: s.engine.num_waiting),
    ("kvray_replica_num_running", "Requests running in the replica's engine", lambda s: s.engine.num_running),
    ("kvray_replica_kv_blocks_free", "Free KV-cache blocks", lambda s: s.engine.num_free_blocks),
    ("kvray_replica_kv_blocks_total", "Total KV-cache blocks", lambda s: s.engine.num_total_blocks),
    ("kvray_replica_tokens_in_flight", "Context tokens of the replica's requests", lambda s: s.engine.tokens_in_flight),
    ("kvray_replica_queued_prefill_tokens", "Prompt tokens still to prefill", lambda s: s.engine.queued_prefill_tokens),
    ("kvray_replica_outstanding_tokens", "Prefill plus budgeted decode tokens still to process",
     lambda s: s.outstanding_tokens),
    ("kvray_replica_prefix_hit_rate", "Prefix-cache hit rate", lambda s: s.engine.prefix_hit_rate),
    ("kvray_replica_kv_usage_ratio", "Used share of the KV cache", lambda s: s.engine.kv_usage),
)


class _ReplicaCollector:
    def __init__(self, snapshot: Callable[[], dict], model: str):
        self._snapshot = snapshot
        self._model = model

    def collect(self):
        snap = self._snapshot() or {}
        fams = {name: GaugeMetricFamily(name, doc, labels=["model", "replica"]) for name, doc, _ in _REPLICA_GAUGES}
        est = GaugeMetricFamily("kvray_router_estimated_outstanding_tokens",
                                "The router's load estimate (stats + dispatches since)", labels=["model", "replica"])
        age = GaugeMetricFamily("kvray_replica_stats_age_seconds", "Age of the replica's latest stats",
                                labels=["model", "replica"])
        for rid, entry in snap.items():
            labels = [self._model, rid]
            stats = entry.get("stats")
            if stats is not None:
                for name, _, value in _REPLICA_GAUGES:
                    fams[name].add_metric(labels, float(value(stats)))
            est.add_metric(labels, float(entry.get("estimated_outstanding_tokens", 0.0)))
            if entry.get("stats_age_s") is not None:
                age.add_metric(labels, float(entry["stats_age_s"]))
        yield from fams.values()
        yield est
        yield age


class ServingMetrics:
    def __init__(self, model: str, replica_snapshot: Callable[[], dict] | None = None):
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kvray_requests", "HTTP requests by endpoint, status code and SLO class",
                                ["model", "endpoint", "status", "slo_class"], registry=r)
        self.ttft = Histogram("kvray_time_to_first_token_seconds", "Time to first token, at the router",
                              ["model", "slo_class"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kvray_time_per_output_token_seconds", "Mean time per output token after the first",
                              ["model", "slo_class"], buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("kvray_e2e_request_latency_seconds", "End-to-end request latency, at the router",
                             ["model", "slo_class"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kvray_prompt_tokens", "Prompt tokens of finished requests",
                                     ["model", "slo_class"], registry=r)
        self.generation_tokens = Counter("kvray_generation_tokens", "Generated tokens sent to clients",
                                         ["model", "slo_class"], registry=r)
        self.slo = Counter("kvray_slo_requests", "Finished requests by whether they met both TTFT and TPOT targets",
                           ["model", "slo_class", "attained"], registry=r)
        if replica_snapshot is not None:
            r.register(_ReplicaCollector(replica_snapshot, model))

    def request_done(self, *, endpoint: str, status: int | str, slo_class: str, prompt_tokens: int = 0,
                     completion_tokens: int = 0, ttft_s: float | None = None, tpot_s: float | None = None,
                     e2e_s: float | None = None, attained: bool | None = None) -> None:
        m, c = self.model, slo_class
        self.requests.labels(m, endpoint, str(status), c).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(m, c).inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.labels(m, c).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(m, c).observe(ttft_s)
        if tpot_s is not None:
            self.tpot.labels(m, c).observe(tpot_s)
        if e2e_s is not None:
            self.e2e.labels(m, c).observe(e2e_s)
        if attained is not None:
            self.slo.labels(m, c, "true" if attained else "false").inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
