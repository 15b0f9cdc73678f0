"""Step-time ground truth for the simulator, fitted from a GPU's engine steps.

``benchmarks/step_records.py`` records every step of a real engine (batched tokens, context
tokens, sequences, seconds) and fits, with ``kvray.step_cost.StepTimeModel``:

* ``linear``: one ``t = a + b*batched + c*context + d*seqs`` over all steps, the form every
  engine fits online and publishes (what the router, the deadline scheduler and the autoscaler
  predict with);
* ``split``: one such fit for decode-only steps (every sequence one token: the engine replays its
  decode CUDA graphs, bound by reading the weights) and one for steps that carry prompt tokens
  (the mixed graphs, bound by the matmuls), since one line through both is loose on a large model.

The simulator steps its replicas by the ground truth (``--true-model``); the engines inside it
still fit and publish the one linear model, as real engines do.
"""
from __future__ import annotations

import json

from kvray.step_cost import StepCoeffs, StepTimeModel, load_coeffs

Record = tuple[float, float, float, float]  # (batched tokens, context tokens, sequences, seconds)


def fit(records: list[Record]) -> tuple[StepCoeffs, dict]:
    """Least-squares coefficients (non-negative) of ``records`` and their relative errors. The
    data decide (a negligible pull towards the prior, which only splits what the records cannot
    tell apart: in decode-only steps, per-token and per-sequence cost)."""
    model = StepTimeModel(forgetting=1.0, prior_weight=1e-6)
    for b, c, s, t in records:
        model.observe(b, c, s, t)
    coeffs = model.coeffs
    errs = sorted(abs(coeffs.predict(b, c, s) - t) / t for b, c, s, t in records if t > 0)
    stats = {"steps": len(records), "median_rel_err": errs[len(errs) // 2] if errs else None,
             "p90_rel_err": errs[int(0.9 * len(errs))] if errs else None}
    return coeffs, stats


def is_decode(batched: float, seqs: float) -> bool:
    return batched <= seqs


class SplitStepModel:
    """Decode-only steps by ``decode``, steps with prompt tokens by ``mixed``."""

    def __init__(self, decode: StepCoeffs, mixed: StepCoeffs):
        self.decode = decode
        self.mixed = mixed

    def predict(self, batched: float, context: float, num_seqs: float) -> float:
        c = self.decode if is_decode(batched, num_seqs) else self.mixed
        return c.predict(batched, context, num_seqs)


def fit_split(records: list[Record]) -> dict:
    """``{"decode": {...}, "mixed": {...}}``: coefficients and errors of each kind of step, and the
    errors of the split model over all records."""
    out = {}
    parts = {"decode": [r for r in records if is_decode(r[0], r[2])],
             "mixed": [r for r in records if not is_decode(r[0], r[2])]}
    for kind, recs in parts.items():
        if recs:
            c, stats = fit(recs)
            out[kind] = {**dict(zip("abcd", c.as_tuple())), **stats}
    if len(out) == 2:
        model = split_model(out)
        errs = sorted(abs(model.predict(b, c, s) - t) / t for b, c, s, t in records if t > 0)
        out["median_rel_err"], out["p90_rel_err"] = errs[len(errs) // 2], errs[int(0.9 * len(errs))]
    return out


def split_model(split: dict) -> SplitStepModel:
    return SplitStepModel(*(StepCoeffs(*(float(split[k][x]) for x in "abcd")) for k in ("decode", "mixed")))


def true_model(path: str, kind: str):
    """The simulator's ground truth from a coefficients file: ``linear`` (its a, b, c, d) or
    ``split`` (its ``split`` fits; a ValueError when the file has none)."""
    if kind == "linear":
        return StepTimeModel.fixed_coeffs(load_coeffs(path))
    if kind != "split":
        raise ValueError(f"true model {kind!r}: must be 'linear' or 'split'")
    with open(path) as f:
        split = json.load(f).get("split") or {}
    if "decode" not in split or "mixed" not in split:
        raise ValueError(f"{path} has no split fit (decode and mixed): record it with benchmarks/step_records.py")
    return split_model(split)
