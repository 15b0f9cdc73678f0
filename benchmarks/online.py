"""Online replay: the workload users actually send, engine-direct and over HTTP, in one command.

Request lengths are drawn (``random.Random(--seed)``) from the Azure LLM conversation trace, the
prompt clipped to ``--max-prompt`` tokens and the output to ``--max-output`` (and both to fit
max_model_len), or fixed with ``--fixed P:O``; prompts are random token ids, greedy, ignore_eos.
Arrivals are Poisson (gamma with ``--burstiness`` < 1) at each of ``--rates`` for ``--duration``
seconds, ``--passes`` times per rate in the same engine, each pass with fresh lengths and ids
from the same random stream; ``--all-at-once N`` adds N requests arriving together (throughput
and TPOT only). A warm-up of ``--warmup`` requests runs first on each target.

Targets (``--targets``): ``engine`` is ``AsyncLLMEngine`` with its step loop in a child process,
as the serving replica runs it, driven from this process; ``http`` is the same workload streamed
through ``/v1/completions`` of ``--base-url``, or of ``serve run`` of ``--config`` started here
(serving_overhead.py's way, ``--ingress``). With both, both stay up on the same device with the
same fixed ``--num-kv-blocks``, and passes alternate: engine first on even passes, http first on
odd ones, so drift hits both.

Reports per target and (rate, pass): output tok/s, TTFT and TPOT p50/p90/p99, requests, errors,
attainment at ``--slo`` (TTFT ms:TPOT ms; errors are misses); min and median over passes;
goodput (the highest rate whose median attainment is >= 90%); http/engine comparisons; on CUDA
the all-at-once tok/s as a fraction of the hardware floor (offline_throughput.py's).

  python benchmarks/online.py --config cluster-configs/gpu.yaml --rates 25,50,100 --passes 3 \\
      --all-at-once 1000 --out online_h200 --results
  python benchmarks/online.py --targets engine,http --config cluster-configs/gpu.yaml --rates 25,50 \\
      --out online_http
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(ROOT / "benchmarks")]
from benchmarks import serving  # noqa: E402
from benchmarks import serving_overhead  # noqa: E402

SLO_CLASS = "interactive"
FIGURES = ("tok_s", "ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50", "tpot_p90", "tpot_p99", "attainment")
TARGETS = ("engine", "http")  # also the order of even passes


# ---- workload ---------------------------------------------------------------------------------
@functools.lru_cache
def trace_lengths(path: str) -> list[tuple[int, int]]:
    """(ContextTokens, GeneratedTokens) of every trace row."""
    return [(p, o) for _, p, o in serving.read_trace(Path(path))]


def clip(p: int, o: int, max_prompt: int, max_output: int, max_model_len: int) -> tuple[int, int]:
    p = max(1, min(p, max_prompt, max_model_len - 1))
    return p, max(1, min(o, max_output, max_model_len - p))


def build_requests(rng: random.Random, lengths: list[tuple[int, int]] | None, *, vocab: int, max_model_len: int,
                   max_prompt: int = 4096, max_output: int = 1024, rate: float | None = None,
                   duration: float = 0.0, n: int = 0, burstiness: float = 1.0,
                   fixed: tuple[int, int] | None = None) -> list[serving.Req]:
    """``rate`` None: ``n`` requests at t=0; else gamma arrivals (shape ``burstiness``, 1 = Poisson,
    mean gap 1/rate) from t=0 for ``duration`` s. Lengths from ``lengths`` (or ``fixed``), clipped."""
    times = [0.0] * n
    if rate is not None:
        times, t = [], 0.0
        while t < duration:
            times.append(t)
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    reqs = []
    for i, t in enumerate(times):
        p, o = clip(*(fixed or rng.choice(lengths)), max_prompt, max_output, max_model_len)
        reqs.append(serving.Req(i, t, rng.choices(range(vocab), k=p), o, SLO_CLASS))
    return reqs


def parse_rates(spec: str, passes: int) -> list[tuple[float, int]]:
    """``"25x5,50,100"`` -> [(25, 5), (50, passes), (100, passes)]: a rate, and its passes if given."""
    out = []
    for part in filter(None, (x.strip() for x in spec.split(","))):
        rate, _, n = part.partition("x")
        out.append((float(rate), int(n) if n else passes))
    return out


def parse_pair(spec: str) -> tuple[float, float]:
    a, _, b = spec.partition(":")
    return float(a), float(b)


# ---- figures ----------------------------------------------------------------------------------
def figures(s: dict, all_at_once: bool = False) -> dict:
    """serving.summarize's summary -> the figures reported (ms); all at once: no TTFT/attainment."""
    f = {"requests": s["requests"], "errors": s["errors"], "tok_s": s["output_tok_s"], "attainment": s["attainment"]}
    for k in FIGURES[1:7]:
        v = s[k[:4] + "_s"][k[5:]]
        f[k] = None if v is None else v * 1000
    if all_at_once:
        f.update(ttft_p50=None, ttft_p90=None, ttft_p99=None, attainment=None)
    return f


