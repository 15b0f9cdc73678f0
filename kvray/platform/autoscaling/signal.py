"""The load signal each replica reports for kvray's autoscaling policy: its engine's queues, KV
usage and the predicted SLO attainment of its in-flight requests, as Serve custom metrics
(``LLMReplica.record_autoscaling_stats``; the controller receives them every
``metrics_interval_s``). Each in-flight request's TTFT/TPOT is predicted with the step-cost model
the engine fits and publishes (``kvray.step_cost``).
"""
from __future__ import annotations

import time

from kvray.step_cost import StepCoeffs, StepTimeModel, predict_attainment

# Custom metric names (``record_autoscaling_stats`` keys).
M_MAX_NUM_SEQS = "kvray_max_num_seqs"
M_RUNNING = "kvray_num_running"
M_WAITING = "kvray_num_waiting"
M_PREFILL = "kvray_queued_prefill_tokens"
M_KV = "kvray_kv_usage"
M_ATTAIN = "kvray_predicted_attainment"
M_SLO_REQS = "kvray_slo_requests"
M_GPUS = "kvray_gpus_per_replica"   # a replica of tensor_parallel_size N holds N GPUs


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
