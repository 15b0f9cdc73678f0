"""Serving overhead on one GPU: the same closed-loop loads through the engine in-process and
through HTTP (Router + Ray Serve), as users run it (``serve run CONFIG``).

Legs, each in its own processes so that every one gets the whole GPU:

* ``engine-thread`` and ``engine-process``: ``benchmarks/serving.py --engine-direct`` (AsyncLLMEngine
  called in the load generator's process, its step loop in a thread of that process, or in a child
  process as in LLMReplica, ``--engine-process``). The thread layout shares one GIL between the step
  loop and the load generator, which slows both; the process layout is the baseline of the table;
* one HTTP leg per ``--http`` spec ``NAME:ROUTERS:INGRESS``, where INGRESS is
  ``haproxy`` (``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy on the config's port spreads connections over
  the Router replicas, which serve HTTP themselves), ``haproxy-actor`` (the same, with the Router's
  calls to LLMReplica as Ray actor calls rather than gRPC), ``direct`` (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``
  with one Router replica, whose own port is 30000) or ``proxy`` (Serve's default Python proxy).

Every leg runs each ``--concurrency`` with ``--rounds`` x concurrency requests of ``--input-len`` prompt
and ``--output-len`` output tokens (ignore_eos, greedy, logprobs=0 so every token is a chunk).
Writes OUT/<leg>_c<N>.json (serving.py's reports) and OUT/summary.json, and prints a markdown
table of throughput and TTFT against the baseline leg. ``--repeat R`` runs all legs R times in
turn (files OUT/<leg>_r<i>_c<N>.json) and adds the median and range of each leg's overhead
against the baseline of the same repeat: the machine drifts between runs by more than a few ms.

  python benchmarks/serving_overhead.py --config cluster-configs/gpu.yaml --http haproxy4:4:haproxy \\
      --concurrency 64 256
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVING = str(ROOT / "benchmarks" / "serving.py")
INGRESS_ENV = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # the same, with Router -> LLMReplica calls as Ray actor calls instead of the gRPC transport
    # that RAY_SERVE_THROUGHPUT_OPTIMIZED turns on
    "haproxy-actor": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                      "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"},
    "direct": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "proxy": {},
}


def cli(name: str) -> list[str]:
    """``serve ...`` / ``ray ...`` run by this interpreter (an installed script's shebang may name
    another one, e.g. when Ray travels as a --target bundle)."""
    module, entry = {"serve": ("ray.serve.scripts", "cli"), "ray": ("ray.scripts.scripts", "main")}[name]
    return [sys.executable, "-c", f"import sys; from {module} import {entry} as m; sys.argv[0] = {name!r}; sys.exit(m())"]


def load_args(a, c: int) -> list[str]:
    return ["--concurrency", str(c), "--num-requests", str(a.rounds * c), "--input-len", str(a.input_len), "--output-len",
            str(a.output_len), "--warmup", str(a.warmup)]


def engine_leg(a, name: str, out: Path, tag: str = "") -> dict:
    res = {}
    for c in a.concurrency:
        path = out / f"{name}{tag}_c{c}"
        extra = ["--engine-process"] if name == "engine-process" else []
        subprocess.run([sys.executable, SERVING, "--engine-direct", *extra, "--config", a.config, *load_args(a, c),
                        "--out", str(path)], check=True)
        res[c] = json.loads(path.with_suffix(".json").read_text())["runs"][0]["summary"]
    return res


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} never became healthy")


def http_leg(a, name: str, routers: int, ingress: str, out: Path, tag: str = "") -> dict:
    cfg = yaml.safe_load(open(a.config))
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == "Router":
            d["num_replicas"] = routers
    port = cfg.get("http_options", {}).get("port", 8000)
    if ingress == "direct":
        if routers != 1:
            raise SystemExit("direct ingress without HAProxy: one Router replica (its own port)")
        port = 30000
    cfg_path = Path(tempfile.mkdtemp()) / "app.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **INGRESS_ENV[ingress]}
    log = open(out / f"{name}{tag}_serve.log", "w")
    proc = subprocess.Popen([*cli("serve"), "run", str(cfg_path)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    res = {}
    try:
        wait_healthy(url, proc, a.startup_timeout)
        time.sleep(2 * routers)  # every Router replica ready, not just the first to answer
        for c in a.concurrency:
            path = out / f"{name}{tag}_c{c}"
            subprocess.run([sys.executable, SERVING, "--base-url", url, "--client-procs", str(a.client_procs),
                            *load_args(a, c), "--out", str(path)], check=True)
            res[c] = json.loads(path.with_suffix(".json").read_text())["runs"][0]["summary"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([*cli("ray"), "stop", "--force"], capture_output=True)
        log.close()
    return res


def table(results: dict, concurrency: list[int], baseline: str) -> str:
    rows = [f"| leg | concurrency | out tok/s | vs {baseline} | TTFT p50 | TTFT p50 - {baseline} | TTFT p90 | TPOT p50 "
            "| ITL p50 |", "|---|---|---|---|---|---|---|---|---|"]
    for c in concurrency:
        base = results[baseline][c]
        for leg, res in results.items():
            s = res[c]
            ms = lambda d, k="p50": f"{d[k] * 1000:.1f} ms" if d[k] is not None else "-"  # noqa: E731
            over = (s["ttft_s"]["p50"] - base["ttft_s"]["p50"]) * 1000
            rows.append(f"| {leg} | {c} | {s['output_tok_s']:,.0f} | {s['output_tok_s'] / base['output_tok_s']:.1%} "
                        f"| {ms(s['ttft_s'])} | {over:+.1f} ms | {ms(s['ttft_s'], 'p90')} | {ms(s['tpot_s'])} "
                        f"| {ms(s['itl_s'])} |")
    return "\n".join(rows)


def paired_summary(runs: list[dict], concurrency: list[int], baseline: str) -> str:
    """Over repeats: each HTTP leg's overhead against the baseline leg of the same repeat (the
    machine drifts between repeats more than the overhead itself), as median and range."""
    rows = [f"| leg | concurrency | repeats | throughput vs {baseline}: median (range) "
            f"| TTFT p50 - {baseline}: median (range) |", "|---|---|---|---|---|"]
    for c in concurrency:
        for leg in runs[0]:
            if leg == baseline:
                continue
            ratio = sorted(r[leg][c]["output_tok_s"] / r[baseline][c]["output_tok_s"] for r in runs)
            over = sorted((r[leg][c]["ttft_s"]["p50"] - r[baseline][c]["ttft_s"]["p50"]) * 1000 for r in runs)
            rows.append(f"| {leg} | {c} | {len(runs)} | {statistics.median(ratio):.1%} ({ratio[0]:.1%} to {ratio[-1]:.1%}) "
                        f"| {statistics.median(over):+.1f} ms ({over[0]:+.1f} to {over[-1]:+.1f}) |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "cluster-configs" / "gpu.yaml"))
    p.add_argument("--engine", nargs="*", default=["engine-process", "engine-thread"],
                   choices=["engine-process", "engine-thread"], help="in-process legs; the first is the baseline")
    p.add_argument("--http", nargs="+", default=["haproxy4:4:haproxy"], help="NAME:ROUTERS:INGRESS legs")
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--rounds", type=int, default=8, help="requests per run = rounds x concurrency")
    p.add_argument("--input-len", default="512")
    p.add_argument("--output-len", default="128")
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--repeat", type=int, default=1,
                   help="run every leg this many times, alternating, and summarize the paired overheads")
    p.add_argument("--out", default="out/serving_overhead")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    concurrencies = a.concurrency
    runs: list[dict] = []
    for r in range(a.repeat):
        tag = f"_r{r}" if a.repeat > 1 else ""
        results: dict = {}
        for name in a.engine:
            results[name] = engine_leg(a, name, out, tag)
        for spec in a.http:
            name, routers, ingress = spec.split(":")
            results[name] = http_leg(a, name, int(routers), ingress, out, tag)
        runs.append(results)
    baseline = a.engine[0] if a.engine else next(iter(runs[0]))
    md = "\n\n".join(table(res, concurrencies, baseline) for res in runs)
    if a.repeat > 1:
        md += "\n\n" + paired_summary(runs, concurrencies, baseline)
    print(md)
    (out / "summary.json").write_text(json.dumps({"args": vars(a), "runs": runs, "table": md}, indent=1,
                                                 default=str))
    return runs


if __name__ == "__main__":
    main()
