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


def test_ttft_counts_the_steps_an_async_engine_scheduled_already():
    m = StepTimeModel.fixed_coeffs(StepCoeffs(a=0.01, b=1e-5, c=0.0, d=0.0))
    # idle queue: the lookahead step carries only the decodes (10 ms + 10 tokens)
    assert predict_ttft_s(m, 0, 500, 10, 0, 1000, lookahead=1) - predict_ttft_s(m, 0, 500, 10, 0, 1000) == \
        pytest.approx(0.01 + 10 * 1e-5)
    # a queue of 3,000 prompt tokens: the lookahead step takes a chunk of it, so the rest takes one
    # step less, and the total is the same work plus the one step's fixed cost
    assert predict_ttft_s(m, 3000, 500, 10, 0, 1000, lookahead=1) == pytest.approx(
        0.5 * (0.01 + 1010e-5) + (0.01 + 1010e-5) * 3 + (0.01 + 510e-5))


# ---- per-model coefficients (kvray/step_coeffs) ----------------------------------------------

def test_every_coefficients_file_is_complete_and_names_its_model():
    import json
    import os

    from kvray.step_cost import COEFFS_DIR, SHAPE_FIELDS, coeffs_for_model, known_models
    assert {"qwen3-0.6b", "llama-3.1-8b"} <= set(known_models())
    for name in known_models():
        meta = json.load(open(os.path.join(COEFFS_DIR, name + ".json")))
        assert meta["model"] == name and meta["device"] and meta["source"]
        assert set(meta["shape"]) == set(SHAPE_FIELDS)
        c = coeffs_for_model(f"kvray:{name}")
        assert all(x >= 0 for x in c.as_tuple()) and c.a > 0 and c.b > 0


def test_unknown_model_and_bad_file_are_value_errors(tmp_path):
    from kvray.step_cost import coeffs_for_model, load_coeffs
    with pytest.raises(ValueError, match="no step-time coefficients for model 'nope'; known: .*llama-3.1-8b"):
        coeffs_for_model("nope")
    bad = tmp_path / "c.json"
    bad.write_text('{"a": 1, "b": 2, "c": 3}')
    with pytest.raises(ValueError, match="numbers a, b, c and d"):
        load_coeffs(str(bad))


def test_prior_follows_the_model_shape_dtype_and_quantization():
    from kvray.replica.models.presets import hf_config
    from kvray.step_cost import coeffs_for_model, prior_for_shape, shape_of
    cfg = hf_config("llama-3.1-8b")
    assert prior_for_shape(shape_of(cfg, "torch.bfloat16")) == coeffs_for_model("llama-3.1-8b")
    assert prior_for_shape(shape_of(hf_config("qwen3-0.6b"), "bfloat16")) == coeffs_for_model("qwen3-0.6b")
    # the same shape in another dtype, quantized, or a shape without a file: the generic prior
    assert prior_for_shape(shape_of(cfg, "torch.float32")) == DEFAULT_COEFFS
    cfg.quantization_config = {"quant_method": "fp8"}
    assert prior_for_shape(shape_of(cfg, "torch.bfloat16")) == DEFAULT_COEFFS
    assert prior_for_shape(shape_of(hf_config("tiny-qwen3"), "torch.float32")) == DEFAULT_COEFFS


def test_the_engine_starts_from_its_shapes_coefficients(tmp_path, monkeypatch):
    """An engine whose model shape has a coefficients file fits its steps from that prior."""
    import json

    from kvray import LLM
    from kvray import step_cost
    from kvray.replica.models.presets import hf_config
    shape = step_cost.shape_of(hf_config("tiny-qwen3"), "float32")
    (tmp_path / "tiny-qwen3.json").write_text(json.dumps(
        {"model": "tiny-qwen3", "a": 0.011, "b": 2e-5, "c": 3e-8, "d": 1e-6, "device": "test", "source": "test",
         "shape": shape}))
    monkeypatch.setattr(step_cost, "COEFFS_DIR", str(tmp_path))
    llm = LLM("kvray:tiny-qwen3", max_model_len=256, num_kv_blocks=64, dtype="float32", device="cpu")
    assert llm.engine.step_cost.prior == StepCoeffs(0.011, 2e-5, 3e-8, 1e-6)
