"""Autoscaling that understands LLM load: defaults derived from the engine, kvray's Serve policy,
and the load signal the replicas report for it.

How Serve 2.60 merges options (checked in ``ray/serve/_private/application_state.py``): a key
under ``deployments:`` in the config file replaces the code's value *as a whole*. An
``autoscaling_config`` written in the file therefore drops every code default, and the keys it
leaves out take Serve's defaults (``target_ongoing_requests: 2``, ``upscale_delay_s: 30``,
``downscale_delay_s: 600``), not the code's. A code-side ``autoscaling_config`` would also turn
a file's fixed ``num_replicas`` into autoscaling. So kvray applies its defaults where the merged
config is visible:

* ``apply_autoscaling_defaults`` / ``fill_serve_config``: for Python callers (``make_app``
  overrides) and for writing a config file with every value spelled out
  (``python -m kvray.platform.autoscaling CONFIG.yaml``). Keys the user set always win.
* ``SLOHeadroomPolicy`` (in the controller): when the file leaves ``target_ongoing_requests``
  at Serve's default, it uses the value derived from the ``max_num_seqs`` that the replicas
  report. The delays stay Serve's: Serve applies ``upscale_delay_s`` /
  ``downscale_delay_s``, the factors and min/max around every custom policy.

The policy scales on SLO headroom:

* up when the replicas' predicted SLO attainment drops below ``attainment_target``, when
  queued prefill tokens per replica exceed ``max_queued_prefill_tokens``, when KV usage exceeds
  ``max_kv_usage``, or when requests exceed ``target_ongoing_requests`` per replica (requests
  in the engines plus those queued at handles; Serve's own count also includes the Router's
  long-lived token channels, one per replica);
* down only with headroom on every signal (one replica fewer would still run under
  ``downscale_utilization`` of the target), held for ``downscale_delay_s`` (Serve resets the
  delay whenever one tick lacks headroom);
* otherwise it holds the current target (the band between the two is the hysteresis).

Replicas feed it through ``record_autoscaling_stats`` (Serve's custom-metrics hook; the
controller receives the values every ``metrics_interval_s``); ``replica_autoscaling_stats``
computes them from the engine, predicting each in-flight request's TTFT/TPOT with the step-cost
model the engine fits and publishes (``kvray.step_cost``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from kvray.step_cost import StepCoeffs, StepTimeModel, predict_attainment

logger = logging.getLogger("ray.serve")  # in the controller: its log file

POLICY_PATH = "kvray.platform.autoscaling:SLOHeadroomPolicy"
REPLICA_DEPLOYMENT = "LLMReplica"

# Derived defaults (see ``derive_autoscaling_defaults``).
TARGET_FRACTION = 0.75        # target ongoing requests = this share of the engine's batch slots
UPSCALE_DELAY_S = 10.0        # a burst must last this long before a (slow, costly) replica starts
DOWNSCALE_DELAY_S = 300.0     # headroom must last this long before a warm replica is released
LOOK_BACK_PERIOD_S = 15.0     # window Serve averages ongoing requests over
_SERVE_DEFAULT_TARGET = 2.0   # AutoscalingConfig.target_ongoing_requests default in Serve 2.60

# Custom metric names (``record_autoscaling_stats`` keys).
M_MAX_NUM_SEQS = "kvray_max_num_seqs"
M_RUNNING = "kvray_num_running"
M_WAITING = "kvray_num_waiting"
M_PREFILL = "kvray_queued_prefill_tokens"
M_KV = "kvray_kv_usage"
M_ATTAIN = "kvray_predicted_attainment"
M_SLO_REQS = "kvray_slo_requests"
M_GPUS = "kvray_gpus_per_replica"   # a replica of tensor_parallel_size N holds N GPUs


# ---- defaults ----------------------------------------------------------------------------------

def derived_target(max_num_seqs: int) -> int:
    """Ongoing requests per replica to aim for: most of the engine's batch slots, so Serve adds
    a replica before requests queue inside the engine (``max_ongoing_requests`` is 2x)."""
    return max(1, round(TARGET_FRACTION * int(max_num_seqs)))


def derive_autoscaling_defaults(max_num_seqs: int) -> dict[str, float]:
    return {"target_ongoing_requests": derived_target(max_num_seqs), "upscale_delay_s": UPSCALE_DELAY_S,
            "downscale_delay_s": DOWNSCALE_DELAY_S, "look_back_period_s": LOOK_BACK_PERIOD_S}


def apply_autoscaling_defaults(autoscaling_config, max_num_seqs: int) -> dict | None:
    """The user's autoscaling_config (dict or AutoscalingConfig; only the keys they set count)
    over kvray's derived defaults. None stays None: fixed ``num_replicas``, nothing to scale."""
    if autoscaling_config is None:
        return None
    if not isinstance(autoscaling_config, dict):
        autoscaling_config = autoscaling_config.model_dump(exclude_unset=True)
    return {**derive_autoscaling_defaults(max_num_seqs), **autoscaling_config}