def load_key(rate: float | None) -> str:
    return "all" if rate is None else f"{rate:g}"


def by_load(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(load_key(r["rate"]), []).append(r)
    return out


def min_median(figs: list[dict], keys=(*FIGURES, "errors")) -> dict:
    """Over passes: {figure: {"min", "median"}}, skipping missing values."""
    out = {}
    for k in keys:
        xs = [f[k] for f in figs if f.get(k) is not None]
        out[k] = {"min": min(xs) if xs else None, "median": statistics.median(xs) if xs else None}
    return out


def per_load(runs: list[dict]) -> dict[str, dict]:
    """runs ({"rate", "pass", "figures"}) -> {load: passes and min/median over them}, in run order."""
    return {k: {"passes": len(rs), **min_median([r["figures"] for r in rs])} for k, rs in by_load(runs).items()}


def goodput(runs: list[dict], threshold: float = 0.9) -> float | None:
    """The highest measured rate whose attainment, median over its passes, is >= threshold."""
    ok = [rs[0]["rate"] for rs in by_load(runs).values() if rs[0]["rate"] is not None
          and (m := min_median([r["figures"] for r in rs], ["attainment"])["attainment"]["median"]) is not None
          and m >= threshold]
    return max(ok) if ok else None


COMPARED = ("tok_s_ratio", "ttft_p50_diff_ms", "tpot_p50_diff_ms", "attainment_diff_pts")


def compare(engine_runs: list[dict], http_runs: list[dict]) -> dict:
    """Each http pass against the engine pass of the same load and index, and the median per load."""
    def diff(h, e, k, scale=1.0):
        return None if h[k] is None or e[k] is None else (h[k] - e[k]) * scale

    eng = {(r["rate"], r["pass"]): r["figures"] for r in engine_runs}
    rows = []
    for r in http_runs:
        e, h = eng.get((r["rate"], r["pass"])), r["figures"]
        if e is not None:
            rows.append({"rate": r["rate"], "pass": r["pass"],
                         "tok_s_ratio": h["tok_s"] / e["tok_s"] if e["tok_s"] else None,
                         "ttft_p50_diff_ms": diff(h, e, "ttft_p50"), "tpot_p50_diff_ms": diff(h, e, "tpot_p50"),
                         "attainment_diff_pts": diff(h, e, "attainment", 100.0)})
    median = {k: {c: v["median"] for c, v in min_median(rs, COMPARED).items()} for k, rs in by_load(rows).items()}
    return {"passes": rows, "median": median}


# ---- markdown ---------------------------------------------------------------------------------
def fmt(x, spec: str = ",.0f") -> str:
    return "-" if x is None else f"{x:{spec}}"


def pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def ms_spec(k: str) -> str:
    return ".2f" if k.startswith("tpot") else ".1f"


def render_markdown(report: dict) -> str:
    a = report["args"]
    arrivals = "Poisson" if a["burstiness"] == 1 else f"gamma (shape {a['burstiness']:g})"
    source = f"fixed {a['fixed']}" if a["fixed"] else "from the Azure conversation trace"
    lines = [f"\n### Online replay — {report['device']} — {report['date']}\n", f"Command: `{report['command']}`  ",
             f"Commit {report.get('commit') or '-'}; model {report.get('model')}, "
             f"max_model_len {report['max_model_len']}; "
             f"lengths {source} (prompt <= {a['max_prompt']}, output <= {a['max_output']}), seed {a['seed']}; "
             f"{arrivals} arrivals for {a['duration']:g} s per pass; "
             f"SLO {a['slo']} (TTFT ms : TPOT ms). Times in ms.\n"]
    for name, t in report["targets"].items():
        lines += [f"**{name}**\n", "| rate req/s | pass | requests | errors | tok/s | TTFT p50 | TTFT p90 | TTFT p99 "
                  "| TPOT p50 | TPOT p90 | TPOT p99 | attainment |", "|---" * 12 + "|"]
        for r in t["runs"]:
            f = r["figures"]
            lines.append(f"| {load_key(r['rate'])} | {r['pass']} | {f['requests']} | {f['errors']} "
                         f"| {fmt(f['tok_s'])} | "
                         + " | ".join(fmt(f[k], ms_spec(k)) for k in FIGURES[1:7]) + f" | {pct(f['attainment'])} |")
        lines += ["", "| load | passes | min / median: tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 "
                  "| attainment |",
                  "|---" * 8 + "|"]
        for load, m in t["per_load"].items():
            cells = [f"{fmt(m[k]['min'], ms_spec(k))} / {fmt(m[k]['median'], ms_spec(k))}"
                     for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")]
            lines.append(f"| {load} | {m['passes']} | {fmt(m['tok_s']['min'])} / {fmt(m['tok_s']['median'])} | "
                         + " | ".join(cells) + f" | {pct(m['attainment']['min'])} / {pct(m['attainment']['median'])} |")
        g = t["goodput_rps"]
        lines.append(f"\nGoodput ({name}, median attainment >= 90%): "
                     f"{'none of the rates' if g is None else f'{g:g} req/s'}.")
        floors = [r for r in t["runs"] if r["rate"] is None]
        if floors:
            fl = "; ".join(f"pass {r['pass']}: {fmt(r['figures']['tok_s'])} of {fmt(r.get('floor_tok_s'))} tok/s = "
                           f"{pct(r.get('of_floor'))}" for r in floors)
            if len(floors) > 1 and floors[0].get("of_floor"):
                m = min_median(floors, ["of_floor"])["of_floor"]
                fl += f" (min {pct(m['min'])}, median {pct(m['median'])})"
            lines.append(f"All at once ({a['all_at_once']} requests) against the hardware floor: "
                         f"{fl if floors[0].get('floor_tok_s') else 'no floor (not on CUDA)'}.")
        lines.append("")
    if report.get("comparison"):
        lines += ["**http / engine**\n", "| rate req/s | pass | tok/s http / engine | TTFT p50 http - engine "
                  "| TPOT p50 http - engine | attainment http - engine (pts) |", "|---" * 6 + "|"]
        cmp = report["comparison"]
        for load, rows in by_load(cmp["passes"]).items():
            for c in rows + ([{"pass": "median", **cmp["median"][load]}] if len(rows) > 1 else []):
                lines.append(f"| {load} | {c['pass']} | {pct(c['tok_s_ratio'])} | {fmt(c['ttft_p50_diff_ms'], '+.1f')} "
                             f"| {fmt(c['tpot_p50_diff_ms'], '+.2f')} | {fmt(c['attainment_diff_pts'], '+.1f')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ---- targets ----------------------------------------------------------------------------------
def app_config(a) -> dict:
    import yaml
    return yaml.safe_load(open(a.config))


# The benchmark measures what the engine sustains, not its admission control: unbounded queues
# (a replica's default limit answers 429 once about a batch of requests waits; --engine-args
# can set the limits back).
UNBOUNDED_QUEUE = {"max_queued_requests": 10**6, "max_queued_prompt_tokens": 10**9}


def engine_overrides(a) -> dict:
    return {**UNBOUNDED_QUEUE, **({"num_kv_blocks": a.num_kv_blocks} if a.num_kv_blocks else {}),
            **json.loads(a.engine_args or "{}")}


def model_name(a) -> str:
    if not a.config:
        return a.model
    from kvray.app_config import parse_args
    return parse_args(app_config(a)["applications"][0]["args"]).model


def start_engine(a):
    """AsyncLLMEngine from --config / --model and the overrides, through serving.engine_from_args."""
    sa = argparse.Namespace(config=a.config, engine_model=a.model, engine_args=json.dumps(engine_overrides(a)),
                            engine_process=not a.engine_thread)
    return serving.engine_from_args(sa)


def start_http(a, out_dir: Path):
    """``serve run`` of --config with the same engine overrides, through serving_overhead.start_serve."""
    import yaml
    cfg = app_config(a)
    app = cfg["applications"][0]
    engine = app["args"].setdefault("engine", {})
    engine.update(engine_overrides(a))
    path = out_dir / "online_app.yaml"
    path.write_text(yaml.safe_dump(cfg))
    routers = a.routers or next((d.get("num_replicas", 1) for d in app.get("deployments", [])
                                 if d["name"] == "Router"), 1)
    sa = argparse.Namespace(config=str(path), num_kv_blocks=engine.get("num_kv_blocks"), routers=routers,
                            ingress=a.ingress, trace_dir=None)
    return (*serving_overhead.start_serve(sa, out_dir), routers)


async def open_targets(a, names: list[str], out_dir: Path, stack: contextlib.AsyncExitStack) -> dict[str, dict]:
    """Each target's request runner, vocabulary and max_model_len; ``stack`` shuts them down."""
    targets, proc = {}, None
    if "http" in names and not a.base_url:
        proc, url, routers = start_http(a, out_dir)
        stack.callback(serving_overhead.stop_serve, proc)
    if "engine" in names:  # loads while Serve starts
        engine = start_engine(a)
        stack.push_async_callback(engine.shutdown, timeout_s=5)
        targets["engine"] = {"one": serving.engine_runner(engine, argparse.Namespace(temperature=0.0)),
                             "vocab": engine.vocab_size, "max_len": engine.max_model_len}
    if "http" in names:
        import aiohttp
        url = (a.base_url or url).rstrip("/")
        if proc is not None:
            await asyncio.to_thread(serving_overhead.wait_healthy, url, proc, a.startup_timeout)
            await asyncio.sleep(2 * routers)  # every Router replica ready, not just the first to answer
        session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=a.timeout)))
        async with session.get(url + "/v1/models") as resp:
            info = (await resp.json())["data"][0]
        sa = argparse.Namespace(base_url=url, model=info["id"], temperature=0.0, timeout=a.timeout,
                                client_procs=a.client_procs, concurrency=None)
        targets["http"] = {"one": serving.http_runner(sa, session), "sa": sa, "vocab": info.get("vocab_size") or 1000,
                           "max_len": info.get("max_model_len") or 2048}
    return targets


