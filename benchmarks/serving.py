"""Online serving benchmark: an async HTTP load generator for kvray's OpenAI API.

Arrivals: Poisson or gamma-bursty at ``--request-rate`` (one rate or a comma list to sweep),
a closed loop of ``--concurrency`` streams, or a replay of a trace CSV (the Azure LLM traces:
TIMESTAMP, ContextTokens, GeneratedTokens; ``--dataset trace``). Prompts are random token ids
of the chosen lengths, sent as ``prompt: [ids]`` with ``ignore_eos`` so every request
generates exactly its output length.

Reports TTFT, TPOT, ITL and end-to-end latency (p50/p90/p99), output tokens/s, and per SLO
class: attainment (TTFT and TPOT both met) and goodput (SLO-meeting requests/s; with a rate
sweep also the capacity: the highest rate with attainment >= 90%). Writes a JSON file and a
PNG of latency CDFs.

``--engine-direct`` runs the same workload (same prompts, lengths and arrival times) through
``AsyncLLMEngine`` in this process, for the serving-overhead comparison.

  serve run cluster-configs/gpu.yaml &
  python benchmarks/serving.py --concurrency 64 --num-requests 512 --input-len 512 --output-len 128
  python benchmarks/serving.py --engine-direct --config cluster-configs/gpu.yaml --concurrency 64 \\
      --num-requests 512 --input-len 512 --output-len 128
  python benchmarks/serving.py --dataset trace --request-rate 2,4,8 --num-requests 500 \\
      --slo-mix interactive=0.7,batch=0.3
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"
DEFAULT_SLO = "interactive=500:50,batch=10000:200"


@dataclass
class Req:
    idx: int
    arrival_s: float  # offset from the start (open loop)
    prompt: list[int]
    output_len: int
    slo_class: str


@dataclass
class Result:
    req: Req
    ok: bool = False
    error: str = ""
    status: int | None = None  # HTTP status (None: no response)
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    num_out: int = 0
    itls: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.num_out < 2:
            return None
        return (self.e2e - self.ttft) / (self.num_out - 1)


# ---- workload ---------------------------------------------------------------------------------
def parse_slo(spec: str) -> dict[str, tuple[float, float]]:
    out = {}
    for part in filter(None, spec.split(",")):
        name, targets = part.split("=")
        ttft, tpot = targets.split(":")
        out[name.strip()] = (float(ttft), float(tpot))
    return out


def parse_mix(spec: str | None, classes: list[str]) -> list[tuple[str, float]]:
    if not spec:
        return [(classes[0], 1.0)]
    mix = [(k.strip(), float(v)) for k, v in (p.split("=") for p in spec.split(",") if p)]
    unknown = [k for k, _ in mix if k not in classes]
    if unknown:
        sys.exit(f"--slo-mix names classes not in --slo: {unknown}")
    return mix


def read_trace(path: Path) -> list[tuple[float, int, int]]:
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            t = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
            rows.append((t, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    t0 = rows[0][0]
    return [(t - t0, p, o) for t, p, o in rows]


def azure_mix_workload(a, rate: float, vocab: int, max_len: int) -> list[Req]:
    """The router simulator's workload over HTTP: the Azure code + conversation traces merged
    (conv -> interactive, code -> batch), ``--duration`` seconds of arrivals at ``rate``
    (the traces' own gaps scaled, or gamma with ``--cv``), each request generating its trace length."""
    from benchmarks.sim.workload import DEFAULT_TRACES, build_requests, merged_trace

    trace = _TRACES.get("mix")
    if trace is None:
        trace = _TRACES["mix"] = merged_trace(DEFAULT_TRACES)
    rng = random.Random(a.seed)
    sims = build_requests(trace, rate, a.duration, seed=a.seed, cv=a.cv, arrivals=a.arrivals,
                          max_model_len=max_len, max_tokens=max_len)
    return [Req(i, r.arrival, [rng.randrange(vocab) for _ in range(r.prompt_len)], r.output_len, r.slo.name)
            for i, r in enumerate(sims)]


_TRACES: dict = {}


def build_workload(a, rate: float | None, vocab: int, max_len: int) -> list[Req]:
    if a.dataset == "azure-mix":
        if not rate:
            sys.exit("--dataset azure-mix needs --request-rate")
        return azure_mix_workload(a, rate, vocab, max_len)
    rng = random.Random(a.seed)
    classes = list(parse_slo(a.slo))
    mix = parse_mix(a.slo_mix, classes)
    n = a.num_requests
    if a.dataset == "trace":
        rows = read_trace(Path(a.trace))[a.trace_offset:a.trace_offset + n]
        lengths = [(p, o) for _, p, o in rows]
        times = [t for t, _, _ in rows]
        if rate:  # scale the trace's inter-arrival times to the target mean rate
            scale = (len(times) - 1) / max(times[-1] - times[0], 1e-9) / rate
            times = [(t - times[0]) * scale for t in times]
    else:
        lengths = [(rng.randint(*a.input_len), rng.randint(*a.output_len)) for _ in range(n)]
        times, t = [], 0.0
        for _ in range(n):
            times.append(t)
            if rate:  # gamma inter-arrivals: shape = burstiness (1 = Poisson), mean 1/rate
                t += rng.gammavariate(a.burstiness, 1.0 / (rate * a.burstiness))
    reqs = []
    for i, ((p, o), t) in enumerate(zip(lengths, times)):
        p = max(1, min(p, max_len - 2))
        o = max(1, min(o, max_len - p))
        cls = rng.choices([c for c, _ in mix], weights=[w for _, w in mix])[0]
        reqs.append(Req(i, t, [rng.randrange(vocab) for _ in range(p)], o, cls))
    return reqs


# ---- drivers ----------------------------------------------------------------------------------
async def drive(reqs: list[Req], one, concurrency: int | None) -> tuple[list[Result], float]:
    """Run ``one(req) -> Result`` open loop at the arrival times, or closed loop with N workers."""
    t0 = time.monotonic()
    if concurrency:
        queue = list(reversed(reqs))
        results: list[Result] = []

        async def worker():
            while queue:
                results.append(await one(queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        async def at(r: Req):
            await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.monotonic()))
            return await one(r)

        results = list(await asyncio.gather(*(at(r) for r in reqs)))
    return results, time.monotonic() - t0


def _shard_main(a, shard: list[Req], concurrency: int | None, t0_wall: float) -> list[Result]:
    """One load-generator process: its share of the requests, timed from a common start."""
    async def go():
        import aiohttp
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=a.timeout)) as session:
            await asyncio.sleep(max(0.0, t0_wall - time.time()))
            results, _ = await drive(shard, http_runner(a, session), concurrency)
            return results
    return asyncio.run(go())