def fill_serve_config(config: dict) -> dict:
    """A Serve config file (dict) with kvray's defaults written into each kvray application's
    LLMReplica ``autoscaling_config`` (``max_num_seqs`` from its args; keys already set win)."""
    from kvray.app_config import parse_args

    out = dict(config)
    apps = []
    for app in config.get("applications", []):
        app = dict(app)
        if str(app.get("import_path", "")).startswith("kvray.platform"):
            seqs = parse_args(app.get("args") or {}).engine.max_num_seqs
            deps = []
            for d in app.get("deployments", []):
                if d.get("name") == REPLICA_DEPLOYMENT and d.get("autoscaling_config") is not None:
                    d = {**d, "autoscaling_config": apply_autoscaling_defaults(d["autoscaling_config"], seqs)}
                deps.append(d)
            app["deployments"] = deps
        apps.append(app)
    out["applications"] = apps
    return out


def user_set(config, name: str) -> bool:
    """Whether the Serve config set ``name``: a value other than Serve's default. (Which keys a
    file gave does not survive the trip to the controller: the deployment config is rebuilt
    from a full dump. So setting Serve's default value itself reads as unset.)"""
    return getattr(config, name) != type(config).model_fields[name].default


# ---- the policy (runs in the Serve controller) -------------------------------------------------

@dataclass
class Signals:
    """What the policy sees in one tick (all per running replica unless named total)."""

    replicas: int                  # running replicas (>= 1)
    gpus_per_replica: float        # what one replica holds (its tensor_parallel_size; 0 on CPUs)
    target: float                  # target requests per replica
    total_requests: float          # requests in the engines + queued at handles (look-back average)
    queued_prefill: float          # mean queued prefill tokens per replica
    kv_usage: float                # max KV-cache usage over replicas, 0..1
    attainment: float | None       # predicted SLO attainment of in-flight requests (None: no data)
    slo_requests: float            # in-flight requests with SLO targets (all replicas)


