"""A 10x burst against an autoscaling kvray app: how fast a new replica serves, and the SLO held.

Deploys the kvray app in this process's Ray cluster with autoscaling from ``--min-replicas``
(kvray's ``SLOHeadroomPolicy``, short delays) and the ``slo_aware`` router, then sends
``--base-rate`` req/s for ``--pre`` s, ``--burst-factor`` x that for ``--burst`` s, and the base
rate again for ``--post`` s (Poisson arrivals; a mix of interactive and batch requests). While it
runs it samples the deployment's replica states (``serve.status()``) and the Router's view of the
replicas (``/v1/kvray/replicas``: each replica's start and first-token times).

Reports: the time from the start of the burst until Serve starts a new replica, until that
replica is running, and until it serves its first token; per class, during the burst: attainment
of all requests, attainment of the admitted ones, 429s and other failures (timeouts); the
replica count over time (PNG). Writes OUT.json and OUT.png.

  python benchmarks/burst.py --base-rate 6 --burst-factor 10 --pre 20 --burst 60 --post 60 --max-replicas 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import os
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(ROOT / "benchmarks")]

from benchmarks import serving  # noqa: E402
from benchmarks.routing_gpu import SLO, add_app_options, device_name, wait_ready  # noqa: E402


def schedule(a) -> list[serving.Req]:
    """Poisson arrivals: base rate, then burst, then base rate; class mix and lengths at random."""
    rng = random.Random(a.seed)
    phases = [(a.pre, a.base_rate), (a.burst, a.base_rate * a.burst_factor), (a.post, a.base_rate)]
    reqs, t, start = [], 0.0, 0.0
    for length, rate in phases:
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + length:
                break
            cls = "interactive" if rng.random() < a.interactive_frac else "batch"
            lo, hi = (a.interactive_prompt if cls == "interactive" else a.batch_prompt)
            p = rng.randint(lo, hi)
            o = rng.randint(*(a.interactive_output if cls == "interactive" else a.batch_output))
            reqs.append(serving.Req(len(reqs), t, [rng.randrange(a.vocab) for _ in range(p)], o, cls))
        start += length
    return reqs


class Sampler(threading.Thread):
    """Samples replica states and the Router's replica view twice a second."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from ray import serve
        while not self.stop.is_set():
            t = time.time()
            states: dict = {}
            try:
                dep = serve.status().applications["kvray"].deployments["LLMReplica"]
                states = {str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()}
            except Exception as e:  # noqa: BLE001
                states = {"error": repr(e)}
            view: dict = {}
            try:
                reps = requests.get(self.url + "/v1/kvray/replicas", timeout=5).json()["replicas"]
                view = {rid: {k: (r["stats"] or {}).get(k) for k in ("started_at", "first_token_at", "num_running",
                                                                      "num_waiting")}
                        for rid, r in reps.items()}
            except Exception:  # noqa: BLE001
                pass
            self.samples.append({"t": t, "states": states, "replicas": view})
            self.stop.wait(0.5)


def analyse(results, reqs, samples, t0_wall: float, a) -> dict:
    burst_lo, burst_hi = a.pre, a.pre + a.burst
    burst_start = t0_wall + burst_lo
    first = {}
    initial = set(samples[0]["replicas"]) if samples else set()
    for s in samples:
        for rid, r in s["replicas"].items():
            if rid in initial:
                continue
            first.setdefault(rid, {"seen": s["t"]})
            if r.get("first_token_at") and "first_token_at" not in first[rid]:
                first[rid]["first_token_at"] = r["first_token_at"]
                first[rid]["started_at"] = r.get("started_at")
    starting = next((s["t"] for s in samples if s["t"] >= burst_start and
                     sum(v for k, v in s["states"].items() if k != "error") > len(initial)), None)
    new = [v for v in first.values() if "first_token_at" in v]
    new_first = min((v["first_token_at"] for v in new), default=None)
    new_running = min((v["seen"] for v in first.values()), default=None)

    def rel(x):
        return None if x is None else round(x - burst_start, 2)

    slo = {k: (v["ttft_ms"], v["tpot_ms"]) for k, v in SLO.items()}
    in_burst = [r for r in results if burst_lo <= r.req.arrival_s < burst_hi]
    per_class = serving.summarize(in_burst, a.burst, slo)["per_class"]
    for c in per_class.values():
        c.pop("goodput_rps", None)
    overall = serving.summarize(results, a.pre + a.burst + a.post, slo)
    timeouts = sum(1 for r in results if not r.ok and r.status in (None, 200))
    return {
        "burst_start_wall": burst_start,
        "new_replica_started_s": rel(starting),
        "new_replica_running_s": rel(new_running),
        "new_replica_first_token_s": rel(new_first),
        "new_replicas": {k: {kk: rel(vv) for kk, vv in v.items()} for k, v in first.items()},
        "burst_per_class": per_class,
        "all_per_class": overall["per_class"],
        "failures_other_than_429": sum(1 for r in results if not r.ok and r.status != 429),
        "timeouts_or_dropped": timeouts,
        "max_replicas_seen": max((sum(v for k, v in s["states"].items() if k != "error") for s in samples),
                                 default=None),
    }


