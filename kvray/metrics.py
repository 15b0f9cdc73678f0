"""kvray's Prometheus series: their one definition, recorded through Ray's metrics API.

Why Ray's metrics API (``ray.util.metrics``): every process that records (each Router replica,
each LLMReplica) hands its series to the Ray metrics agent of its node, which exports them all
on the node's metrics port, each series labelled with the process that recorded it (``WorkerId``)
and with kvray's own ``replica`` tag. A scrape therefore sees every Router's counts, not those of
whichever Router answered it, and ``sum`` over the series counts every request once. Counters
live as long as their process; the agent receives new values every ``metrics_report_interval_ms``
(Ray's setting, 10 s by default; ``RAY_metrics_report_interval_ms`` in the environment of
``ray start`` / ``serve run`` changes it). Ray prefixes every name with ``ray_``.

``GET /metrics`` of the app serves the kvray series of its node's agent, with Serve's own
``ray_serve_num_http_requests_total`` (every HTTP request, also those whose client left before a
Router saw them). Names follow vLLM's where the meaning matches (``vllm:time_to_first_token_seconds`` is
``ray_kvray_time_to_first_token_seconds`` here), plus kvray's own: requests by status and SLO
class (429s included), SLO attainment per class, and actual over predicted TTFT.

``SERIES`` lists every exported name (the Grafana dashboard test checks its queries against it).
Recording goes through a ``sink`` (Ray's by default; tests pass an in-memory one).
"""
from __future__ import annotations

from typing import Any, Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                   7.5, 10.0, 20.0, 30.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                     1.0, 2.0)
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)

# name -> (kind, help, tag keys besides model and replica, histogram buckets)
_ROUTER = {
    "kvray_requests_total": ("counter", "HTTP requests answered, by endpoint, status code (499: the client left) "
                             "and SLO class", ("endpoint", "status", "slo_class"), None),
    "kvray_time_to_first_token_seconds": ("histogram", "Time to first token, from the Router's receipt",
                                          ("slo_class",), LATENCY_BUCKETS),
    "kvray_inter_token_latency_seconds": ("histogram", "Time between output tokens (a batch's gap over its tokens)",
                                          ("slo_class",), TOKEN_GAP_BUCKETS),
    "kvray_request_time_per_output_token_seconds": ("histogram", "Mean time per output token after the first, per "
                                                    "request", ("slo_class",), TOKEN_GAP_BUCKETS),
    "kvray_e2e_request_latency_seconds": ("histogram", "End-to-end latency of successful requests",
                                          ("slo_class",), LATENCY_BUCKETS),
    "kvray_prompt_tokens_total": ("counter", "Prompt tokens of requests that got a first token", ("slo_class",), None),
    "kvray_generation_tokens_total": ("counter", "Generated tokens sent to clients", ("slo_class",), None),
    "kvray_slo_requests_total": ("counter", "Successful requests by whether they met both TTFT and TPOT targets",
                                 ("slo_class", "attained"), None),
    "kvray_ttft_actual_over_predicted": ("histogram", "Measured TTFT over the routing policy's prediction "
                                         "(slo_aware)", ("slo_class",), RATIO_BUCKETS),
}
_REPLICA = {
    "kvray_num_requests_running": ("gauge", "Requests in the engine's running batch", (), None),
    "kvray_num_requests_waiting": ("gauge", "Requests waiting in the engine's queue", (), None),
    "kvray_kv_cache_usage_perc": ("gauge", "Used share of the KV cache (0 to 1)", (), None),
    "kvray_prefix_cache_hit_rate": ("gauge", "Share of prompt tokens found in the prefix cache", (), None),
    "kvray_queued_prefill_tokens": ("gauge", "Prompt tokens still to prefill", (), None),
    "kvray_request_queue_time_seconds": ("histogram", "Time from the engine's receipt to a request's first step",
                                         (), LATENCY_BUCKETS),
}
SERIES: dict[str, tuple] = {**_ROUTER, **_REPLICA}
BASE_TAGS = ("model", "replica")
RAY_PREFIX = "ray_"
# Ray Serve's own count of HTTP requests, passed through by ``GET /metrics``: its proxy (or, behind
# HAProxy, each Router's own HTTP server) counts every request, also those whose client left
# before any Router saw them (status 499), which ``kvray_requests_total`` cannot count.
SERVE_HTTP_REQUESTS = "ray_serve_num_http_requests_total"


def exported_names() -> set[str]:
    """Every series name a scrape shows (with Ray's prefix; histograms as _bucket/_count/_sum)."""
    out = {SERVE_HTTP_REQUESTS}
    for name, (kind, *_rest) in SERIES.items():
        full = RAY_PREFIX + name
        out |= {full + s for s in ("_bucket", "_count", "_sum")} if kind == "histogram" else {full}
    return out


class RaySink:
    """Makes ``ray.util.metrics`` objects (imported here only: the engine never loads Ray)."""

    def make(self, kind: str, name: str, doc: str, tag_keys: tuple[str, ...], buckets, default_tags: dict):
        from ray.util import metrics

        if kind == "counter":
            m = metrics.Counter(name, doc, tag_keys=tag_keys)
        elif kind == "gauge":
            m = metrics.Gauge(name, doc, tag_keys=tag_keys)
        else:
            m = metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=tag_keys)
        m.set_default_tags(default_tags)
        return m