def drive_processes(a, reqs: list[Req]) -> tuple[list[Result], float]:
    """``drive`` over ``a.client_procs`` processes (requests dealt round-robin; closed loop:
    ``concurrency / procs`` streams each), so that one Python client's CPU (SSE parsing at
    thousands of chunks/s) does not delay what it measures. Times stay per-process monotonic."""
    import multiprocessing as mp
    n = a.client_procs
    shards = [reqs[i::n] for i in range(n)]
    conc = [None] * n if not a.concurrency else [a.concurrency // n + (i < a.concurrency % n) for i in range(n)]
    t0_wall = time.time() + 1.0  # every process starts its clock together
    with mp.get_context("fork").Pool(n) as pool:
        parts = pool.starmap(_shard_main, [(a, sh, c, t0_wall) for sh, c in zip(shards, conc)])
    results = [r for part in parts for r in part]
    end = max((r.start + (r.e2e or 0.0) for r in results), default=0.0)
    start = min((r.start for r in results), default=0.0)
    return sorted(results, key=lambda r: r.req.idx), max(1e-9, end - start)


def http_runner(a, session):
    import aiohttp

    url = a.base_url.rstrip("/") + "/v1/completions"

    async def one(r: Req) -> Result:
        res = Result(r, start=time.monotonic())
        # logprobs=0 makes every token produce a chunk, also tokens whose text is empty (the random
        # presets' model vocabularies are larger than their tokenizers'), so TTFT/ITL time tokens, not text
        body = {"model": a.model, "prompt": r.prompt, "max_tokens": r.output_len, "stream": True, "logprobs": 0,
                "ignore_eos": True, "temperature": a.temperature, "stream_options": {"include_usage": True}}
        last = None
        try:
            async with session.post(url, json=body, headers={"x-slo-class": r.slo_class}) as resp:
                res.status = resp.status
                if resp.status != 200:
                    res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return res
                async for raw in resp.content:
                    if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                        continue
                    now = time.monotonic()
                    chunk = json.loads(raw[6:])
                    if "error" in chunk:
                        res.error = chunk["error"]["message"]
                        return res
                    if chunk.get("usage"):
                        res.num_out = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices"):
                        if res.ttft is None:
                            res.ttft = now - res.start
                        elif last is not None:
                            res.itls.append(now - last)
                        last = now
            res.e2e = time.monotonic() - res.start
            res.ok = res.ttft is not None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            res.error = f"{type(e).__name__}: {e}"
        return res

    return one


def engine_runner(engine, a):
    from kvray import SamplingParams

    async def one(r: Req) -> Result:
        res = Result(r, start=time.monotonic())
        params = SamplingParams(temperature=a.temperature, max_tokens=r.output_len, ignore_eos=True, logprobs=0)
        last = None
        try:
            async for out in engine.generate(f"bench-{r.idx}-{random.random()}", r.prompt, params):
                now = time.monotonic()
                if out.new_token_ids:
                    if res.ttft is None:
                        res.ttft = now - res.start
                    elif last is not None:
                        res.itls.append(now - last)
                    last = now
                res.num_out = len(out.token_ids)
            res.e2e = time.monotonic() - res.start
            res.ok = True
        except Exception as e:  # noqa: BLE001
            res.error = f"{type(e).__name__}: {e}"
        return res

    return one


# ---- reporting --------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))
    return xs[k]


def dist(xs: list[float]) -> dict:
    return {"mean": sum(xs) / len(xs) if xs else None, "p50": pct(xs, 50), "p90": pct(xs, 90),
            "p99": pct(xs, 99), "n": len(xs)}


def summarize(results: list[Result], duration: float, slo: dict[str, tuple[float, float]]) -> dict:
    ok = [r for r in results if r.ok]

    from kvray.slo import SLOTarget  # the serving side's own rule (a leaf module: no Ray, no torch)

    targets = {name: SLOTarget(name, ttft_ms, tpot_ms) for name, (ttft_ms, tpot_ms) in slo.items()}

    def attained(r: Result) -> bool:
        return targets[r.req.slo_class].attained(r.ttft, r.tpot)

    per_class = {}
    for cls in sorted({r.req.slo_class for r in results}):
        rs = [r for r in results if r.req.slo_class == cls]
        met = sum(1 for r in rs if r.ok and attained(r))
        rejected = sum(1 for r in rs if r.status == 429)
        admitted = len(rs) - rejected
        per_class[cls] = {"requests": len(rs), "errors": sum(not r.ok for r in rs), "rejected_429": rejected,
                          "attainment": met / len(rs) if rs else None, "goodput_rps": met / duration,
                          "attainment_of_admitted": met / admitted if admitted else None,
                          "ttft_ms_target": slo[cls][0], "tpot_ms_target": slo[cls][1]}
    out_tokens = sum(r.num_out for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "first_errors": [r.error for r in results if not r.ok][:5], "duration_s": duration,
        "request_throughput_rps": len(ok) / duration, "output_tok_s": out_tokens / duration,
        "total_tok_s": (out_tokens + sum(len(r.req.prompt) for r in ok)) / duration,
        "ttft_s": dist([r.ttft for r in ok]), "tpot_s": dist([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": dist([x for r in ok for x in r.itls]), "e2e_s": dist([r.e2e for r in ok]),
        "attainment": (sum(1 for r in ok if attained(r)) / len(results)) if results else None,
        "per_class": per_class,
    }


def capacity(runs: list[dict]) -> dict:
    """Per mode and class: the highest tested rate whose attainment is >= 90%."""
    out: dict = {}
    for run in runs:
        if run.get("rate") is None:
            continue
        for cls, c in run["summary"]["per_class"].items():
            best = out.setdefault(run["mode"], {}).setdefault(cls, None)
            if c["attainment"] is not None and c["attainment"] >= 0.9 and (best is None or run["rate"] > best):
                out[run["mode"]][cls] = run["rate"]
    return out


def plot(runs: list[dict], raw: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, key, title in zip(axes.flat, ("ttft", "tpot", "itl", "e2e"), ("TTFT", "TPOT", "ITL", "end-to-end")):
        for run in runs:
            xs = sorted(raw[run["label"]][key])
            if xs:
                # chunks read in one socket read have a 0 gap: show them at 1 us on the log axis
                ax.plot([max(x * 1000, 1e-3) for x in xs], [(i + 1) / len(xs) for i in range(len(xs))],
                        label=run["label"])
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_summary(label: str, s: dict) -> None:
    def ms(d, k):
        return "-" if d[k] is None else f"{d[k] * 1000:.1f}"

    print(f"\n== {label}: {s['completed']}/{s['requests']} ok in {s['duration_s']:.1f}s, "
          f"{s['output_tok_s']:.1f} out tok/s, {s['request_throughput_rps']:.2f} req/s")
    for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        d = s[k]
        print(f"   {k[:-2]:5s} ms  p50 {ms(d, 'p50'):>8}  p90 {ms(d, 'p90'):>8}  p99 {ms(d, 'p99'):>8}")
    for cls, c in s["per_class"].items():
        adm = c["attainment_of_admitted"]
        print(f"   {cls}: attainment {c['attainment']:.1%}, goodput {c['goodput_rps']:.2f} req/s, "
              f"429s {c['rejected_429']}, attainment of admitted {'-' if adm is None else f'{adm:.1%}'}")
    if s["first_errors"]:
        print("   errors:", s["first_errors"])


# ---- main -------------------------------------------------------------------------------------
def engine_from_args(a):
    from kvray.replica.async_engine import AsyncLLMEngine
    from kvray.replica.config import EngineConfig

    if a.config:
        import yaml

        from kvray.app_config import parse_args
        cfg = yaml.safe_load(open(a.config))
        app_args = parse_args(cfg["applications"][0]["args"])
        model, options = app_args.model, app_args.engine_options()
    else:
        model, options = a.engine_model, {}
    options.update(json.loads(a.engine_args or "{}"))
    return AsyncLLMEngine(EngineConfig(model=model, **options), process=a.engine_process)


async def run_load(a, one, vocab: int, max_len: int, mode: str, rates: list[float | None]) -> tuple[list[dict], dict]:
    """Warm up with ``a.warmup`` requests, then run the workload at each rate through ``one``."""
    runs, raw = [], {}
    slo = parse_slo(a.slo)
    if a.warmup:  # the workload's own first requests, with different token ids, all at once
        dataset = "random" if a.dataset == "azure-mix" else a.dataset
        warm = build_workload(argparse.Namespace(**{**vars(a), "num_requests": a.warmup, "seed": a.seed + 1,
                                                    "dataset": dataset}), None, vocab, max_len)
        await drive(warm, one, a.warmup)
    for rate in rates:
        reqs = build_workload(a, rate, vocab, max_len)
        if a.client_procs > 1 and mode == "http":
            results, duration = await asyncio.to_thread(drive_processes, a, reqs)
        else:
            results, duration = await drive(reqs, one, a.concurrency)
        label = f"{mode} " + (f"c={a.concurrency}" if a.concurrency else f"{rate or 'trace'} req/s")
        s = summarize(results, duration, slo)
        print_summary(label, s)
        runs.append({"mode": mode, "label": label, "rate": rate, "concurrency": a.concurrency, "summary": s})
        raw[label] = {"ttft": [r.ttft for r in results if r.ok], "tpot": [r.tpot for r in results if r.tpot],
                      "itl": [x for r in results if r.ok for x in r.itls],
                      "e2e": [r.e2e for r in results if r.ok]}
    return runs, raw


async def run_mode(a, rates: list[float | None]) -> tuple[list[dict], dict]:
    if a.engine_direct:
        engine = engine_from_args(a)
        try:
            return await run_load(a, engine_runner(engine, a), engine.vocab_size, engine.max_model_len, "engine",
                                  rates)
        finally:
            await engine.shutdown(timeout_s=5)
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=a.timeout)) as session:
        async with session.get(a.base_url.rstrip("/") + "/v1/models") as resp:
            info = (await resp.json())["data"][0]
        a.model = a.model or info["id"]
        vocab = a.vocab_size or info.get("vocab_size") or 1000
        max_len = a.max_model_len or info.get("max_model_len") or 2048
        return await run_load(a, http_runner(a, session), vocab, max_len, "http", rates)


def parse_range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--engine-direct", action="store_true", help="run through AsyncLLMEngine in-process")
    p.add_argument("--engine-process", action="store_true",
                   help="engine-direct: run the step loop in a child process (as LLMReplica does), not a thread")
    p.add_argument("--config", help="engine-direct: take model and engine options from this Serve config")
    p.add_argument("--engine-model", default="kvray:tiny-qwen3", help="engine-direct model without --config")
    p.add_argument("--engine-args", help="engine-direct: JSON of extra EngineConfig options")
    p.add_argument("--dataset", choices=("random", "trace", "azure-mix"), default="random",
                   help="azure-mix: the router simulator's workload (code -> batch, conv -> interactive)")
    p.add_argument("--duration", type=float, default=60.0, help="azure-mix: seconds of arrivals per rate")
    p.add_argument("--arrivals", choices=("trace", "gamma"), default="trace", help="azure-mix arrivals")
    p.add_argument("--cv", type=float, default=2.0, help="azure-mix gamma arrivals: coefficient of variation")
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)")
    p.add_argument("--trace-offset", type=int, default=0, help="skip this many trace rows")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--input-len", type=parse_range, default=(128, 512), help="N or LO:HI (uniform)")
    p.add_argument("--output-len", type=parse_range, default=(32, 256), help="N or LO:HI (uniform)")
    p.add_argument("--request-rate", default=None, help="req/s, or a comma list to sweep (omit: all at once "
                   "for random data, the trace's own timing for traces)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1 = Poisson, "
                   "< 1 burstier)")
    p.add_argument("--concurrency", type=int, default=None, help="closed loop with N streams (ignores rates)")
    p.add_argument("--slo", default=DEFAULT_SLO, help="class=ttft_ms:tpot_ms,... (as in the app config)")
    p.add_argument("--slo-mix", default=None, help="class=weight,... (default: all in the first class)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--client-procs", type=int, default=1, help="HTTP: spread the load generator over N "
                   "processes (closed loop: concurrency/N streams each)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="serving_results", help="writes OUT.json and OUT.png")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    rates = [float(x) for x in a.request_rate.split(",")] if a.request_rate else [None]
    if a.concurrency:
        rates = [None]
    runs, raw = asyncio.run(run_mode(a, rates))
    report = {"args": {k: v for k, v in vars(a).items()}, "runs": runs, "capacity_rps_at_90pct": capacity(runs)}
    Path(a.out + ".json").write_text(json.dumps(report, indent=2, default=str))
    try:
        plot(runs, raw, Path(a.out + ".png"))
        print(f"\nwrote {a.out}.json and {a.out}.png")
    except ImportError:  # no matplotlib (the GPU image): the JSON has the numbers
        print(f"\nwrote {a.out}.json (no matplotlib: no PNG)")
    return report


if __name__ == "__main__":
    main()
