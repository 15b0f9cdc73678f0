"""Load programs: windows of arrivals at multiples of a replica's goodput, judged window by window
in the same way for the simulator and for real replicas over HTTP (issue 27's single-GPU
fidelity and overload runs).

A program is a list of ``Phase``s played back to back (a phase of rate 0 is a pause that lets
the queues drain between windows). ``program_requests`` draws the requests of every phase from
the merged Azure code + conversation trace (conv -> interactive, code -> batch), Poisson or
gamma arrivals, each request asking for exactly its trace output length (``max_tokens``), so
the simulator and the HTTP client replay the same requests. Each request ends as an
``Outcome``: served (first token and mean TPOT so far), refused (429), or unanswered by the
cut-off (``timeout``: the run stops ``drain_s`` after the last arrival; requests still running
then are judged on the tokens they produced so far). ``summarize_windows`` turns outcomes into
per-window, per-class figures: attainment (429s and timeouts are misses), goodput (requests/s
that met their SLO), 429s, timeouts, TTFT and TPOT percentiles of the admitted requests.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from benchmarks.sim.workload import SimRequest, TraceRow, build_requests


@dataclass(frozen=True)
class Phase:
    label: str         # the window's name in reports; "" for a pause
    rate: float        # requests per second
    duration_s: float


@dataclass
class Outcome:
    rid: int
    window: str
    slo_class: str
    arrival: float                 # seconds from the program's start
    status: str                    # "ok" | "rejected" (429) | "timeout" | "error"
    ttft: float | None = None
    tpot: float | None = None      # mean seconds per token after the first (None with < 2 tokens)
    n_out: int = 0


def overload_program(goodput: float, *, levels=(1.0, 1.5, 2.0), window_s: float = 15.0, overload_s: float = 20.0,
                     settle_s: float = 10.0, gap_s: float = 3.0, burst_base: float = 0.7, burst_factor: float = 10.0,
                     burst_s: float = 10.0) -> list[Phase]:
    """First a burst of ``burst_factor`` x the base load for ``burst_s`` on top of
    ``burst_base`` x ``goodput`` (windows "<base>x" -- the lowest load, before the burst --,
    "burst" and "after burst"), then windows at ``levels`` x ``goodput`` with pauses between
    them. A window above 1x runs ``settle_s`` at its load first (not judged: a queue takes a
    while to build up) and is judged over the next ``overload_s``."""
    if goodput <= 0:
        raise ValueError(f"goodput must be > 0, got {goodput}")
    phases: list[Phase] = []
    base = burst_base * goodput
    if burst_s > 0:
        phases += [Phase(f"{burst_base:g}x", base, burst_s), Phase("burst", base * burst_factor, burst_s),
                   Phase("after burst", base, burst_s), Phase("", 0.0, gap_s)]
    for m in levels:
        if m > 1.0 and settle_s > 0:
            phases.append(Phase("", m * goodput, settle_s))
        phases += [Phase(f"{m:g}x", m * goodput, overload_s if m > 1.0 else window_s), Phase("", 0.0, gap_s)]
    return phases[:-1]


def program_requests(trace: list[TraceRow], phases: list[Phase], *, seed: int = 0, cv: float = 1.0,
                     max_model_len: int = 8192) -> list[tuple[SimRequest, str]]:
    """Every phase's requests (arrival times from the program's start, ids in arrival order),
    each with its window label. Each request asks for exactly its output length."""
    out: list[tuple[SimRequest, str]] = []
    start = 0.0
    for k, ph in enumerate(phases):
        if ph.rate > 0:
            reqs = build_requests(trace, ph.rate, ph.duration_s, seed=seed * 1000 + k, cv=cv, arrivals="gamma",
                                  max_model_len=max_model_len, max_tokens=max_model_len)
            for r in reqs:
                r.arrival += start
                r.max_tokens = r.output_len
                out.append((r, ph.label))
        start += ph.duration_s
    out.sort(key=lambda x: x[0].arrival)
    for i, (r, _) in enumerate(out):
        r.rid = i
    return out


def window_durations(phases: list[Phase]) -> dict[str, float]:
    d: dict[str, float] = {}
    for ph in phases:
        if ph.label:
            d[ph.label] = d.get(ph.label, 0.0) + ph.duration_s
    return d


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]


def summarize_windows(outcomes: list[Outcome], phases: list[Phase], targets: dict) -> dict:
    """``{window: {"classes": {class: figures}, "goodput_rps", "min_attainment", "rate"}}``;
    ``targets`` maps class -> ``kvray.slo.SLOTarget``."""
    durations = window_durations(phases)
    rates = {ph.label: ph.rate for ph in phases if ph.label}
    out: dict = {}
    for window, dur in durations.items():
        mine = [o for o in outcomes if o.window == window]
        classes = {}
        for cls in sorted({o.slo_class for o in mine}):
            rows = [o for o in mine if o.slo_class == cls]
            served = [o for o in rows if o.status == "ok"]
            met = sum(targets[cls].attained(o.ttft, o.tpot) for o in served)
            ttfts = [o.ttft for o in served]
            tpots = [o.tpot for o in served if o.tpot is not None]
            classes[cls] = {
                "n": len(rows), "attained": met, "attainment": met / len(rows) if rows else None,
                "goodput_rps": met / dur, "rejected": sum(o.status == "rejected" for o in rows),
                "timeouts": sum(o.status == "timeout" for o in rows), "errors": sum(o.status == "error" for o in rows),
                **{f"ttft_p{p}": pct(ttfts, p) for p in (50, 90, 99)},
                **{f"tpot_p{p}": pct(tpots, p) for p in (50, 90, 99)},
            }
        met_all = sum(c["attained"] for c in classes.values())
        out[window] = {"rate": rates[window], "duration_s": dur, "classes": classes, "goodput_rps": met_all / dur,
                       "min_attainment": min((c["attainment"] for c in classes.values() if c["attainment"] is not None),
                                             default=None)}
    return out


def crossing(windows: dict, labels: list[str], target: float = 0.9) -> float | None:
    """The arrival rate where the worse class's attainment crosses ``target``, interpolated
    linearly between the windows ``labels`` (ascending rates); the highest rate if none fails,
    0 if the lowest already does."""
    pts = [(windows[w]["rate"], windows[w]["min_attainment"]) for w in labels if w in windows
           and windows[w]["min_attainment"] is not None]
    pts.sort()
    if not pts:
        return None
    if pts[0][1] < target:
        return 0.0
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if a1 < target:
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    return pts[-1][0]


def outcomes_to_json(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]


def outcomes_from_json(rows: list[dict]) -> list[Outcome]:
    return [Outcome(**r) for r in rows]


def simulate(policy: str, labelled: list[tuple[SimRequest, str]], cfg, *, num_replicas: int = 1,
             seed: int = 0) -> list[Outcome]:
    """The program's outcomes in the simulator (``cfg``: a ``SimConfig``; its ``drain_s`` is the
    cut-off after the last arrival)."""
    from benchmarks.sim.cluster import Cluster

    reqs = [r for r, _ in labelled]
    cl = Cluster(policy, num_replicas, reqs, cfg, seed)
    cl.run()
    cl.for_unfinished()
    out = []
    for rec, (r, window) in zip(cl.records, labelled):
        o = Outcome(r.rid, window, r.slo.name, r.arrival, "ok")
        if rec.rejected:
            o.status = "rejected"
        elif rec.first_token is None:
            o.status = "timeout"
        else:
            o.ttft = rec.first_token - r.arrival
            o.n_out = rec.n_out
            if rec.finished is not None and rec.n_out > 1:
                o.tpot = (rec.finished - rec.first_token) / (rec.n_out - 1)
        out.append(o)
    return out


def predict_goodput(policy: str, trace: list[TraceRow], cfg, *, seed: int = 0, cv: float = 1.0,
                    duration_s: float = 120.0, lo: float = 0.5, hi: float = 64.0, steps: int = 8,
                    max_model_len: int = 8192) -> float:
    """The simulator's goodput of ``num_replicas=1`` under ``policy`` on the program's workload
    (steady arrivals, each request asking for its output length): bisection of the highest rate
    at which >= 90% of each class meet both targets (the first 10% of arrivals not judged)."""
    from benchmarks.sim.cluster import run_point

    def ok(rate: float) -> bool:
        reqs = build_requests(trace, rate, duration_s, seed=seed, cv=cv, max_model_len=max_model_len,
                              max_tokens=max_model_len)
        for r in reqs:
            r.max_tokens = r.output_len
        return run_point(policy, 1, reqs, cfg, duration_s, seed=seed)["min_attainment"] >= 0.9

    if not ok(lo):
        return 0.0
    if ok(hi):
        return hi
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
