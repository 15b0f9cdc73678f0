"""Goodput from attainment curves, and the JSON / PNG / markdown outputs of router_sim."""
from __future__ import annotations

import json
import os
import re

TARGET = 0.9


def goodput(points: list[dict], target: float = TARGET) -> float:
    """The highest rate at which every class meets both targets for >= ``target`` of its
    requests, scanning rates upwards and stopping at the first failing one (curves are
    monotone up to noise). 0.0 when even the lowest rate fails."""
    best = 0.0
    for p in sorted(points, key=lambda p: p["rate"]):
        if p["min_attainment"] >= target:
            best = p["rate"]
        else:
            break
    return best


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)


def plot(path: str, curves: dict, goodputs: dict, title: str) -> bool:
    """curves[replicas][policy] = sorted points; one panel per replica count. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rs = sorted(curves, key=int)
    fig, axes = plt.subplots(1, len(rs), figsize=(max(7.0, 5.2 * len(rs)), 4.6), squeeze=False)
    for ax, r in zip(axes[0], rs):
        for pol, pts in sorted(curves[r].items()):
            xs = [p["rate"] for p in pts]
            line, = ax.plot(xs, [p["min_attainment"] for p in pts], marker="o", ms=3,
                            label=f"{pol} (goodput {goodputs[r][pol]:g})")
            for cls, style in (("interactive", ":"), ("batch", "--")):
                ys = [p["classes"].get(cls, {}).get("attainment") for p in pts]
                if any(y is not None for y in ys):
                    ax.plot(xs, ys, style, color=line.get_color(), lw=0.8, alpha=0.6)
        ax.axhline(TARGET, color="grey", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("SLO attainment (min over classes)")
        ax.set_title(f"{r} replicas")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{title}\nsolid: min over classes; dotted: interactive; dashed: batch", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown_table(goodputs: dict, baseline: str = "p2c", focus: str = "slo_aware") -> str:
    rs = sorted(goodputs, key=int)
    pols = sorted({p for r in rs for p in goodputs[r]}, key=lambda p: (p != focus, p))
    head = "| policy | " + " | ".join(f"{r} replicas" for r in rs) + " |"
    sep = "|---" * (len(rs) + 1) + "|"
    lines = [head, sep]
    for pol in pols:
        cells = []
        for r in rs:
            g = goodputs[r].get(pol)
            if g is None:
                cells.append("—")
                continue
            base = goodputs[r].get(baseline)
            ratio = f" ({g / base:.2f}× {baseline})" if base and pol != baseline else ""
            cells.append(f"{g:g} req/s{ratio}")
        lines.append(f"| {pol} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_results_md(path: str, tag: str, body: str) -> None:
    """Replace (or append) this script's section ``tag`` in RESULTS.md, leaving the rest alone."""
    begin, end = f"<!-- router_sim:{tag}:begin -->", f"<!-- router_sim:{tag}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)
