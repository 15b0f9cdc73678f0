"""Router simulator: goodput of routing policies over kvray replicas, without GPUs.

Each replica runs the real kvray Scheduler and BlockManager (tokens are fake, lengths come from
the trace) and each step lasts what a StepTimeModel predicts, with fixed coefficients: those of
``--model`` in kvray/step_coeffs (default llama-3.1-8b), or ``--coeffs path.json`` (keys a, b,
c, d, optionally ``device``, ``source`` and the ``split`` decode/mixed fits of
benchmarks/step_records.py, used with ``--true-model split``). The engines' queues are bounded as
the online engine's are (429 when full). Requests replay the Azure LLM code + conversation traces
(../shared/traces), conv -> interactive (500 ms TTFT / 50 ms TPOT), code -> batch (10 s / 200 ms),
arrivals from a gamma process (``--cv``) or the trace's own timestamps, scaled to each rate.

Policies, built through kvray.router's registry and deciding on the Router's own replica book:
round_robin, p2c (Ray Serve's PowerOfTwoChoices; FCFS replicas), least_load (kvray's default;
FCFS replicas), slo_aware (with the deadline scheduler). The book gets replica stats polled
every ``--poll-interval`` seconds, each carrying the step-cost fit of that replica's engine,
plus the router's own dispatch, first-token and completion events in between.

For each replica count and policy the arrival rate climbs a grid (per replica) until attainment
collapses, then bisects the 90% crossing. Goodput = the highest rate at which >= 90% of the
requests of each class meet both TTFT and TPOT (rejections count as misses). Writes JSON and
PNG, prints a markdown table and (unless --quick / --no-results-md) updates this script's
section of benchmarks/RESULTS.md.

    python benchmarks/router_sim.py --no-results-md --out out/router_sim/gamma        # 4, 16, 64 replicas (hours)
    python benchmarks/router_sim.py --replicas 4 16 --arrivals trace --coeffs OUT/step_coeffs_llama-3.1-8b.json
    python benchmarks/router_sim.py --quick              # seconds: 2 replicas, a few points
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing import get_context

from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]

from benchmarks.sim import report  # noqa: E402
from benchmarks.sim.cluster import DEFAULT_POLICIES, POLICIES, SimConfig, run_point  # noqa: E402
from benchmarks.sim.replica import ReplicaConfig  # noqa: E402
from benchmarks.sim.workload import DEFAULT_TRACES, build_requests, merged_trace  # noqa: E402
from benchmarks.sim.steps import true_model  # noqa: E402
from kvray.step_cost import StepCoeffs, coeffs_file, load_coeffs  # noqa: E402

DEFAULT_DURATION = {4: 120.0, 16: 60.0, 64: 30.0}
DEFAULT_GRID = [10, 14, 17, 20, 23, 26, 30]  # requests/s per replica (Llama-3.1-8B on an H100: ~20)
_TRACE_CACHE: dict = {}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, choices=sorted(POLICIES))
    ap.add_argument("--model", default="llama-3.1-8b", help="step-time coefficients of kvray/step_coeffs/<model>.json")
    ap.add_argument("--coeffs", help="JSON with step-time coefficients a, b, c, d (+ device, source) instead")
    ap.add_argument("--true-model", choices=["linear", "split"], default="linear",
                    help="replicas step by the one linear fit, or by the file's split decode/mixed fits")
    for k in "abcd":
        ap.add_argument(f"--{k}", type=float, default=None, help=f"override step-time coefficient {k}")
    ap.add_argument("--code-trace", default=DEFAULT_TRACES["code"])
    ap.add_argument("--conv-trace", default=DEFAULT_TRACES["conv"])
    ap.add_argument("--arrivals", choices=["gamma", "trace"], default="gamma")
    ap.add_argument("--cv", type=float, default=2.0, help="gamma inter-arrival coefficient of variation")
    ap.add_argument("--interactive-frac", type=float, default=None,
                    help="draw classes at random with this interactive share (default: conv->interactive, code->batch)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals per point (default by replicas)")
    ap.add_argument("--grid", type=float, nargs="+", default=DEFAULT_GRID, help="rates per replica to try, ascending")
    ap.add_argument("--refine", type=int, default=2, help="bisection steps at the 90%% crossing")
    ap.add_argument("--poll-interval", type=float, default=0.1)
    ap.add_argument("--poll-delay", type=float, default=0.0)
    ap.add_argument("--noise", type=float, default=0.05, help="lognormal sigma of step times")
    ap.add_argument("--num-blocks", type=int, default=16384)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the engine's step budget")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=1024,
                    help="the clients' max_tokens (outputs stop at the trace length)")
    ap.add_argument("--shared-prefix-tokens", type=int, default=0,
                    help="prompts start with one of --num-prefixes shared prefixes")
    ap.add_argument("--num-prefixes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default=None, help="output prefix (default out/router_sim/<arrivals>)")
    ap.add_argument("--results-md", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    ap.add_argument("--no-results-md", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny run for tests: 2 replicas, 4 rates, 20 s")
    args = ap.parse_args(argv)
    if args.quick:
        args.replicas, args.grid, args.refine, args.duration = [2], [4, 14, 24, 34], 0, 20.0
        args.no_results_md = True
    if args.out is None:
        args.out = os.path.join("out", "router_sim", "quick" if args.quick else args.arrivals)
    return args


def coefficients(args) -> tuple[StepCoeffs, str]:
    import json
    path = args.coeffs or coeffs_file(args.model)
    c = load_coeffs(path)
    with open(path) as f:
        meta = json.load(f)
    rel = os.path.relpath(path, _ROOT) if path.startswith(str(_ROOT)) else path
    source = f"{rel} (device: {meta.get('device', '?')}; {meta.get('source', 'fitted')})"
    over = {k: getattr(args, k) for k in "abcd" if getattr(args, k) is not None}
    if over:
        c = StepCoeffs(**{**dict(zip("abcd", c.as_tuple())), **over})
        source += f"; overridden on the command line: {over}"
    return c, source


def _trace(paths: tuple[tuple[str, str], ...]):
    if paths not in _TRACE_CACHE:
        _TRACE_CACHE[paths] = merged_trace(dict(paths))
    return _TRACE_CACHE[paths]


def sweep(task: dict) -> dict:
    """One (policy, replicas) curve: climb the grid until attainment collapses, then bisect."""
    pol, n, s = task["policy"], task["replicas"], task["settings"]
    trace = _trace(s["traces"])
    cfg: SimConfig = s["cfg"]
    dur = s["duration"] or DEFAULT_DURATION.get(n, 60.0)
    points: dict[float, dict] = {}

    def run(rate: float) -> dict:
        rate = round(rate, 2)
        if rate not in points:
            reqs = build_requests(trace, rate, dur, seed=s["seed"], **s["workload"])
            t0 = time.perf_counter()
            res = run_point(pol, n, reqs, cfg, dur, seed=s["seed"])
            res.update(rate=rate, wall_s=round(time.perf_counter() - t0, 2))
            points[rate] = res
        return points[rate]

    fails = 0
    for g in s["grid"]:
        p = run(g * n)
        if p["min_attainment"] < report.TARGET:
            fails += 1
            if fails >= 2 or p["min_attainment"] < 0.5:
                break
        else:
            fails = 0
    for _ in range(s["refine"]):
        pts = sorted(points.values(), key=lambda p: p["rate"])
        lo = report.goodput(pts)
        hi = min((p["rate"] for p in pts if p["rate"] > lo and p["min_attainment"] < report.TARGET), default=None)
        if hi is None or hi - lo < 0.02 * hi:
            break
        run((lo + hi) / 2 if lo > 0 else hi / 2)
    pts = sorted(points.values(), key=lambda p: p["rate"])
    return {"policy": pol, "replicas": n, "duration_s": dur, "points": pts, "goodput": report.goodput(pts)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    coeffs, source = coefficients(args)
    rcfg = ReplicaConfig(num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                         enable_prefix_caching=args.shared_prefix_tokens > 0)
    truth = true_model(args.coeffs or coeffs_file(args.model), args.true_model) \
        if args.true_model == "split" else None
    cfg = SimConfig(replica=rcfg, true_coeffs=coeffs, true_model=truth, noise=args.noise,
                    poll_interval_s=args.poll_interval, poll_delay_s=args.poll_delay,
                    p2c_max_ongoing=2 * args.max_num_seqs)
    workload = dict(cv=args.cv, arrivals=args.arrivals, interactive_frac=args.interactive_frac,
                    max_model_len=args.max_model_len, max_tokens=args.max_tokens,
                    shared_prefix_tokens=args.shared_prefix_tokens, num_prefixes=args.num_prefixes)
    settings = dict(traces=(("code", args.code_trace), ("conv", args.conv_trace)), cfg=cfg, workload=workload,
                    grid=sorted(args.grid), refine=args.refine, duration=args.duration, seed=args.seed)
    tasks = [{"policy": p, "replicas": n, "settings": settings}
             for n in sorted(args.replicas, reverse=True) for p in args.policies]
    t0 = time.perf_counter()
    if args.jobs > 1 and len(tasks) > 1:
        with get_context("fork").Pool(args.jobs) as pool:
            results = list(pool.imap_unordered(sweep, tasks))
    else:
        results = []
        for t in tasks:
            results.append(sweep(t))
            r = results[-1]
            print(f"{r['replicas']} replicas, {r['policy']}: goodput {r['goodput']:g} req/s "
                  f"({len(r['points'])} points, {time.perf_counter() - t0:.0f} s so far)", flush=True)
    wall = time.perf_counter() - t0

    curves: dict = {}
    goodputs: dict = {}
    for r in results:
        curves.setdefault(str(r["replicas"]), {})[r["policy"]] = r["points"]
        goodputs.setdefault(str(r["replicas"]), {})[r["policy"]] = r["goodput"]
    cmd = "python benchmarks/router_sim.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {"command": cmd.strip(), "coefficients": dict(zip("abcd", coeffs.as_tuple())),
               "coefficients_source": source, "replica": vars(rcfg), "workload": workload,
               "poll_interval_s": args.poll_interval, "poll_delay_s": args.poll_delay, "noise": args.noise,
               "seed": args.seed, "wall_s": round(wall, 1), "goodput": goodputs, "curves": curves}
    report.write_json(args.out + ".json", payload)
    title = (f"kvray router simulation: {args.arrivals} arrivals"
             + (f" (CV {args.cv:g})" if args.arrivals == "gamma" else "")
             + f"\nstep-time coefficients: {source.split(';')[0][:90]}")
    has_png = report.plot(args.out + ".png", curves, goodputs, title)
    table = report.markdown_table(goodputs)
    print(table)
    print(f"\n{len(results)} curves in {wall:.0f} s; wrote {args.out}.json"
          + (f" and {args.out}.png" if has_png else ""))
    if not args.no_results_md:
        report.update_results_md(args.results_md, args.arrivals, results_section(args, payload, table))
    return payload


def results_section(args, payload: dict, table: str) -> str:
    c = payload["coefficients"]
    g = payload["goodput"]
    verdict = []
    for n in ("4", "16"):
        if n in g and g[n].get("p2c") and "slo_aware" in g[n]:
            ratio = g[n]["slo_aware"] / g[n]["p2c"]
            verdict.append(f"{n} replicas: {ratio:.2f}× ({'met' if ratio >= 1.5 else 'not met'})")
    arr = f"gamma process, CV {args.cv:g}" if args.arrivals == "gamma" else "the traces' own timestamps, scaled"
    mix = ("conv → interactive, code → batch" if args.interactive_frac is None
           else f"{args.interactive_frac:.0%} interactive at random")
    dur = {n: args.duration or DEFAULT_DURATION.get(int(n), 60.0) for n in g}
    durations = ", ".join(f"{n} replicas: {dur[n]:g} s" for n in sorted(g, key=int))
    return f"""## Router simulation — {args.arrivals} arrivals

