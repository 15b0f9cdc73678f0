"""Serving overhead on one GPU: the same closed-loop load through the engine in-process and through
HTTP (Router + Ray Serve, as users run it: ``serve run CONFIG``), in alternating passes.

Both targets start once and stay up for the whole run, on the same GPU:

* baseline: ``AsyncLLMEngine`` in this process with its step loop in a child process, the layout
  of ``LLMReplica`` (``--baseline thread``: the step loop in a thread of this process), driven by
  serving.py's load generator in this process;
* HTTP: ``serve run CONFIG`` with ``--routers`` Router replicas behind ``--ingress``: ``haproxy``
  (``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy on the config's port spreads connections over the Router
  replicas, which serve HTTP themselves), ``haproxy-actor`` (the same, with the Router's calls to
  LLMReplica as Ray actor calls instead of gRPC), ``direct`` (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``,
  one Router on its own port 30000) or ``proxy`` (Serve's default Python proxy); serving.py's
  load generator in ``--client-procs`` processes.

Both engines get the same fixed KV cache, ``--num-kv-blocks`` (neither sizes itself from the GPU
memory the other holds); the default holds every stream of the load with room to spare, so the
cache never binds. An idle target does no work: its step loop waits on a condition.

For each load, ``--repeat`` pairs of passes run back to back, baseline first in even pairs and
HTTP first in odd ones. Loads: each ``--concurrency`` (a closed loop: ``--rounds`` x concurrency
requests) and each of ``--rates`` (an open loop: ``--rate-requests`` Poisson arrivals at that
rate, the same arrival times for both targets, so neither target's completions pace the other's
arrivals). A pass is serving.py's warmup and then the load's requests of ``--input-len`` prompt and
``--output-len`` output tokens (ignore_eos, greedy, logprobs=0 so every token is a chunk). The machine drifts between runs by more than the few ms
being measured, so each HTTP pass is compared with the baseline pass of its own pair, and the
pairs are summarized by their median and range.

``--trace-dir DIR`` turns on ``KVRAY_TRACE_DIR`` (DIR/baseline for the in-process engine, DIR/http
for every Serve process) and adds the per-hop TTFT breakdown of ``latency_breakdown.py``.

Writes OUT/<target>_<load>_p<i>.json (serving.py's reports) and OUT/summary.json, and prints markdown.

  python benchmarks/serving_overhead.py --config cluster-configs/gpu.yaml --concurrency 64 256 --repeat 3
"""
from __future__ import annotations

import argparse
import asyncio
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
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(ROOT / "benchmarks")]
from benchmarks import serving  # noqa: E402

INGRESS_ENV = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
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


def loads(a) -> list[str]:
    """Each load's name: ``c=N`` (closed loop, N streams) or ``rate=R`` (Poisson, R req/s)."""
    return [f"c={c}" for c in a.concurrency] + [f"rate={r:g}" for r in a.rates]


def load_args(a, load: str) -> list[str]:
    kind, _, value = load.partition("=")
    if kind == "c":
        shape = ["--concurrency", value, "--num-requests", str(a.rounds * int(value))]
    else:  # the same arrival times in both targets (serving.py's seed)
        shape = ["--request-rate", value, "--num-requests", str(a.rate_requests)]
    return [*shape, "--input-len", a.input_len, "--output-len", a.output_len, "--warmup", str(a.warmup)]


