"""``SLOHeadroomPolicy``: kvray's Serve custom autoscaling policy (it runs in the controller).

It scales on SLO headroom:

* up when the replicas' predicted SLO attainment drops below ``attainment_target``, when
  queued prefill tokens per replica exceed ``max_queued_prefill_tokens``, when KV usage exceeds
  ``max_kv_usage``, or when requests exceed ``target_ongoing_requests`` per replica (requests
  in the engines plus those queued at handles; Serve's own count also includes the Router's
  long-lived token channels, one per replica);
* down only with headroom on every signal (one replica fewer would still run under
  ``downscale_utilization`` of the target), held for ``downscale_delay_s`` (Serve resets the
  delay whenever one tick lacks headroom);
* otherwise it holds the current target (the band between the two is the hysteresis).

When the config leaves ``target_ongoing_requests`` at Serve's default, the target comes from the
``max_num_seqs`` that the replicas report (``kvray.platform.autoscaling.defaults``). The delays
stay Serve's: Serve applies ``upscale_delay_s`` / ``downscale_delay_s``, the factors and min/max
around every custom policy. The replicas' signal is ``kvray.platform.autoscaling.signal``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from kvray.platform.autoscaling.defaults import SERVE_DEFAULT_TARGET, derived_target, user_set
from kvray.platform.autoscaling.signal import (M_ATTAIN, M_GPUS, M_KV, M_MAX_NUM_SEQS, M_PREFILL, M_RUNNING, M_SLO_REQS,
                                               M_WAITING)

logger = logging.getLogger("ray.serve")  # in the controller: its log file

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
            target = float(getattr(config, "target_ongoing_requests", None) or SERVE_DEFAULT_TARGET)
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
