"""StepTimeModel fitting and the router's SLOReplicaState bookkeeping (pure Python, fast)."""
import math
import random

import pytest

from kvray.router.latency_model import (
    DEFAULT_COEFFS, SLOReplicaState, StepCoeffs, StepTimeModel, predict_ttft_s, predict_tpot_s, tpot_safe_chunk,
)

TRUE = StepCoeffs(a=5e-3, b=3e-5, c=4e-8, d=5e-5)


def synthetic_steps(n, coeffs=TRUE, noise=0.03, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        seqs = rng.randint(1, 256)
        if rng.random() < 0.5:  # decode-only step: one token per sequence
            batched = seqs
        else:
            batched = seqs + rng.randint(16, 8192)
        context = seqs * rng.randint(100, 3000)
        t = coeffs.predict(batched, context, seqs) * math.exp(rng.gauss(0, noise))
        out.append((batched, context, seqs, t))
    return out


def test_fit_recovers_coefficients_from_noisy_steps():
    m = StepTimeModel()
    for batched, context, seqs, t in synthetic_steps(2000):
        m.observe(batched, context, seqs, t)
    got = m.coeffs
    assert got.a == pytest.approx(TRUE.a, rel=0.15)
    assert got.b == pytest.approx(TRUE.b, rel=0.05)
    assert got.c == pytest.approx(TRUE.c, rel=0.25)
    assert got.d == pytest.approx(TRUE.d, rel=0.25)
    errs = [abs(m.predict(b, c, s) - TRUE.predict(b, c, s)) / TRUE.predict(b, c, s)
            for b, c, s, _ in synthetic_steps(300, seed=1)]
    assert sum(errs) / len(errs) < 0.03


def test_prior_until_enough_samples_and_nonnegative():
    m = StepTimeModel(min_samples=8)
    assert m.coeffs == DEFAULT_COEFFS
    for batched, context, seqs, t in synthetic_steps(5):
        m.observe(batched, context, seqs, t)
    assert m.coeffs == DEFAULT_COEFFS
    # Data generated with no context cost and a negative-leaning noise: c must stay >= 0.
    m = StepTimeModel()
    for batched, context, seqs, t in synthetic_steps(500, coeffs=StepCoeffs(4e-3, 3e-5, 0.0, 2e-5), noise=0.1):
        m.observe(batched, context, seqs, t)
    assert all(x >= 0 for x in m.coeffs.as_tuple())


def test_ill_conditioned_data_leans_on_the_prior():
    # Only decode steps: batched == num_seqs, so b and d cannot be told apart.
    m = StepTimeModel()
    rng = random.Random(3)
    for _ in range(500):
        s = rng.randint(1, 200)
        m.observe(s, s * 1000, s, TRUE.predict(s, s * 1000, s))
    got = m.coeffs
    assert all(x >= 0 and math.isfinite(x) for x in got.as_tuple())
    assert got.b + got.d == pytest.approx(TRUE.b + TRUE.d, rel=0.1)  # the identified direction
    for s in (10, 100):
        assert m.predict(s, s * 1000, s) == pytest.approx(TRUE.predict(s, s * 1000, s), rel=0.05)
    # Constant features (a single repeated step) must not blow up either.
    m = StepTimeModel()
    for _ in range(50):
        m.observe(64, 64000, 64, 0.02)
    assert m.predict(64, 64000, 64) == pytest.approx(0.02, rel=0.05)


def test_forgetting_tracks_a_change():
    slow = StepCoeffs(2 * TRUE.a, 2 * TRUE.b, 2 * TRUE.c, 2 * TRUE.d)
    m = StepTimeModel(forgetting=0.98)
    for b, c, s, t in synthetic_steps(500, noise=0.0) + synthetic_steps(500, coeffs=slow, noise=0.0, seed=5):
        m.observe(b, c, s, t)
    assert m.coeffs.b == pytest.approx(slow.b, rel=0.05)


def test_observe_records_skips_seen_steps():
    m = StepTimeModel()
    recs = [(float(i), 0.01, 100, 1000, 4) for i in range(10)]
    assert m.observe_records(recs) == 10
    assert m.observe_records(recs + [(10.0, 0.01, 100, 1000, 4)]) == 1
    assert m.num_samples == 11


def test_prediction_helpers():
    m = StepTimeModel.fixed_coeffs(DEFAULT_COEFFS)
    t1 = predict_ttft_s(m, 0, 1000, 10, 10000, 8192)
    t2 = predict_ttft_s(m, 20000, 1000, 10, 10000, 8192)
    assert 0 < t1 < t2
    assert t2 == pytest.approx(21000 * DEFAULT_COEFFS.b, rel=0.3)
    chunk = tpot_safe_chunk(m, 20, 20000, 0.05, 8192)
    assert 64 <= chunk < 8192
    assert predict_tpot_s(m, 20, 20000, chunk) <= 0.05 + 1e-9
    assert tpot_safe_chunk(m, 20, 20000, None, 8192) == 8192
    assert tpot_safe_chunk(m, 2000, 20000, 0.05, 8192, min_chunk=64) == 64  # decodes alone exceed it


def test_replica_view_counts_between_polls():
    v = SLOReplicaState("r0")
    v.update_stats({"num_running": 2, "num_waiting": 1, "queued_prefill_tokens": 500, "tokens_in_flight": 3000,
                    "num_free_blocks": 100, "num_total_blocks": 200, "block_size": 16}, taken_at=1.0)
    v.on_dispatch("a", 800, 100, [1, 2, 3], 1.5, deadline=2.0, tpot_s=0.05, priority=2.0)
    assert v.num_requests == 4 and v.queued_prefill_tokens == 1300 and v.context_tokens == 3800
    assert v.free_blocks == 100 - 800 // 16
    assert v.min_tpot_s() == 0.05
    v.on_first_token("a", 1.7)
    assert v.queued_prefill_tokens == 500 and v.num_decoding == 3
    # A poll taken after the first token already contains it: the deltas before it are folded in.
    v.update_stats({"num_running": 3, "num_waiting": 0, "queued_prefill_tokens": 0, "tokens_in_flight": 3900},
                   taken_at=1.8)
    assert v.queued_prefill_tokens == 0 and v.num_requests == 3
    v.on_complete("a", 2.5, 50)
    assert v.num_ongoing == 0 and v.min_tpot_s() is None
    assert v.num_requests == 2 and v.context_tokens == 3900 - 850


def test_replica_view_prefix_lru_and_urgency():
    v = SLOReplicaState("r0", prefix_capacity=4)
    v.on_dispatch("x", 100, 10, [1, 2, 3], 0.0)
    assert v.prefix_hit_blocks([1, 2, 3, 9]) == 3
    v.on_dispatch("y", 100, 10, [7, 8], 0.0)
    assert len(v._prefix) == 4 and v.prefix_hit_blocks([1, 2]) == 0  # oldest hashes evicted
    v = SLOReplicaState("r1")
    v.on_dispatch("batch", 4000, 10, (), 0.0, deadline=10.0, priority=1.0)
    v.on_dispatch("inter", 1000, 10, (), 0.0, deadline=0.5, priority=2.0)
    # A new interactive request (deadline 0.6) waits only for the earlier interactive one...
    assert v.prefill_ahead_of(0.6, 2.0, 0.1) == 1000
    # ...a new batch request for both; an FCFS replica serves everything queued first.
    assert v.prefill_ahead_of(10.5, 1.0, 0.1) == 5000
    v.scheduler = "fcfs"
    assert v.prefill_ahead_of(0.6, 2.0, 0.1) == 5000