`{payload['command']}` (wall time {payload['wall_s']:.0f} s on the shared 2-core dev box, {args.jobs} processes)

- Step time `t = a + b·batched + c·context + d·seqs`: a={c['a']:g} s, b={c['b']:g} s/token,
  c={c['c']:g} s/context token, d={c['d']:g} s/seq, lognormal noise σ={args.noise:g}.
  Source: {payload['coefficients_source']}.
- Replicas: the real kvray Scheduler + BlockManager; {args.num_blocks} KV blocks × 16 tokens,
  max_num_seqs {args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens} (chunked prefill),
  max_model_len {args.max_model_len}; FCFS for the baselines, the deadline policy for slo_aware.
- Workload: Azure LLM 2023 code + conversation traces merged ({mix}); interactive 500 ms TTFT / 50 ms TPOT,
  batch 10 s / 200 ms; arrivals: {arr}; clients ask max_tokens {args.max_tokens}, outputs stop at the
  trace length. Router stats polled every {args.poll_interval:g} s, plus the router's own dispatch,
  first-token and completion counts in between. Rejected (429) requests count as misses.
- Goodput = highest arrival rate with ≥ 90% of each class meeting both TTFT and TPOT. Rates per replica
  {args.grid}, then {args.refine} bisection steps; arrivals per point: {durations}.

{table}

Target (slo_aware ≥ 1.5× p2c): {'; '.join(verdict) or 'n/a'}.
Curves: `{args.out}.json`, `{args.out}.png`.
"""


if __name__ == "__main__":
    main()
