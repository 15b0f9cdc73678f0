"""Where a request's time to first token goes, hop by hop, from ``KVRAY_TRACE_DIR`` event files.

  KVRAY_TRACE_DIR=/tmp/kvtrace serve run cluster-configs/local.yaml &
  python benchmarks/serving.py --concurrency 1 --num-requests 40 --input-len 32:64 --output-len 8:16
  python benchmarks/latency_breakdown.py /tmp/kvtrace

Prints, for each pair of consecutive events in ``kvray.tracing.EVENTS`` order, the p50 and p90
of the time between them over the requests that have both, and the same for the whole span.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kvray.tracing import EVENTS


def load(trace_dir: str) -> dict[str, dict[str, float]]:
    """request id -> event -> the earliest time it was recorded."""
    reqs: dict[str, dict[str, float]] = {}
    for path in Path(trace_dir).glob("*.events"):
        for line in path.read_text().splitlines():
            rid, event, t = line.split()
            ev = reqs.setdefault(rid, {})
            ev[event] = min(float(t), ev.get(event, float("inf")))
    return reqs


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def breakdown(reqs: dict[str, dict[str, float]]) -> list[dict]:
    rows = []
    spans = list(zip(EVENTS, EVENTS[1:])) + [(EVENTS[0], EVENTS[-1])]
    for a, b in spans:
        ms = [(ev[b] - ev[a]) * 1000 for ev in reqs.values() if a in ev and b in ev]
        if ms:
            rows.append({"from": a, "to": b, "requests": len(ms), "p50_ms": statistics.median(ms),
                         "p90_ms": _pct(ms, 0.9)})
    return rows


def markdown(rows: list[dict]) -> str:
    return "| from | to | requests | p50 | p90 |\n|---|---|---|---|---|\n" + "\n".join(
        f"| {r['from']} | {r['to']} | {r['requests']} | {r['p50_ms']:.2f} ms | {r['p90_ms']:.2f} ms |" for r in rows)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    rows = breakdown(load(a.trace_dir))
    print(markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
