"""Routing policies on real replicas: goodput of each policy over the same HTTP workload.

For each policy, deploys the kvray app (N LLMReplica replicas, one Router) in this process's
Ray cluster, runs ``benchmarks/serving.py`` with the router simulator's workload (Azure code ->
batch, conversation -> interactive, the traces' own arrival gaps scaled to each rate) at every
rate, and tears the app down. Policies:

* ``slo_aware``: ``router.policy: slo_aware`` (admission control, 429s) + deadline replicas;
* ``p2c``: Ray Serve's default ``PowerOfTwoChoicesRequestRouter`` + FCFS replicas;
* ``least_load``: kvray's least-outstanding-tokens policy + FCFS replicas.

Goodput = the highest rate at which >= 90% of each class's requests meet both TTFT and TPOT
(429s count as misses). Writes OUT/<policy>.json|png (serving.py's reports), OUT/summary.json,
OUT/goodput.png, and prints a markdown table.

``--program`` plays the single-replica load program of ``benchmarks/overload_sim.py`` instead (a
10x burst on 0.7x G, then windows at 1x, 1.5x and 2x G, G = the replica's goodput, ``auto``: the
simulator's with ``--coeffs``) through the same ingress, for each policy, and writes every
request's outcome to OUT/routing_program.json (merged into an existing one for the same program,
so policies can run in separate commands); ``--compare-sim`` then runs overload_sim.py on it
(predicted vs measured, OUT/fidelity.md|json|png). Requests go through HAProxy (``--ingress``),
the shipped configs' ingress.

  python benchmarks/routing_gpu.py --replicas 4 --gpus-per-replica 0.5 --rates 4,8,12,16 --duration 30
  python benchmarks/routing_gpu.py --program --replicas 1 --gpus-per-replica 1 --model kvray:llama-3.1-8b \
      --max-model-len 8192 --coeffs OUT/step_coeffs_llama-3.1-8b.json --compare-sim --out OUT
  # CPU smoke test:
  python benchmarks/routing_gpu.py --model kvray:tiny-qwen3 --engine '{"device": "cpu"}' \\
      --gpus-per-replica 0 --replicas 2 --rates 1 --duration 5 --max-model-len 1024
"""
from __future__ import annotations

import argparse
import json
import subprocess
import os
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(ROOT / "benchmarks")]

from benchmarks import overload_sim, program_http, serving  # noqa: E402
from benchmarks.sim import program as prog  # noqa: E402
from benchmarks.sim.replica import ReplicaConfig  # noqa: E402
from benchmarks.sim.workload import CLASSES, merged_trace  # noqa: E402

P2C = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"
SLO = {"interactive": {"ttft_ms": 500, "tpot_ms": 50, "priority": 2.0},
       "batch": {"ttft_ms": 10000, "tpot_ms": 200, "priority": 1.0}}


