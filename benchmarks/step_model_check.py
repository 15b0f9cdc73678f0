"""What a step-time model predicts for figures measured on a GPU: a step's time, the offline
workload B, and the conversation replay (the simulator, one replica, FCFS, as the engine runs it).

  python benchmarks/step_model_check.py --model llama-3.1-8b
  python benchmarks/step_model_check.py --coeffs OUT/step_coeffs_llama-3.1-8b.json

Known for Llama-3.1-8B on one H100 (issue 27): a step of 192 decodes (1,000-token contexts) and a
512-token chunk takes 27.7 ms; workload B (256 x 512 prompt + 256 output tokens) runs at 8,812
output tok/s; the conversation replay (Poisson, prompts <= 4,096, outputs <= 1,024 tokens) has TPOT
p50 11.6 ms at 10 req/s and 22 ms at 20 req/s, TTFT p99 733 ms at 20 req/s, goodput about 20 req/s.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]

from benchmarks.sim.cluster import Cluster, SimConfig, run_point  # noqa: E402
from benchmarks.sim.replica import ReplicaConfig  # noqa: E402
from benchmarks.sim.workload import CLASSES, DEFAULT_TRACES, SimRequest, build_requests, merged_trace  # noqa: E402
from kvray.step_cost import coeffs_file, load_coeffs  # noqa: E402


def offline_b(cfg: SimConfig) -> float:
    """Output tok/s of workload B, every request at once."""
    reqs = [SimRequest(i, 0.0, 512, 256, 256, CLASSES["batch"], "code") for i in range(256)]
    cl = Cluster("least_load", 1, reqs, cfg)
    cl.run()
    return 256 * 256 / max(r.finished for r in cl.records)


def replay(cfg: SimConfig, conv_trace: str, rate: float, duration_s: float) -> dict:
    reqs = build_requests(merged_trace({"conv": conv_trace}), rate, duration_s, seed=1, cv=1.0,
                          max_model_len=cfg.replica.max_model_len, max_tokens=1024)
    for r in reqs:
        r.max_tokens = r.output_len
    return run_point("least_load", 1, reqs, cfg, duration_s)["classes"]["interactive"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--coeffs", default=None, help="a coefficients JSON instead of kvray/step_coeffs/<model>.json")
    ap.add_argument("--conv-trace", default=DEFAULT_TRACES["conv"])
    ap.add_argument("--rates", type=float, nargs="+", default=[10, 15, 20, 22, 24])
    ap.add_argument("--duration", type=float, default=120.0)
    a = ap.parse_args(argv)
    c = load_coeffs(a.coeffs or coeffs_file(a.model))
    print(f"coefficients: a={c.a:g} s, b={c.b:g} s/token, c={c.c:g} s/context token, d={c.d:g} s/seq")
    print(f"step of 192 decodes (1,000-token contexts) + a 512-token chunk: "
          f"{1e3 * c.predict(192 + 512, 192 * 1000 + 512, 193):.1f} ms")
    replica = ReplicaConfig(max_model_len=4098, enable_prefix_caching=False)  # prompts <= 4,096 tokens
    print(f"offline workload B: {offline_b(SimConfig(replica=replica, true_coeffs=c, noise=0.0, drain_s=1e3)):.0f} "
          "output tok/s")
    cfg = SimConfig(replica=replica, true_coeffs=c)
    print("| rate (req/s) | attainment 500/50 ms | TTFT p50 / p99 (ms) | TPOT p50 / p90 (ms) |\n|---|---|---|---|")
    for rate in a.rates:
        k = replay(cfg, a.conv_trace, rate, a.duration)
        print(f"| {rate:g} | {k['attainment']:.1%} | {k['ttft_p50'] * 1e3:.0f} / {k['ttft_p99'] * 1e3:.0f} | "
              f"{k['tpot_p50'] * 1e3:.1f} / {k['tpot_p90'] * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