class _Series:
    def __init__(self, sink, table: dict, model: str, replica: str):
        self.sink = sink
        tags = {"model": model, "replica": replica}
        self._m = {name: sink.make(kind, name, doc, BASE_TAGS + keys, buckets, tags)
                   for name, (kind, doc, keys, buckets) in table.items()}

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value:
            self._m[name].inc(value, tags=tags)

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._m[name].observe(value, tags=tags)

    def set(self, name: str, value: float) -> None:
        self._m[name].set(value)


class RouterMetrics(_Series):
    """The request-level series, recorded by the Router replica that answered the request."""

    def __init__(self, model: str, replica: str, sink=None):
        super().__init__(sink or RaySink(), _ROUTER, model, replica)

    def request_done(self, *, endpoint: str, status: int | str, slo_class: str, prompt_tokens: int = 0,
                     completion_tokens: int = 0, ttft_s: float | None = None, tpot_s: float | None = None,
                     e2e_s: float | None = None, attained: bool | None = None,
                     predicted_ttft_s: float | None = None) -> None:
        c = slo_class
        self.inc("kvray_requests_total", endpoint=endpoint, status=str(status), slo_class=c)
        self.inc("kvray_prompt_tokens_total", prompt_tokens, slo_class=c)
        self.inc("kvray_generation_tokens_total", completion_tokens, slo_class=c)
        if ttft_s is not None:
            self.observe("kvray_time_to_first_token_seconds", ttft_s, slo_class=c)
            if predicted_ttft_s:
                self.observe("kvray_ttft_actual_over_predicted", ttft_s / predicted_ttft_s, slo_class=c)
        if tpot_s is not None:
            self.observe("kvray_request_time_per_output_token_seconds", tpot_s, slo_class=c)
        if e2e_s is not None:
            self.observe("kvray_e2e_request_latency_seconds", e2e_s, slo_class=c)
        if attained is not None:
            self.inc("kvray_slo_requests_total", slo_class=c, attained="true" if attained else "false")

    def token_gap(self, gap_s: float, num_tokens: int, slo_class: str) -> None:
        self.observe("kvray_inter_token_latency_seconds", gap_s / max(1, num_tokens), slo_class=slo_class)


class ReplicaMetrics(_Series):
    """The engine's gauges, set by the LLMReplica that runs it (one series per replica)."""

    def __init__(self, model: str, replica: str, sink=None):
        super().__init__(sink or RaySink(), _REPLICA, model, replica)

    def update(self, stats) -> None:
        """From the engine's ``EngineStats``."""
        self.set("kvray_num_requests_running", stats.num_running)
        self.set("kvray_num_requests_waiting", stats.num_waiting)
        self.set("kvray_kv_cache_usage_perc", stats.kv_usage)
        self.set("kvray_prefix_cache_hit_rate", stats.prefix_hit_rate)
        self.set("kvray_queued_prefill_tokens", stats.queued_prefill_tokens)

    def queue_time(self, seconds: float) -> None:
        self.observe("kvray_request_queue_time_seconds", seconds)


class MemorySink:
    """An in-memory sink (tests, and processes outside Ray): ``values[(name, tags)]`` holds a
    counter's total, a gauge's value, or a histogram's list of observations."""

    def __init__(self):
        self.values: dict[tuple[str, tuple], Any] = {}

    def make(self, kind, name, doc, tag_keys, buckets, default_tags):
        sink = self

        class _M:
            def _key(self, tags):
                merged = {**default_tags, **(tags or {})}
                unknown = set(merged) - set(tag_keys)
                if unknown:
                    raise ValueError(f"{name}: unknown tags {unknown}")
                return name, tuple(sorted(merged.items()))

            def inc(self, value=1.0, tags=None):
                k = self._key(tags)
                sink.values[k] = sink.values.get(k, 0.0) + value

            def set(self, value, tags=None):
                sink.values[self._key(tags)] = value

            def observe(self, value, tags=None):
                sink.values.setdefault(self._key(tags), []).append(value)

        return _M()

    def total(self, name: str, **tags: str) -> float:
        """Sum of a counter over the series whose tags include ``tags``."""
        return sum(v for (n, t), v in self.values.items() if n == name and set(tags.items()) <= set(t))

    def observations(self, name: str, **tags: str) -> list[float]:
        return [x for (n, t), v in self.values.items() if n == name and set(tags.items()) <= set(t) for x in v]


# ---- the scrape ---------------------------------------------------------------------------------
_agent_url: str | None = None


def node_agent_url() -> str:
    """This node's Ray metrics endpoint (``http://<node ip>:<metrics export port>/metrics``)."""
    global _agent_url
    if _agent_url is None:
        import ray

        me = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == me)
        _agent_url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return _agent_url


def kvray_series(text: str) -> str:
    """The kvray series of a Prometheus text exposition, and Serve's HTTP request count (with
    their HELP and TYPE lines)."""
    keep = tuple(f"{head}{name}" for name in (RAY_PREFIX + "kvray_", SERVE_HTTP_REQUESTS + "{",
                                               SERVE_HTTP_REQUESTS + " ")
                 for head in ("", "# HELP ", "# TYPE "))
    return "".join(line + "\n" for line in text.splitlines() if line.startswith(keep))


def scrape_node(fetch: Callable[[str], str] | None = None) -> str:
    """What ``GET /metrics`` of the app answers: the kvray series of this node's Ray metrics
    endpoint, i.e. those of every kvray process on the node (all Routers, all replicas)."""
    if fetch is None:
        import urllib.request

        def fetch(url: str) -> str:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
    return kvray_series(fetch(node_agent_url()))
