"""The step-cost model: fitting it, and what it predicts (pure Python, fast)."""
import math
import random

import pytest

from kvray.step_cost import (
    DEFAULT_COEFFS, StepCoeffs, StepTimeModel, predict_ttft_s, predict_tpot_s, tpot_safe_chunk,
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


def test_refits_at_most_every_few_steps():
    m = StepTimeModel(min_samples=4, refit_every=10)
    steps = synthetic_steps(40)
    for b, c, n, t in steps[:4]:
        m.observe(b, c, n, t)
    first = m.coeffs  # fitted once there are min_samples steps
    assert first != DEFAULT_COEFFS
    for b, c, n, t in steps[4:13]:
        m.observe(b, c, n, t)
    assert m.coeffs is first  # 9 new steps: not yet
    m.observe(*steps[13])
    assert m.coeffs is not first


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