# ---- the HTTP target --------------------------------------------------------------------------
def start_serve(a, out: Path) -> tuple[subprocess.Popen, str]:
    cfg = yaml.safe_load(open(a.config))
    app = cfg["applications"][0]
    app["args"].setdefault("engine", {})["num_kv_blocks"] = a.num_kv_blocks
    for d in app["deployments"]:
        if d["name"] == "Router":
            d["num_replicas"] = a.routers
    port = cfg.get("http_options", {}).get("port", 8000)
    if a.ingress == "direct":
        if a.routers != 1:
            raise SystemExit("direct ingress without HAProxy: one Router replica (its own port)")
        port = 30000
    cfg_path = Path(tempfile.mkdtemp()) / "app.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **INGRESS_ENV[a.ingress]}
    if a.trace_dir:
        env["KVRAY_TRACE_DIR"] = str(Path(a.trace_dir) / "http")
    log = open(out / "serve.log", "w")
    proc = subprocess.Popen([*cli("serve"), "run", str(cfg_path)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


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


def stop_serve(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve down on Ctrl-C
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([*cli("ray"), "stop", "--force"], capture_output=True)


async def http_pass(a, url: str, load: str, path: Path) -> dict:
    cmd = [sys.executable, serving.__file__, "--base-url", url, "--client-procs", str(a.client_procs),
           *load_args(a, load), "--out", str(path)]
    await asyncio.to_thread(subprocess.run, cmd, check=True)
    return json.loads(path.with_suffix(".json").read_text())["runs"][0]["summary"]


# ---- the in-process target --------------------------------------------------------------------
def start_baseline(a):
    if a.trace_dir:  # read by kvray.tracing at import, and inherited by the engine's child process
        os.environ["KVRAY_TRACE_DIR"] = str(Path(a.trace_dir) / "baseline")
    sa = serving.parser().parse_args(["--engine-direct", "--config", a.config, "--engine-args",
                                      json.dumps({"num_kv_blocks": a.num_kv_blocks})]
                                     + (["--engine-process"] if a.baseline == "process" else []))
    return serving.engine_from_args(sa)


async def baseline_pass(a, engine, load: str, path: Path) -> dict:
    sa = serving.parser().parse_args(["--engine-direct", *load_args(a, load), "--out", str(path)])
    rates = [None if sa.concurrency else float(sa.request_rate)]
    runs, _ = await serving.run_load(sa, serving.engine_runner(engine, sa), engine.vocab_size, engine.max_model_len,
                                     "engine", rates)
    path.with_suffix(".json").write_text(json.dumps({"args": vars(sa), "runs": runs}, indent=2, default=str))
    return runs[0]["summary"]


# ---- report -----------------------------------------------------------------------------------
def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f} ms"


def pairs_table(pairs: list[dict]) -> str:
    rows = ["| load | pair | order | streams in flight (mean, baseline) | baseline tok/s | HTTP tok/s | HTTP / baseline "
            "| baseline TTFT p50 | HTTP TTFT p50 | TTFT p50 overhead | baseline TTFT p90 | HTTP TTFT p90 |",
            "|---" * 12 + "|"]
    for p in pairs:
        b, h = p["baseline"], p["http"]
        in_flight = b["request_throughput_rps"] * b["e2e_s"]["mean"]  # Little's law
        rows.append(f"| {p['load']} | {p['pair']} | {p['order']} | {in_flight:.0f} | {b['output_tok_s']:,.0f} "
                    f"| {h['output_tok_s']:,.0f} | {h['output_tok_s'] / b['output_tok_s']:.1%} | {ms(b['ttft_s']['p50'])} "
                    f"| {ms(h['ttft_s']['p50'])} | {(h['ttft_s']['p50'] - b['ttft_s']['p50']) * 1000:+.1f} ms "
                    f"| {ms(b['ttft_s']['p90'])} | {ms(h['ttft_s']['p90'])} |")
    return "\n".join(rows)


def paired_summary(pairs: list[dict]) -> tuple[str, dict]:
    rows = ["| load | pairs | HTTP / baseline throughput: median (range) | TTFT p50 overhead: median (range) |",
            "|---|---|---|---|"]
    stats = {}
    for c in dict.fromkeys(p["load"] for p in pairs):
        ps = [p for p in pairs if p["load"] == c]
        ratio = sorted(p["http"]["output_tok_s"] / p["baseline"]["output_tok_s"] for p in ps)
        over = sorted((p["http"]["ttft_s"]["p50"] - p["baseline"]["ttft_s"]["p50"]) * 1000 for p in ps)
        stats[c] = {"throughput_ratio_median": statistics.median(ratio), "throughput_ratio_range": [ratio[0], ratio[-1]],
                    "ttft_p50_overhead_ms_median": statistics.median(over), "ttft_p50_overhead_ms_range": [over[0], over[-1]]}
        rows.append(f"| {c} | {len(ps)} | {statistics.median(ratio):.1%} ({ratio[0]:.1%} to {ratio[-1]:.1%}) "
                    f"| {statistics.median(over):+.1f} ms ({over[0]:+.1f} to {over[-1]:+.1f}) |")
    return "\n".join(rows), stats


def breakdown_tables(trace_dir: str) -> str:
    from benchmarks import latency_breakdown  # imports kvray.tracing, which reads KVRAY_TRACE_DIR once: only after start_baseline
    out = []
    for target in ("baseline", "http"):
        d = Path(trace_dir) / target
        if d.is_dir():
            rows = latency_breakdown.breakdown(latency_breakdown.load(str(d)))
            out.append(f"{target}:\n\n" + latency_breakdown.markdown(rows))
    return "\n\n".join(out)


# ---- main -------------------------------------------------------------------------------------
async def run(a, out: Path) -> list[dict]:
    proc, url = start_serve(a, out)
    engine = None
    pairs: list[dict] = []
    try:
        engine = start_baseline(a)  # loads while Serve starts
        await asyncio.to_thread(wait_healthy, url, proc, a.startup_timeout)
        await asyncio.sleep(2 * a.routers)  # every Router replica ready, not just the first to answer
        for load in loads(a):
            for i in range(a.repeat):
                order = ("baseline", "http") if i % 2 == 0 else ("http", "baseline")
                pair = {"load": load, "pair": i, "order": " then ".join(order)}
                for target in order:
                    path = out / f"{target}_{load.replace('=', '')}_p{i}"
                    pair[target] = await (baseline_pass(a, engine, load, path) if target == "baseline"
                                          else http_pass(a, url, load, path))
                pairs.append(pair)
    finally:
        if engine is not None:
            await engine.shutdown(timeout_s=5)
        stop_serve(proc)
    return pairs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "cluster-configs" / "gpu.yaml"))
    p.add_argument("--baseline", choices=("process", "thread"), default="process",
                   help="where the in-process engine's step loop runs")
    p.add_argument("--ingress", choices=sorted(INGRESS_ENV), default="haproxy")
    p.add_argument("--routers", type=int, default=4, help="Router replicas")
    p.add_argument("--concurrency", type=int, nargs="*", default=[64, 256], help="closed-loop loads")
    p.add_argument("--rates", type=float, nargs="*", default=[], help="open-loop loads: Poisson arrivals, req/s")
    p.add_argument("--rate-requests", type=int, default=1024, help="requests per open-loop pass")
    p.add_argument("--rounds", type=int, default=16, help="requests per pass = rounds x concurrency")
    p.add_argument("--input-len", default="384:640")
    p.add_argument("--output-len", default="96:160")
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="pairs of passes per load")
    p.add_argument("--num-kv-blocks", type=int, default=20000, help="the KV cache of each engine")
    p.add_argument("--client-procs", type=int, default=4, help="HTTP load generator processes")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--trace-dir", help="record per-hop times here and add the TTFT breakdown")
    p.add_argument("--out", default="out/serving_overhead")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = asyncio.run(run(a, out))
    summary_md, stats = paired_summary(pairs)
    md = pairs_table(pairs) + "\n\n" + summary_md
    if a.trace_dir:
        md += "\n\nTTFT breakdown (all passes, warmups included):\n\n" + breakdown_tables(a.trace_dir)
    print(md)
    report = {"args": vars(a), "pairs": pairs, "summary": stats, "table": md}
    (out / "summary.json").write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