async def run_pass(a, name: str, t: dict, reqs: list[serving.Req], slo: tuple[float, float]) -> dict:
    if name == "http" and a.client_procs > 1:
        results, duration = await asyncio.to_thread(serving.drive_processes, t["sa"], reqs)
    else:
        results, duration = await serving.drive(reqs, t["one"], None)
    return serving.summarize(results, duration, {SLO_CLASS: slo})


def floor_setup(model: str, ceilings: tuple[float, float] | None = None) -> dict | None:
    """The all-at-once floor as offline_throughput.py computes it: the model's config and bf16 weight
    bytes, and the copy bandwidth and matmul rate (``ceilings``; default: measured, CUDA only). For
    an MoE model the config makes it count the experts each decode step touches and the active
    parameters (offline_throughput.decode_weights)."""
    import torch
    if ceilings is None and not torch.cuda.is_available():
        print("no CUDA device: no hardware floor for the all-at-once set", flush=True)
        return None
    from benchmarks import offline_throughput
    from kvray.replica.models.loader import load_config, model_class, resolve_model
    if ceilings is None:
        ceilings = offline_throughput.measure_ceilings()
        torch.cuda.empty_cache()
    copy_bw, mm_rate = ceilings
    print(f"ceilings: copy {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s", flush=True)
    cfg = load_config(resolve_model(model))
    meta = model_class(cfg)(cfg, dtype=torch.bfloat16, device=torch.device("meta"))
    weight_bytes = 2 * sum(p.numel() for p in meta.parameters())
    return {"copy_bw": copy_bw, "mm_rate": mm_rate, "weight_bytes": weight_bytes,
            "of": lambda reqs: offline_throughput.floor_tok_s(
                cfg, [r.prompt for r in reqs], [r.output_len for r in reqs], copy_bw, mm_rate, weight_bytes)["floor_tok_s"]}


