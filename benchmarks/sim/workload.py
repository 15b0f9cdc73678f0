"""Requests for the simulator: Azure LLM trace lengths, gamma-process (or trace) arrivals, SLO classes."""
from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from datetime import datetime

from kvray.slo import SLOTarget

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trace_dir() -> str:
    """Where the Azure traces are: ``$KVRAY_AZURE_TRACES``, else the first of ``../shared/traces``
    beside the checkout, ``.carry/traces`` inside it (what travels to a GPU machine) and
    ``../../shared/traces`` (beside a worktree's parent) that exists."""
    env = os.environ.get("KVRAY_AZURE_TRACES")
    if env:
        return env
    options = [os.path.join(REPO, "..", "shared", "traces"), os.path.join(REPO, ".carry", "traces"),
               os.path.join(REPO, "..", "..", "shared", "traces")]
    return os.path.normpath(next((d for d in options if os.path.isdir(d)), options[0]))


TRACE_DIR = trace_dir()
DEFAULT_TRACES = {
    "code": os.path.join(TRACE_DIR, "azure_llm_2023_code.csv"),
    "conv": os.path.join(TRACE_DIR, "azure_llm_2023_conv.csv"),
}

# Priority weights the class for the deadline scheduler (slack / priority) and for preemption.
CLASSES = {
    "interactive": SLOTarget("interactive", ttft_ms=500, tpot_ms=50, priority=2.0, on_infeasible="queue"),
    "batch": SLOTarget("batch", ttft_ms=10_000, tpot_ms=200, priority=1.0, on_infeasible="queue"),
}
SOURCE_CLASS = {"conv": "interactive", "code": "batch"}


@dataclass
class TraceRow:
    t: float          # seconds since the trace's first request
    prompt: int
    output: int
    source: str       # "code" | "conv"


@dataclass
class SimRequest:
    rid: int
    arrival: float
    prompt_len: int
    output_len: int   # tokens the request generates before it stops (its "EOS")
    max_tokens: int   # what the client asked for (all the router and replica know)
    slo: SLOTarget
    source: str
    prefix_id: int = -1   # shared prompt prefix (when --shared-prefix-tokens > 0)
    prefix_len: int = 0


def _parse_ts(s: str) -> float:
    s = s.strip()
    if "." in s:
        head, frac = s.split(".", 1)
        s = f"{head}.{frac[:6]}"
        return datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return datetime.strptime(s, "%Y-%m-%d %H:%M:%S").timestamp()


def load_trace(path: str, source: str) -> list[TraceRow]:
    """Rows of an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    rows: list[TraceRow] = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append(TraceRow(_parse_ts(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"]), source))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def merged_trace(paths: dict[str, str]) -> list[TraceRow]:
    rows = [row for src, p in paths.items() for row in load_trace(p, src)]
    rows.sort(key=lambda r: r.t)
    t0 = rows[0].t
    for r in rows:
        r.t -= t0
    return rows


def build_requests(trace: list[TraceRow], rate: float, duration_s: float, *, seed: int = 0, cv: float = 2.0,
                   arrivals: str = "gamma", interactive_frac: float | None = None, max_model_len: int = 8192,
                   max_tokens: int = 1024, shared_prefix_tokens: int = 0, num_prefixes: int = 8,
                   classes: dict[str, SLOTarget] = CLASSES) -> list[SimRequest]:
    """Requests arriving in [0, duration_s) at mean ``rate`` per second.

    Lengths (and, by default, classes: conv -> interactive, code -> batch) come from the merged
    trace in order, from a seeded random start, wrapping around. ``arrivals="gamma"``: gamma
    inter-arrival gaps with coefficient of variation ``cv`` (1 = Poisson; larger = burstier).
    ``arrivals="trace"``: the trace's own gaps, scaled to ``rate``. ``interactive_frac``: draw
    each class at random with this share instead of by trace source.
    """
    rng = random.Random(seed)
    n_rows = len(trace)
    start = rng.randrange(n_rows)
    if arrivals == "trace":
        span = trace[-1].t - trace[0].t
        scale = (n_rows / span) / rate if span > 0 else 1.0 / rate
    elif arrivals != "gamma":
        raise ValueError("arrivals must be 'gamma' or 'trace'")
    shape = 1.0 / (cv * cv)
    out: list[SimRequest] = []
    t = 0.0
    i = 0
    while True:
        row = trace[(start + i) % n_rows]
        if arrivals == "gamma":
            t += rng.gammavariate(shape, 1.0 / (shape * rate))
        elif i > 0:
            prev = trace[(start + i - 1) % n_rows]
            gap = row.t - prev.t if row.t >= prev.t else 0.0
            t += gap * scale
        if t >= duration_s:
            break
        prompt = max(1, min(row.prompt, max_model_len - 2))
        mt = max(1, min(max_tokens, max_model_len - prompt))
        output = max(1, min(row.output, mt))
        if interactive_frac is None:
            cls = classes[SOURCE_CLASS[row.source]]
        else:
            cls = classes["interactive" if rng.random() < interactive_frac else "batch"]
        req = SimRequest(i, t, prompt, output, mt, cls, row.source)
        if shared_prefix_tokens > 0 and prompt > 1:
            req.prefix_id = rng.randrange(num_prefixes)
            req.prefix_len = min(shared_prefix_tokens, prompt - 1)
        out.append(req)
        i += 1
    return out


def prompt_token_ids(req: SimRequest, vocab: int = 150_000) -> list[int]:
    """Fake token ids: an optional shared prefix, then a token unique to the request (so the
    rest of its blocks never collide with another request's), then filler."""
    head: list[int] = []
    if req.prefix_id >= 0:
        base = 1000 + 97 * req.prefix_id
        head = [(base + k) % vocab for k in range(req.prefix_len)]
    rest = req.prompt_len - len(head)
    return head + [vocab + req.rid] + [7] * (rest - 1)
