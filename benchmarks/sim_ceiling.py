"""Throughput ceiling of a simulated cluster: the router simulator's workload with the SLO
targets lifted, so that every request counts and only queueing shows.

Where TTFT p50 keeps growing with the rate (requests wait longer the later they arrive), the
replicas are saturated: no routing or scheduling policy can meet a 10 s TTFT there for most
requests, since the work arrives faster than the step-time model lets the replicas do it.

  python benchmarks/sim_ceiling.py --replicas 4 --rates 80 90 100 --arrivals gamma   # Llama-3.1-8B shape
  python benchmarks/sim_ceiling.py --replicas 4 --rates 300 340 380 --model qwen3-0.6b --step-tokens 8192
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]
from benchmarks.sim.cluster import POLICIES, SimConfig, run_point  # noqa: E402
from benchmarks.sim.replica import ReplicaConfig  # noqa: E402
from benchmarks.sim.workload import DEFAULT_TRACES, merged_trace, build_requests  # noqa: E402
from kvray.slo import SLOTarget  # noqa: E402
from kvray.step_cost import coeffs_file, load_coeffs  # noqa: E402

NO_SLO = {name: SLOTarget(name, ttft_ms=1e12, tpot_ms=1e12, priority=prio) for name, prio in
          (("interactive", 2.0), ("batch", 1.0))}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--rates", type=float, nargs="+", required=True, help="cluster arrival rates, req/s")
    ap.add_argument("--policy", default="least_load", choices=sorted(POLICIES))
    ap.add_argument("--model", default="llama-3.1-8b", help="step-time coefficients of kvray/step_coeffs/<model>.json")
    ap.add_argument("--coeffs", default=None, help="a coefficients JSON instead")
    ap.add_argument("--step-tokens", type=int, default=2048, help="max_num_batched_tokens (the engine's default)")
    ap.add_argument("--arrivals", choices=["gamma", "trace"], default="trace")
    ap.add_argument("--cv", type=float, default=2.0, help="gamma arrivals: coefficient of variation")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals per point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file for the points")
    a = ap.parse_args(argv)
    # No SLO and no queue bound: every request waits its turn, so queueing shows as TTFT.
    replica = ReplicaConfig(max_num_batched_tokens=a.step_tokens, enable_prefix_caching=False,
                            max_queued_requests=10**9, max_queued_prompt_tokens=10**12)
    cfg = SimConfig(replica=replica, true_coeffs=load_coeffs(a.coeffs or coeffs_file(a.model)))
    trace = merged_trace(DEFAULT_TRACES)
    points = []
    for rate in a.rates:
        reqs = build_requests(trace, rate, a.duration, seed=a.seed, cv=a.cv, arrivals=a.arrivals, classes=NO_SLO)
        t0 = time.perf_counter()
        res = run_point(a.policy, a.replicas, reqs, cfg, a.duration, seed=a.seed)
        p = {"rate": rate, "utilization": res["utilization"],
             "ttft_p50_s": {k: c["ttft_p50"] for k, c in res["classes"].items()},
             "ttft_p90_s": {k: c["ttft_p90"] for k, c in res["classes"].items()},
             "completed": {k: c["attainment"] for k, c in res["classes"].items()}}
        points.append(p)
        print(f"{rate:g} req/s on {a.replicas} replicas ({a.policy}): utilization {p['utilization']:.3f}, TTFT p50 "
              + ", ".join(f"{k} {v:.2f} s" for k, v in p["ttft_p50_s"].items())
              + f" (p90 {max(p['ttft_p90_s'].values()):.2f} s); wall {time.perf_counter() - t0:.0f} s", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "points": points}, f, indent=1)
    return points


if __name__ == "__main__":
    main()