class SLOHeadroomPolicy:
    """Serve custom autoscaling policy (``policy_function: kvray.platform.autoscaling:SLOHeadroomPolicy``;
    Serve builds it once with ``policy_kwargs`` and calls it every control-loop tick with an
    ``AutoscalingContext``; it returns ``(desired_replicas, policy_state)``)."""

    def __init__(self, attainment_target: float = 0.9, max_queued_prefill_tokens: float = 4096,
                 max_kv_usage: float = 0.95, downscale_utilization: float = 0.7, min_slo_requests: int = 4,
                 max_num_seqs: int | None = None, stale_after_s: float = 30.0):
        if not 0 < attainment_target <= 1 or not 0 < downscale_utilization <= 1:
            raise ValueError("attainment_target and downscale_utilization must be in (0, 1]")
        if max_queued_prefill_tokens <= 0 or not 0 < max_kv_usage <= 1:
            raise ValueError("max_queued_prefill_tokens must be > 0 and max_kv_usage in (0, 1]")
        self.attainment_target = attainment_target
        self.max_queued_prefill_tokens = float(max_queued_prefill_tokens)
        self.max_kv_usage = max_kv_usage
        self.downscale_utilization = downscale_utilization
        self.min_slo_requests = min_slo_requests
        self.max_num_seqs = max_num_seqs   # fallback when replicas do not report it
        self.stale_after_s = stale_after_s

    def __call__(self, ctx) -> tuple[int, dict]:
        state = {k: v for k, v in (ctx.policy_state or {}).items() if not k.startswith("kvray")}
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        current = ctx.target_num_replicas
        if ctx.current_num_replicas == 0:  # nothing runs yet (Serve's cold start handles 0 -> 1)
            return _clamp(current, lo, hi), state
        sig = self.signals(ctx)
        desired, reason = self.decide(sig, current)
        out = _clamp(desired, lo, hi)
        state["kvray"] = {"reason": reason, "desired": out, "gpus": out * sig.gpus_per_replica, "target": sig.target,
                          "requests": sig.total_requests, "attainment": sig.attainment,
                          "queued_prefill": sig.queued_prefill}
        intent = (out, reason) if out != current else None
        if intent != getattr(self, "_intent", None):  # each change of intent once (and its end)
            self._intent = intent
            logger.info("kvray autoscaling %s: %s -> %s replicas, %g GPUs (%s; requests %.1f, target %.0f/replica, "
                        "attainment %s, queued prefill %.0f/replica, kv %.2f)", ctx.deployment_name, current, out,
                        out * sig.gpus_per_replica, reason, sig.total_requests, sig.target,
                        "n/a" if sig.attainment is None else f"{sig.attainment:.2f}", sig.queued_prefill, sig.kv_usage)
        return out, state

    # ---- signals ---------------------------------------------------------------------------
    def signals(self, ctx) -> Signals:
        n = max(1, ctx.current_num_replicas)
        now = ctx.current_time or time.time()
        latest = _latest_metrics(ctx, now - self.stale_after_s)
        seqs = sorted(v for v in latest.get(M_MAX_NUM_SEQS, {}).values() if v > 0)
        if seqs:  # remembered: a gap in the reports must not swing the target
            self._seqs = int(seqs[len(seqs) // 2])
        seqs_known = getattr(self, "_seqs", None) or self.max_num_seqs
        config = ctx.config
        if (config is not None and user_set(config, "target_ongoing_requests")) or not seqs_known:
            target = float(getattr(config, "target_ongoing_requests", None) or _SERVE_DEFAULT_TARGET)
        else:
            target = float(derived_target(seqs_known))
        prefill = latest.get(M_PREFILL, {})
        kv = latest.get(M_KV, {})
        att, reqs = latest.get(M_ATTAIN, {}), latest.get(M_SLO_REQS, {})
        weight = sum(reqs.get(r, 0.0) for r in att)
        attainment = (sum(att[r] * reqs.get(r, 0.0) for r in att) / weight) if weight > 0 else None
        return Signals(replicas=n, gpus_per_replica=max(latest.get(M_GPUS, {}).values(), default=0.0),
                       target=target, total_requests=self._requests(ctx, now),
                       queued_prefill=sum(prefill.values()) / n, kv_usage=max(kv.values(), default=0.0),
                       attainment=attainment, slo_requests=weight)

    def _requests(self, ctx, now: float) -> float:
        """Requests in the engines (look-back average) plus those queued at handles. Serve's own
        ``total_num_requests`` also counts every open call to a replica, such as the Router's
        long-lived per-replica token channels; it is the fallback when replicas do not report."""
        agg = _latest_metrics(ctx, now - self.stale_after_s, aggregated_first=True)
        running, waiting = agg.get(M_RUNNING, {}), agg.get(M_WAITING, {})
        if not running:
            return float(ctx.total_num_requests or 0.0)
        engine = sum(running.values()) + sum(waiting.get(r, 0.0) for r in running)
        return engine + float(ctx.total_queued_requests or 0.0)

    # ---- the decision ----------------------------------------------------------------------
    def decide(self, s: Signals, current: int) -> tuple[int, str]:
        """Desired replicas from the signals and the current target (before min/max)."""
        n = s.replicas
        wants = {"load": math.ceil(s.total_requests / s.target - 1e-9)}
        if s.queued_prefill > self.max_queued_prefill_tokens:
            wants["prefill"] = math.ceil(n * s.queued_prefill / self.max_queued_prefill_tokens)
        if s.kv_usage > self.max_kv_usage:
            wants["kv"] = n + 1
        slo_known = s.attainment is not None and s.slo_requests >= self.min_slo_requests
        if slo_known and s.attainment < self.attainment_target:
            short = (self.attainment_target - s.attainment) / self.attainment_target
            wants["attainment"] = n + max(1, math.ceil(n * short))
        reason, up = max(wants.items(), key=lambda kv: kv[1])
        if up > current:
            return up, f"up: {reason}"
        if len(wants) > 1 or current < 1:
            return current, "hold"
        if current == 1:  # to zero (only where min_replicas is 0): nothing in flight at all
            idle = s.total_requests <= 0 and s.queued_prefill <= 0 and s.slo_requests <= 0
            return (0, "down: idle") if idle else (current, "hold")
        # headroom: one replica fewer would still run well under target, prefill queues short,
        # and (when known) the SLO predicted met
        fewer = current - 1
        util = s.total_requests / (s.target * fewer)
        prefill_after = s.queued_prefill * n / fewer
        slo_ok = s.attainment is None or s.attainment >= self.attainment_target  # few misses still veto
        if util <= self.downscale_utilization and prefill_after <= 0.5 * self.max_queued_prefill_tokens and slo_ok:
            need = math.ceil(s.total_requests / (s.target * self.downscale_utilization) - 1e-9)
            return max(1, min(fewer, need)), "down: headroom"
        return current, "hold"


def _clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(x)))