async def run(a, report: dict) -> None:
    """Warm-up, then every (rate, pass) and all-at-once pass on each target in alternating order."""
    slo = parse_pair(a.slo)
    names = [t for t in TARGETS if t in a.targets.split(",")]
    floor = floor_setup(report["model"]) if a.all_at_once else None
    out_dir = Path(a.out).resolve().parent if a.out else Path(tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    async with contextlib.AsyncExitStack() as stack:
        targets = await open_targets(a, names, out_dir, stack)
        vocab, max_len = min(t["vocab"] for t in targets.values()), min(t["max_len"] for t in targets.values())
        report.update(vocab=vocab, max_model_len=max_len)
        fixed = tuple(int(x) for x in parse_pair(a.fixed)) if a.fixed else None
        lengths = None if fixed else trace_lengths(a.trace)
        shape = dict(vocab=vocab, max_model_len=max_len, max_prompt=a.max_prompt, max_output=a.max_output,
                     burstiness=a.burstiness, fixed=fixed)
        if a.warmup:
            warm = build_requests(random.Random(a.seed + 1), lengths, n=a.warmup, **shape)
            for name in names:
                await serving.drive(warm, targets[name]["one"], None)
        rng = random.Random(a.seed)
        loads = [(rate, p) for rate, n in parse_rates(a.rates, a.passes) for p in range(n)]
        loads += [(None, p) for p in range(a.passes)] if a.all_at_once else []
        for rate, p in loads:
            reqs = build_requests(rng, lengths, rate=rate, duration=a.duration, n=a.all_at_once, **shape)
            fl = floor["of"](reqs) if rate is None and floor else None
            for pos, name in enumerate(names if p % 2 == 0 else names[::-1]):
                s = await run_pass(a, name, targets[name], reqs, slo)
                f = figures(s, rate is None)
                runs[name].append({"rate": rate, "pass": p, "position": pos, "figures": f, "summary": s,
                                   **({"floor_tok_s": fl, "of_floor": f["tok_s"] / fl} if fl else {})})
                print(f"{name} {load_key(rate)} pass {p}: {f['requests']} requests, {f['errors']} errors, "
                      f"{f['tok_s']:,.0f} tok/s, TTFT p50 {fmt(f['ttft_p50'], '.1f')} ms, "
                      f"TPOT p50 {fmt(f['tpot_p50'], '.2f')} ms, attainment {pct(f['attainment'])}", flush=True)
    report["targets"] = {name: {"runs": rs, "per_load": per_load(rs), "goodput_rps": goodput(rs)}
                         for name, rs in runs.items()}
    if len(names) == 2:
        report["comparison"] = compare(runs["engine"], runs["http"])
    if floor:
        report["ceilings"] = {k: floor[k] for k in ("copy_bw", "mm_rate", "weight_bytes")}


# ---- output -----------------------------------------------------------------------------------
def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, k in zip(axes.flat, ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")):
        for name, t in report["targets"].items():
            pts = sorted((float(load), m[k]["median"]) for load, m in t["per_load"].items()
                         if load != "all" and m[k]["median"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(f"{k.replace('_', ' ').upper()} (median over passes)")
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="engine", help="comma list of engine, http")
    p.add_argument("--config", help="Serve config: the engine's options (applications[0].args), and the app "
                   "that the http target starts")
    p.add_argument("--model", default="kvray:qwen3-0.6b", help="engine model without --config")
    p.add_argument("--engine-args", help="JSON of EngineConfig overrides (both targets)")
    p.add_argument("--engine-thread", action="store_true", help="engine step loop in a thread, not a child process")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="fixed KV cache of each engine (default: the "
                   "engine's own sizing; 20000 when both targets share this machine)")
    p.add_argument("--base-url", help="http: a running app (default: start serve run --config here)")
    p.add_argument("--ingress", choices=sorted(serving_overhead.INGRESS_ENV), default="haproxy",
                   help="http started here: how requests reach the Router replicas (serving_overhead.py)")
    p.add_argument("--routers", type=int, default=None, help="http started here: Router replicas (default: "
                   "the config's)")
    p.add_argument("--client-procs", type=int, default=4, help="http: load generator processes")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--trace", default=str(serving.DEFAULT_TRACE), help="trace CSV the lengths come from")
    p.add_argument("--max-prompt", type=int, default=4096)
    p.add_argument("--max-output", type=int, default=1024)
    p.add_argument("--fixed", default=None, help="PROMPT:OUTPUT lengths instead of the trace's")
    p.add_argument("--rates", default="25,50,100", help="comma list of arrival rates, req/s; RATExN: N passes of it")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per pass")
    p.add_argument("--passes", type=int, default=1, help="passes per rate without its own xN (and of --all-at-once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    p.add_argument("--all-at-once", type=int, default=0, help="also N requests arriving at t=0")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--slo", default="500:50", help="TTFT ms:TPOT ms")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", help="writes OUT.json and OUT.png")
    p.add_argument("--results", action="store_true", help="append the markdown to benchmarks/RESULTS.md")
    return p


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    a = parser().parse_args(argv)
    names = set(a.targets.split(","))
    if not names or names - set(TARGETS):
        sys.exit(f"--targets: a comma list of {', '.join(TARGETS)}")
    if "http" in names and not a.base_url and not a.config:
        sys.exit("--targets http needs --base-url or --config (to start serve run)")
    if a.num_kv_blocks is None and names == set(TARGETS) and not a.base_url:
        a.num_kv_blocks = 20000
    report = {"command": shlex.join(["python", "benchmarks/online.py", *argv]), "args": vars(a),
              "device": device_name(), "commit": git_commit(), "date": str(date.today()), "model": model_name(a)}
    asyncio.run(run(a, report))
    md = render_markdown(report)
    print(md)
    if a.out:
        Path(a.out + ".json").write_text(json.dumps(report, indent=1, default=str))
        try:
            plot(report, Path(a.out + ".png"))
            print(f"wrote {a.out}.json and {a.out}.png")
        except ImportError:  # the GPU image has no matplotlib: the JSON has the numbers
            print(f"wrote {a.out}.json (no matplotlib: no PNG)")
    if a.results:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(md)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "online_results.md").write_text(md)
    return report


if __name__ == "__main__":
    main()
