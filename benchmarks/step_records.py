"""Record real engine step times on the GPU and fit the router's step-time model to them.

  python benchmarks/step_records.py [--preset qwen3-0.6b] [--out step_coeffs.json]
Runs workload-A-like traffic (random prompt/output lengths) at several concurrencies, records every
step (batched tokens, context tokens, sequences, duration), fits t = a + b*batched + c*context +
d*seqs with kvray.step_cost.StepTimeModel (the model each engine fits online), and writes the coefficients (with the device
and the fit error) as JSON for `benchmarks/router_sim.py --coeffs`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]
from kvray import LLM, SamplingParams  # noqa: E402
from kvray.step_cost import StepTimeModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--out", default="step_coeffs.json")
    args = ap.parse_args()
    llm = LLM(f"kvray:{args.preset}", gpu_memory_utilization=0.9)
    eng = llm.engine
    records = []
    orig = eng.step

    def step():
        out = orig()
        r = eng.step_history[-1] if eng.step_history else None
        if r is not None and (not records or records[-1] is not r):
            records.append(r)
        return out

    eng.step = step
    rng = random.Random(0)
    llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    records.clear()
    for n in (8, 32, 128, 256):
        prompts = [[rng.randrange(1000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
        params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(50, 400), ignore_eos=True) for _ in range(n)]
        llm.generate(prompts, params, use_tqdm=False)
    model = StepTimeModel(forgetting=1.0)
    for r in records:
        model.observe(r.num_batched_tokens, r.num_context_tokens, r.num_seqs, r.duration_s)
    c = model.coeffs
    errs = [abs(c.predict(r.num_batched_tokens, r.num_context_tokens, r.num_seqs) - r.duration_s) / r.duration_s
            for r in records]
    errs.sort()
    result = {"a": c.a, "b": c.b, "c": c.c, "d": c.d, "device": torch.cuda.get_device_name(),
              "source": f"{len(records)} engine steps of {args.preset}, benchmarks/step_records.py, {time.strftime('%Y-%m-%d')}",
              "median_rel_err": errs[len(errs) // 2], "p90_rel_err": errs[int(0.9 * len(errs))]}
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
