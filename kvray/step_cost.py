"""The step-cost model: how long one engine step takes, and what follows from it for requests.
One home for the engine's deadline scheduler, the router, the autoscaler, the simulator and the
benchmarks (pure Python, a leaf module).

``StepTimeModel`` predicts the duration of one engine step::

    t = a + b * batched_tokens + c * context_tokens + d * num_seqs      (seconds)

and is fitted online by weighted least squares with optional exponential forgetting, from the
engine's own steps (the engine is its only fitter; it publishes the coefficients in its stats,
``kvray.records.EngineStats.step_coeffs``). The fit is regularised towards prior coefficients (a
ridge penalty worth ``prior_weight`` typical steps), so before enough data, or when the data
cannot separate two terms (pure decode steps have ``batched == num_seqs``), the prior decides
along the unidentified direction. Coefficients are constrained to be >= 0 (exact non-negative
least squares over the 4 variables, by enumerating active sets).

The prediction helpers (``tpot_safe_chunk``, ``predict_ttft_s``, ``predict_tpot_s``,
``predict_attainment``) assume a replica running chunked prefill: each step carries all running
decodes plus up to ``chunk`` prompt tokens.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from kvray.records import RequestSnapshot

# Feature scales: each coefficient is fitted as "seconds contributed at a typical magnitude".
_SCALES = (1.0, 1e3, 1e5, 1e2)


@dataclass(frozen=True)
class StepCoeffs:
    a: float  # seconds per step
    b: float  # seconds per batched (new) token
    c: float  # seconds per context token (sum of the scheduled sequences' context lengths)
    d: float  # seconds per scheduled sequence

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.a, self.b, self.c, self.d)

    def predict(self, batched: float, context: float, num_seqs: float) -> float:
        return self.a + self.b * batched + self.c * context + self.d * num_seqs


# The fallback prior for a model whose shape has no coefficients file (a rough H100 + Qwen3-0.6B guess).
DEFAULT_COEFFS = StepCoeffs(a=6e-3, b=4e-5, c=2e-8, d=3e-5)

# Per-model coefficients, one JSON file per model shape (``benchmarks/step_records.py`` writes
# them): ``a``..``d``, ``model`` (the file's name without .json), ``device``, ``source``, the fit
# errors, and ``shape``: the config fields of SHAPE_FIELDS that a model must match to use them.
COEFFS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_coeffs")
SHAPE_FIELDS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "dtype", "quant_method")


def load_coeffs(path: str) -> StepCoeffs:
    """Read ``{"a":..,"b":..,"c":..,"d":..}`` (extra keys such as ``device``/``source`` ignored)."""
    with open(path) as f:
        raw = json.load(f)
    raw = raw.get("coeffs", raw)
    try:
        return StepCoeffs(*(float(raw[k]) for k in "abcd"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: step-time coefficients need numbers a, b, c and d ({e})") from None


def known_models() -> list[str]:
    """Models with a coefficients file in COEFFS_DIR."""
    return sorted(f[:-5] for f in os.listdir(COEFFS_DIR) if f.endswith(".json"))


def coeffs_file(model: str) -> str:
    """The coefficients file of ``model`` (``llama-3.1-8b`` or ``kvray:llama-3.1-8b``)."""
    name = model.removeprefix("kvray:")
    if name not in known_models():
        raise ValueError(f"no step-time coefficients for model {model!r}; known: {', '.join(known_models())}")
    return os.path.join(COEFFS_DIR, name + ".json")


def coeffs_for_model(model: str) -> StepCoeffs:
    return load_coeffs(coeffs_file(model))


def shape_of(config, dtype: str) -> dict:
    """The SHAPE_FIELDS of a model config (a transformers config or anything with those
    attributes), with the dtype it runs in and its quantization method (None when unquantized)."""
    quant = getattr(config, "quantization_config", None)
    method = (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None))
    shape = {k: getattr(config, k, None) for k in SHAPE_FIELDS[:-2]}
    shape["architectures"] = list(shape["architectures"] or [])
    return {**shape, "dtype": str(dtype).removeprefix("torch."), "quant_method": method}


def prior_for_shape(shape: dict) -> StepCoeffs:
    """The coefficients of the known model with exactly this shape (``shape_of``), else DEFAULT_COEFFS."""
    for name in known_models():
        with open(os.path.join(COEFFS_DIR, name + ".json")) as f:
            meta = json.load(f)
        if meta.get("shape") == {k: shape.get(k) for k in SHAPE_FIELDS}:
            return load_coeffs(os.path.join(COEFFS_DIR, name + ".json"))
    return DEFAULT_COEFFS


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when (numerically) singular."""
    n = len(v)
    aug = [row[:] + [v[i]] for i, row in enumerate(m)]
    scale = max((abs(x) for row in m for x in row), default=0.0) or 1.0
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(aug[r][col]))
        if abs(aug[piv][col]) < 1e-12 * scale:
            return None
        aug[col], aug[piv] = aug[piv], aug[col]
        p = aug[col][col]
        for r in range(col + 1, n):
            f = aug[r][col] / p
            if f:
                for k in range(col, n + 1):
                    aug[r][k] -= f * aug[col][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (aug[r][n] - sum(aug[r][k] * x[k] for k in range(r + 1, n))) / aug[r][r]
    return x


def _nnls_quadratic(a: list[list[float]], g: list[float]) -> list[float] | None:
    """argmin_{x >= 0} x'Ax - 2g'x for a small positive-definite A (exact: every active set;
    the unconstrained solution first, which is the answer when it is non-negative)."""
    n = len(g)
    best, best_obj = None, math.inf
    for mask in range((1 << n) - 1, 0, -1):
        free = [i for i in range(n) if mask >> i & 1]
        sub = _solve([[a[i][j] for j in free] for i in free], [g[i] for i in free])
        if sub is None or any(x < 0 for x in sub):
            continue
        x = [0.0] * n
        for i, xi in zip(free, sub):
            x[i] = xi
        if mask == (1 << n) - 1:
            return x
        obj = sum(x[i] * a[i][j] * x[j] for i in range(n) for j in range(n)) - 2 * sum(g[i] * x[i] for i in range(n))
        if obj < best_obj:
            best, best_obj = x, obj
    return best if best is not None else [0.0] * n


ONLINE_FORGETTING = 0.999
ONLINE_REFIT_EVERY = 32


class StepTimeModel:
    """Online (weighted, forgetting) non-negative least-squares fit of the step time.

    ``observe(batched, context, num_seqs, duration_s, weight=1)`` adds a step; ``coeffs`` is the
    current fit (the prior until ``min_samples`` steps), refitted at most every ``refit_every``
    new steps (a fit solves up to 15 small systems: too much for every step of the hot loop);
    ``predict(batched, context, num_seqs)`` the predicted seconds. ``forgetting`` in (0, 1]
    multiplies the old statistics at each step (1.0: plain least squares). ``fixed=True``
    freezes the prior (a simulator's ground truth).
    """

    def __init__(self, prior: StepCoeffs = DEFAULT_COEFFS, *, forgetting: float = 1.0, prior_weight: float = 2.0,
                 min_samples: int = 8, refit_every: int = 1, fixed: bool = False):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError("forgetting must be in (0, 1]")
        self.prior = prior
        self.forgetting = forgetting
        self.prior_weight = prior_weight
        self.min_samples = min_samples
        self.fixed = fixed
        self._ata = [[0.0] * 4 for _ in range(4)]
        self._aty = [0.0] * 4
        self.num_samples = 0
        self.refit_every = max(1, refit_every)
        self._fitted_at = 0
        self._coeffs: StepCoeffs = prior

    @classmethod
    def fixed_coeffs(cls, coeffs: StepCoeffs) -> StepTimeModel:
        return cls(coeffs, fixed=True)

    @classmethod
    def online(cls, prior: StepCoeffs = DEFAULT_COEFFS) -> StepTimeModel:
        """The fit an engine keeps of its own steps (and publishes in ``EngineStats``): it
        follows the engine over its last few thousand steps, refitted every 32."""
        return cls(prior, forgetting=ONLINE_FORGETTING, refit_every=ONLINE_REFIT_EVERY)

    def observe(self, batched: float, context: float, num_seqs: float, duration_s: float, weight: float = 1.0) -> None:
        if self.fixed or not (duration_s >= 0 and math.isfinite(duration_s)) or weight <= 0:
            return
        z = (1.0, batched / _SCALES[1], context / _SCALES[2], num_seqs / _SCALES[3])
        lam = self.forgetting
        ata, aty = self._ata, self._aty
        for i in range(4):
            row = ata[i]
            wzi = weight * z[i]
            for j in range(4):
                row[j] = lam * row[j] + wzi * z[j]
            aty[i] = lam * aty[i] + wzi * duration_s
        self.num_samples += 1

    @property
    def coeffs(self) -> StepCoeffs:
        n = self.num_samples
        if n != self._fitted_at and (n - self._fitted_at >= self.refit_every or n == self.min_samples):
            self._coeffs = self._fit()
            self._fitted_at = n
        return self._coeffs

    def _fit(self) -> StepCoeffs:
        if self.num_samples < self.min_samples:
            return self.prior
        mu = self.prior_weight
        prior = [p * s for p, s in zip(self.prior.as_tuple(), _SCALES)]
        a = [[self._ata[i][j] + (mu if i == j else 0.0) for j in range(4)] for i in range(4)]
        g = [self._aty[i] + mu * prior[i] for i in range(4)]
        theta = _nnls_quadratic(a, g)
        if theta is None or not all(math.isfinite(t) for t in theta):
            return self.prior
        return StepCoeffs(*(t / s for t, s in zip(theta, _SCALES)))

    def predict(self, batched: float, context: float, num_seqs: float) -> float:
        return self.coeffs.predict(batched, context, num_seqs)


# ---- predictions for a candidate replica ----------------------------------------------------

def tpot_safe_chunk(model, num_decodes: int, context_tokens: float, tpot_s: float | None, max_chunk: int,
                    min_chunk: int = 64) -> int:
    """The largest prompt chunk per step that keeps a step with ``num_decodes`` decodes within
    ``tpot_s`` (what a deadline-aware replica schedules), in [min_chunk, max_chunk]."""
    if tpot_s is None:
        return max_chunk
    base = model.predict(num_decodes, context_tokens, num_decodes + 1)
    per_tok = max((model.predict(num_decodes + 1000, context_tokens + 1000, num_decodes + 1) - base) / 1000, 1e-9)
    n = int((tpot_s - base) / per_tok)
    return max(min(max_chunk, min_chunk), min(max_chunk, n))


def predict_ttft_s(model, prefill_ahead: float, uncached_tokens: float, num_decodes: int, context_tokens: float,
                   chunk: int, lookahead: int = 0) -> float:
    """Seconds until the first token of a request whose ``uncached_tokens`` prompt tokens are
    processed after ``prefill_ahead`` queued prompt tokens, ``chunk`` tokens per step alongside
    ``num_decodes`` running decodes (plus half of the step in progress, and ``lookahead`` steps
    the engine has scheduled already: with async scheduling, one, which the request cannot join)."""
    chunk = max(1, int(chunk))
    seqs = num_decodes + 1
    prefill_ahead = max(0.0, prefill_ahead)
    t = 0.5 * model.predict(num_decodes + min(chunk, prefill_ahead), context_tokens, seqs)
    for _ in range(lookahead):
        t += model.predict(num_decodes + min(chunk, prefill_ahead), context_tokens, seqs)
        prefill_ahead -= min(chunk, prefill_ahead)
    total = prefill_ahead + max(1.0, uncached_tokens)
    n_full = int(total // chunk)
    rem = total - n_full * chunk
    t += n_full * model.predict(num_decodes + chunk, context_tokens + chunk, seqs)
    if rem > 0:
        t += model.predict(num_decodes + rem, context_tokens + rem, seqs)
    return t


def predict_tpot_s(model, num_decodes: int, context_tokens: float, prefill_chunk: float) -> float:
    """Mean seconds per output token for the running decodes when each step also carries
    ``prefill_chunk`` prompt tokens (0 when no prompt work is queued)."""
    return model.predict(num_decodes + prefill_chunk, context_tokens + prefill_chunk, num_decodes + (prefill_chunk > 0))


# ---- predicted attainment of a replica's requests (the autoscaler's signal) ----------------------

def predict_attainment(model, reqs: list[RequestSnapshot], now: float, *, max_batched_tokens: int = 8192,
                       deadline_order: bool = False, context_tokens: float | None = None,
                       tpot_margin: float = 0.95) -> tuple[float, int]:
    """Share of the requests with an SLO target predicted to meet both TTFT and TPOT, and how
    many have a target. Waiting requests: time waited + predicted TTFT behind the prefill ahead
    of them (FCFS, or by deadline). Running ones: measured TTFT, and mean TPOT blending the
    measured past with the predicted decode step for the tokens still to come."""
    started = [r for r in reqs if r.first_token is not None]
    waiting = [r for r in reqs if r.first_token is None]
    decodes = len(started)
    context = context_tokens if context_tokens is not None else sum(r.prefill_left + r.num_output for r in reqs)
    targets = [r.tpot_s for r in reqs if r.tpot_s]
    guard = min(targets) * tpot_margin if targets and deadline_order else None
    chunk = tpot_safe_chunk(model, decodes, context, guard, max_batched_tokens)
    queued = sum(r.prefill_left for r in waiting)
    step = predict_tpot_s(model, max(1, decodes), context, chunk if queued else 0)
    waiting.sort(key=(lambda r: (r.deadline is None, r.deadline or 0.0, r.arrival)) if deadline_order
                 else (lambda r: r.arrival))
    ok = total = 0
    ahead = 0
    for r in waiting:
        if r.ttft_s or r.tpot_s:
            ttft = (now - r.arrival) + predict_ttft_s(model, ahead, r.prefill_left, decodes, context, chunk)
            total += 1
            ok += (not r.ttft_s or ttft <= r.ttft_s) and (not r.tpot_s or step <= r.tpot_s)
        ahead += r.prefill_left
    for r in started:
        if not (r.ttft_s or r.tpot_s):
            continue
        total += 1
        ttft_ok = not r.ttft_s or r.first_token - r.arrival <= r.ttft_s
        past = max(0, r.num_output - 1)
        rest = max(0, r.max_tokens - r.num_output)
        tpot = ((now - r.first_token) + step * rest) / (past + rest) if past + rest else 0.0
        ok += ttft_ok and (not r.tpot_s or tpot <= r.tpot_s)
    return (ok / total if total else 1.0), total