def _last(series, not_before: float) -> float | None:
    """Newest value of a Serve TimeSeries (list of TimeStampedValue), or a plain number."""
    if series is None:
        return None
    if isinstance(series, (int, float)):
        return float(series)
    if not len(series):
        return None
    p = series[-1]
    ts, val = (p.timestamp, p.value) if hasattr(p, "value") else (p[0], p[1])
    return float(val) if ts >= not_before else None


def _latest_metrics(ctx, not_before: float, aggregated_first: bool = False) -> dict[str, dict[Any, float]]:
    """{metric: {replica: value}} over the running replicas: the newest raw sample (or first the
    look-back aggregate), the other source where the first has none."""
    running = set(ctx.running_replicas or [])
    out: dict[str, dict[Any, float]] = {}
    sources = (ctx.raw_metrics, ctx.aggregated_metrics)
    for source in (sources[::-1] if aggregated_first else sources):
        for name, per_replica in (source or {}).items():
            if not name.startswith("kvray_"):
                continue
            dst = out.setdefault(name, {})
            for rid, series in per_replica.items():
                if rid in dst or (running and rid not in running):
                    continue
                v = _last(series, not_before)
                if v is not None and math.isfinite(v):
                    dst[rid] = v
    return out


# ---- the replica side --------------------------------------------------------------------------

def replica_autoscaling_stats(engine, num_gpus: int = 0) -> dict[str, float]:
    """``LLMReplica.record_autoscaling_stats``: the kvray_* metrics of one replica (numbers only,
    as Serve requires), from its engine's stats and in-flight requests; ``num_gpus``: the GPUs the
    replica holds."""
    s = engine.stats()
    model = StepTimeModel.fixed_coeffs(StepCoeffs(*s.step_coeffs)) if s.step_coeffs else StepTimeModel()
    attainment, n = predict_attainment(model, engine.request_snapshots(), time.monotonic(),
                                       max_batched_tokens=s.max_num_batched_tokens,
                                       deadline_order=s.scheduling_policy == "deadline",
                                       context_tokens=s.tokens_in_flight)
    return {M_MAX_NUM_SEQS: float(s.max_num_seqs), M_RUNNING: float(s.num_running), M_WAITING: float(s.num_waiting),
            M_PREFILL: float(s.queued_prefill_tokens), M_KV: s.kv_usage, M_ATTAIN: attainment,
            M_SLO_REQS: float(n), M_GPUS: float(num_gpus)}


def pin_replica_gpus() -> list[str]:
    """Call first in a replica's ``__init__``: a replica sees exactly the GPUs Ray assigned it.
    Ray 2.60 sets CUDA_VISIBLE_DEVICES only for actors holding GPUs, so one that asked for none
    would see (and could allocate on) every GPU of its node; hide them. Returns the GPU ids."""
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return []  # not a Ray actor (a driver, a test): leave the process alone
        ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    except Exception:
        return []
    if not ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return ids


def check_replica_gpus(gpu_ids: list[str], tensor_parallel_size: int) -> None:
    """A replica's GPUs must be its tensor-parallel ranks' (one each): a ValueError at startup
    otherwise (``kvray check-config`` finds the same in a config file before deploying it)."""
    n = len(gpu_ids)
    if n and n != tensor_parallel_size:
        raise ValueError(f"this replica holds {n} GPU(s) (Ray assigned {', '.join(gpu_ids)}) but "
                         f"engine.tensor_parallel_size is {tensor_parallel_size}: set the LLMReplica deployment's "
                         f"ray_actor_options.num_gpus to {tensor_parallel_size} (one GPU per rank)")


def main(argv: list[str] | None = None) -> int:
    """``python -m kvray.platform.autoscaling CONFIG.yaml``: print the config with kvray's
    autoscaling defaults written out (what the LLMReplica deployment will run with)."""
    import sys

    import yaml

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kvray.platform.autoscaling SERVE_CONFIG.yaml", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        print(yaml.safe_dump(fill_serve_config(yaml.safe_load(f)), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