def records(results) -> list[dict]:
    return [{"arrival_s": round(r.req.arrival_s, 3), "cls": r.req.slo_class, "status": r.status, "ok": r.ok,
             "ttft": r.ttft, "tpot": r.tpot} for r in results]


def plot(report: dict, path: Path) -> None:
    """Replica count over time, and arrivals / SLO met / 429s per second, from a report dict."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = argparse.Namespace(**report["args"])
    samples = report["samples"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ts = [s["t"] for s in samples]
    running = [s["states"].get("RUNNING", 0) for s in samples]
    total = [sum(v for k, v in s["states"].items() if k != "error") for s in samples]
    ax1.step(ts, total, where="post", label="replicas (all states)", color="tab:gray", ls="--")
    ax1.step(ts, running, where="post", label="replicas running", color="tab:blue")
    ax1.set_ylabel("replicas")
    ax1.set_ylim(0, max(total + [1]) + 0.5)
    ax1.set_title(f"{report['device']}: {a.base_rate:g} req/s, x{a.burst_factor:g} burst, "
                  f"replicas {a.min_replicas}-{a.max_replicas}")
    ax1.axvspan(a.pre, a.pre + a.burst, color="tab:orange", alpha=0.1, label="burst")
    ax1.legend(loc="upper right")
    ax1.grid(alpha=0.3)
    bins = 2.0
    n = int((a.pre + a.burst + a.post) / bins) + 1
    arrivals, rejected, met = [0] * n, [0] * n, [0] * n
    slo = {k: (v["ttft_ms"], v["tpot_ms"]) for k, v in SLO.items()}
    for r in report["records"]:
        i = min(n - 1, int(r["arrival_s"] / bins))
        arrivals[i] += 1
        if r["status"] == 429:
            rejected[i] += 1
        elif r["ok"] and r["ttft"] * 1000 <= slo[r["cls"]][0] and (
                r["tpot"] is None or r["tpot"] * 1000 <= slo[r["cls"]][1]):
            met[i] += 1
    xs = [i * bins for i in range(n)]
    ax2.plot(xs, [x / bins for x in arrivals], label="arrivals/s")
    ax2.plot(xs, [x / bins for x in met], label="met SLO/s")
    ax2.plot(xs, [x / bins for x in rejected], label="429/s")
    ax2.set_xlabel("seconds since start")
    ax2.set_ylabel("requests/s")
    ax2.legend(loc="upper right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def deploy(a) -> None:
    from ray import serve

    from kvray.platform.app import make_app
    from kvray.platform.autoscaling import POLICY_PATH
    from kvray.app_config import parse_args

    engine = {"max_num_seqs": 256, "max_model_len": a.max_model_len, "scheduling_policy": "deadline"}
    engine.update(json.loads(a.engine))
    args = {"model": a.model, "served_model_name": "bench", "engine": engine, "slo_classes": SLO,
            "default_slo_class": "interactive",
            "router": {"policy": "slo_aware", "policy_options": {"mode": "pack"}, "stats_period_s": 0.1},
            "graceful_shutdown_timeout_s": 5, "stream_interval_ms": a.stream_interval_ms}
    autoscaling = {"min_replicas": a.min_replicas, "initial_replicas": a.min_replicas,
                   "max_replicas": a.max_replicas, "upscale_delay_s": a.upscale_delay,
                   "downscale_delay_s": a.downscale_delay, "look_back_period_s": 5.0, "metrics_interval_s": 1.0,
                   "policy": {"policy_function": POLICY_PATH}}
    overrides = {"autoscaling_config": autoscaling,
                 "ray_actor_options": {"num_cpus": a.cpus_per_replica, "num_gpus": a.gpus_per_replica}}
    router = {"num_replicas": a.router_replicas, "ray_actor_options": {"num_cpus": a.router_cpus}}
    serve.run(make_app(parse_args(args), overrides, router), name="kvray",
              route_prefix="/")


def parse_range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=2)
    add_app_options(p, gpus_per_replica=1, cpus_per_replica=4)
    p.add_argument("--upscale-delay", type=float, default=2.0)
    p.add_argument("--downscale-delay", type=float, default=20.0)
    p.add_argument("--base-rate", type=float, default=6.0)
    p.add_argument("--burst-factor", type=float, default=10.0)
    p.add_argument("--pre", type=float, default=20.0)
    p.add_argument("--burst", type=float, default=60.0)
    p.add_argument("--post", type=float, default=60.0)
    p.add_argument("--interactive-frac", type=float, default=0.8)
    p.add_argument("--interactive-prompt", type=parse_range, default=(256, 1024))
    p.add_argument("--interactive-output", type=parse_range, default=(64, 256))
    p.add_argument("--batch-prompt", type=parse_range, default=(1024, 3072))
    p.add_argument("--batch-output", type=parse_range, default=(64, 512))
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--out", default="out/burst")
    p.add_argument("--plot-only", metavar="REPORT_JSON", help="only draw the PNG next to a report JSON")
    a = p.parse_args(argv)
    if a.plot_only:
        report = json.loads(Path(a.plot_only).read_text())
        plot(report, Path(a.plot_only).with_suffix(".png"))
        return report

    import aiohttp
    import ray
    from ray import serve

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    url = f"http://127.0.0.1:{a.port}"
    try:
        t = time.time()
        deploy(a)
        wait_ready(url)
        print(f"app ready in {time.time() - t:.0f} s", flush=True)
        reqs = schedule(a)
        args = argparse.Namespace(base_url=url, model="bench", temperature=0.0)

        async def run():
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
                one = serving.http_runner(args, session)
                await serving.drive([serving.Req(-1, 0, r.prompt, 8, r.slo_class) for r in reqs[:4]], one, 4)
                sampler = Sampler(url)
                sampler.start()
                await asyncio.sleep(1.0)
                t0 = time.time()
                results, _ = await serving.drive(reqs, one, None)
                await asyncio.sleep(max(0.0, a.downscale_delay + 15 - (time.time() - t0 - a.pre - a.burst - a.post)))
                sampler.stop.set()
                sampler.join()
                return results, sampler.samples, t0

        results, samples, t0 = asyncio.run(run())
        report = {"device": device_name(), "args": vars(a), "requests": len(reqs),
                  "command": "python benchmarks/burst.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  **analyse(results, reqs, samples, t0, a),
                  "samples": [{"t": round(s["t"] - t0, 2), "states": s["states"]} for s in samples],
                  "records": records(results)}
        Path(a.out + ".json").write_text(json.dumps(report, indent=2, default=str))
        try:
            plot(report, Path(a.out + ".png"))
        except ImportError:
            print("no matplotlib: re-plot with --plot-only OUT.json")
    finally:
        serve.shutdown()
        ray.shutdown()
    keys = ("new_replica_started_s", "new_replica_running_s", "new_replica_first_token_s", "max_replicas_seen",
            "failures_other_than_429", "timeouts_or_dropped")
    print(json.dumps({k: report[k] for k in keys}, indent=1))
    for cls, c in report["burst_per_class"].items():
        adm = c["attainment_of_admitted"]
        print(f"burst {cls}: {c['requests']} requests, attainment {c['attainment']:.1%}, of admitted "
              f"{'-' if adm is None else f'{adm:.1%}'}, 429s {c['rejected_429']}, errors {c['errors']}")
    print(f"wrote {a.out}.json and {a.out}.png")
    return report


if __name__ == "__main__":
    main()