def add_app_options(p: argparse.ArgumentParser, *, gpus_per_replica: float, cpus_per_replica: float) -> None:
    """Options shared by the benchmarks that deploy the app themselves (this one and burst.py)."""
    p.add_argument("--model", default="kvray:qwen3-0.6b")
    p.add_argument("--engine", default="{}", help="JSON of extra engine options")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpus-per-replica", type=float, default=gpus_per_replica)
    p.add_argument("--cpus-per-replica", type=float, default=cpus_per_replica)
    p.add_argument("--router-replicas", type=int, default=2, help="Router (HTTP ingress) replicas")
    p.add_argument("--router-cpus", type=float, default=2)
    p.add_argument("--stream-interval-ms", type=float, default=50.0,
                   help="replicas merge a stream's tokens for this long (fewer SSE chunks through the Router)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8000)


def app_args(policy: str, a) -> dict:
    engine = {"max_num_seqs": 256, "max_model_len": a.max_model_len, "dtype": "bfloat16",
              "scheduling_policy": "deadline" if policy == "slo_aware" else "fcfs"}
    if a.num_kv_blocks:
        engine["num_kv_blocks"] = a.num_kv_blocks
    engine.update(json.loads(a.engine))
    router = {"policy": "slo_aware", "policy_options": {"mode": "pack"}} if policy == "slo_aware" \
        else {"policy": "least_load"}
    return {"model": a.model, "served_model_name": "bench", "engine": engine, "slo_classes": SLO,
            "default_slo_class": "interactive",
            # token channels rely on kvray's request router pinning each channel to its replica
            "router": {**router, "stats_period_s": 0.1, "token_channels": policy != "p2c"},
            "graceful_shutdown_timeout_s": 5, "stream_interval_ms": a.stream_interval_ms}


def deploy(policy: str, a) -> None:
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from kvray.platform.app import make_app
    from kvray.app_config import parse_args

    overrides = {"num_replicas": a.replicas,
                 "ray_actor_options": {"num_cpus": a.cpus_per_replica, "num_gpus": a.gpus_per_replica}}
    if policy == "p2c":
        overrides["request_router_config"] = RequestRouterConfig(request_router_class=P2C)
    router = {"num_replicas": a.router_replicas, "ray_actor_options": {"num_cpus": a.router_cpus}}
    app = make_app(parse_args(app_args(policy, a)), overrides, router)
    serve.run(app, name="kvray", route_prefix="/", blocking=False)


def wait_ready(url: str, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            if requests.get(url + "/health", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise RuntimeError("the app never became healthy")
        time.sleep(1)


def goodput(report: dict) -> float | None:
    """Highest rate at which every class reached >= 90% attainment."""
    best = None
    for run in report["runs"]:
        if all(c["attainment"] is not None and c["attainment"] >= 0.9 for c in run["summary"]["per_class"].values()):
            best = max(best or 0.0, run["rate"])
    return best


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, s in summary["policies"].items():
        rates = [r["rate"] for r in s["runs"]]
        worst = [min(c["attainment"] for c in r["per_class"].values()) for r in s["runs"]]
        ax.plot(rates, worst, marker="o", label=f"{policy} (goodput {s['goodput_rps']})")
    ax.axhline(0.9, color="gray", ls="--", lw=1)
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel("attainment of the worse class")
    ax.set_title(f"{summary['replicas']} replicas on {summary['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        return f"{len(out)}x {out[0]}" if out else "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


def traces(a) -> dict[str, str]:
    return {"code": a.code_trace, "conv": a.conv_trace}


def program_setup(a, out: Path) -> tuple[dict, list]:
    """The program's record (an existing one for the same program, to add policies to) and requests."""
    from kvray.step_cost import coeffs_file

    path = out / "routing_program.json"
    keys = ("levels", "window", "overload", "settle", "gap", "burst", "burst_factor", "burst_base", "drain", "cv",
            "seed", "max_model_len")
    args = {k: getattr(a, k) for k in keys}
    record = json.loads(path.read_text()) if path.exists() else None
    if record and (record["program_args"] != args or record["model"] != a.model):
        raise SystemExit(f"{path} holds another program or model: use another --out")
    coeffs = a.coeffs or coeffs_file(a.model)
    if record is None:
        goodputs = None
        if a.goodput == "auto":
            replica = ReplicaConfig(max_model_len=a.max_model_len, enable_prefix_caching=False)
            cfg = overload_sim.sim_config(coeffs, "linear", replica, a.drain)
            goodputs = overload_sim.predicted_goodputs(overload_sim.POLICIES, cfg, a.seed, a.cv, 3, traces(a))
            if max(goodputs.values()) <= 0:
                raise SystemExit("the simulator finds no rate the replica serves within its SLOs: pass --goodput")
        record = {"device": device_name(), "model": a.model, "coefficients": coeffs, "program_args": args,
                  "goodput": max(goodputs.values()) if goodputs else float(a.goodput),
                  "predicted_goodputs": goodputs, "policies": {}}
    phases = overload_sim.make_program(a, record["goodput"])
    record["phases"] = [vars(ph) for ph in phases]
    labelled = prog.program_requests(merged_trace(traces(a)), phases, seed=a.seed, cv=a.cv,
                                     max_model_len=a.max_model_len)
    print(f"program: G = {record['goodput']:.2f} req/s, {len(labelled)} requests over "
          f"{sum(ph.duration_s for ph in phases):.0f} s", flush=True)
    return record, labelled


def run_program(a, url: str, out: Path, record: dict, labelled: list) -> dict:
    import asyncio

    from ray import serve

    phases = [prog.Phase(**ph) for ph in record["phases"]]
    warm = prog.program_requests(merged_trace(traces(a)), [prog.Phase("warm-up", 4.0, 4.0)], seed=a.seed + 1,
                                 max_model_len=a.max_model_len)
    for r, _ in warm:  # the warm-up's prompts at full length, its outputs short
        r.output_len = r.max_tokens = min(r.output_len, 32)
    for policy in a.policies:
        t0 = time.time()
        deploy(policy, a)
        wait_ready(url, timeout_s=300)
        asyncio.run(program_http.play(url, warm, drain_s=20.0, seed=a.seed + 1))
        reps = requests.get(url + "/v1/kvray/replicas", timeout=10).json()["replicas"]
        blocks = [(r.get("stats") or {}).get("engine", {}).get("num_total_blocks") for r in reps.values()]
        record["num_kv_blocks"] = next((b for b in blocks if b), record.get("num_kv_blocks"))  # none with P2C
        print(f"\n#### {policy}: ready and warm in {time.time() - t0:.0f} s, KV blocks {record['num_kv_blocks']}",
              flush=True)
        outcomes = asyncio.run(program_http.play(url, labelled, drain_s=a.drain, seed=a.seed))
        windows = prog.summarize_windows(outcomes, phases, CLASSES)
        record["policies"][policy] = {"windows": windows, "outcomes": prog.outcomes_to_json(outcomes)}
        (out / "routing_program.json").write_text(json.dumps(record, default=str))
        for name, w in windows.items():
            c = w["classes"]
            print(f"{policy} {name:>12}: rate {w['rate']:.1f}, goodput {w['goodput_rps']:.2f} req/s, attainment "
                  + ", ".join(f"{k} {v['attainment']:.0%} (429 {v['rejected']}, timeouts {v['timeouts']})"
                              for k, v in c.items()), flush=True)
        serve.delete("kvray")
        time.sleep(3)
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=["slo_aware", "p2c", "least_load"],
                   choices=["slo_aware", "p2c", "least_load"])
    p.add_argument("--replicas", type=int, default=4)
    add_app_options(p, gpus_per_replica=0.5, cpus_per_replica=2)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks per replica (needed when replicas share a GPU: the memory profile "
                        "sees the other replicas' memory)")
    p.add_argument("--rates", default="4,8,12,16")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--out", default="out/routing_gpu")
    p.add_argument("--plot-only", metavar="SUMMARY_JSON", help="only draw the PNG next to a summary JSON")
    p.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                   help="HAProxy in front of Routers serving HTTP themselves (the shipped configs), or Serve's proxy")
    p.add_argument("--program", action="store_true", help="the single-replica load program instead of --rates")
    p.add_argument("--coeffs", default=None, help="--program: step-time coefficients (default: the model's in "
                   "kvray/step_coeffs) for --goodput auto and --compare-sim")
    p.add_argument("--compare-sim", action="store_true", help="--program: predicted vs measured afterwards")
    overload_sim.program_args(p, seed=False)
    return p


def run_rates(a, url: str, out: Path, command: str) -> dict:
    from ray import serve

    summary = {"device": device_name(), "replicas": a.replicas, "gpus_per_replica": a.gpus_per_replica,
               "model": a.model, "rates": a.rates, "duration_s": a.duration, "slo": SLO, "command": command,
               "policies": {}}
    try:
        for policy in a.policies:
            t0 = time.time()
            deploy(policy, a)
            wait_ready(url)
            print(f"\n#### {policy}: ready in {time.time() - t0:.0f} s", flush=True)
            report = serving.main(["--base-url", url, "--dataset", "azure-mix", "--request-rate", a.rates,
                                   "--duration", str(a.duration), "--seed", str(a.seed), "--warmup", "8",
                                   "--slo", ",".join(f"{k}={v['ttft_ms']}:{v['tpot_ms']}" for k, v in SLO.items()),
                                   "--out", str(out / policy)])
            summary["policies"][policy] = {
                "goodput_rps": goodput(report),
                "runs": [{"rate": r["rate"], "per_class": r["summary"]["per_class"],
                          "output_tok_s": r["summary"]["output_tok_s"]} for r in report["runs"]]}
            serve.delete("kvray")
            time.sleep(3)
    finally:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    try:
        plot(summary, out / "goodput.png")
    except ImportError:
        print("no matplotlib: re-plot with --plot-only OUT/summary.json")
    base = summary["policies"].get("p2c", {}).get("goodput_rps")
    print("\n| policy | goodput (req/s) | vs p2c |\n|---|---|---|")
    for policy, s in summary["policies"].items():
        g = s["goodput_rps"]
        ratio = f"{g / base:.2f}x" if g and base else "-"
        print(f"| {policy} | {g} | {ratio} |")
    return summary


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    if a.plot_only:
        summary = json.loads(Path(a.plot_only).read_text())
        plot(summary, Path(a.plot_only).with_suffix(".png"))
        return summary
    if a.ingress == "haproxy":  # read by Ray Serve in this process and in the cluster it starts
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.program:  # the simulator's work (it forks) before Ray starts, and after it stops
        record, labelled = program_setup(a, out)
        record = with_serve(a, lambda url: run_program(a, url, out, record, labelled))
        if a.compare_sim:
            overload_sim.main(["--measured", str(out / "routing_program.json"), "--coeffs", record["coefficients"],
                               "--true-model", "both", "--jobs", "3", "--code-trace", a.code_trace,
                               "--conv-trace", a.conv_trace, "--out", str(out / "fidelity")])
        return record
    return with_serve(a, lambda url: run_rates(a, url, out, "python benchmarks/routing_gpu.py " + " ".join(
        argv if argv is not None else sys.argv[1:])))


def with_serve(a, run):
    """``run(url)`` with Ray and Serve started in this process, stopped afterwards."""
    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    try:
        return run(f"http://127.0.0.1:{a.port}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
