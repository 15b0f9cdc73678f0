"""Markdown tables and a PNG for benchmarks/overload_sim.py: predicted (and measured) outcomes of
a load program per policy and window, the overload verdict, and simulator fidelity."""
from __future__ import annotations

import os

from benchmarks.sim.program import crossing

FIDELITY_TOLERANCE = 0.15   # the simulator is trusted where its goodput is within 15% of the real one
OVERLOAD_WINDOWS = ("1.5x", "2x", "burst")


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _att(w: dict) -> str:
    c = w["classes"]
    return " / ".join(_pct(c[k]["attainment"]) if k in c else "-" for k in ("interactive", "batch"))


def _count(w: dict, key: str) -> int:
    return sum(c[key] for c in w["classes"].values())


def _inter(w: dict, key: str):
    return w["classes"].get("interactive", {}).get(key)


def window_table(windows: dict) -> str:
    lines = ["| policy | window | rate (req/s) | attainment interactive / batch | goodput (req/s) | 429 | timeouts "
             "| interactive TTFT p50 / p99 (ms) | interactive TPOT p50 / p99 (ms) |", "|---" * 9 + "|"]
    for pol, by in windows.items():
        for name, w in by.items():
            lines.append(f"| {pol} | {name} | {w['rate']:.1f} | {_att(w)} | {w['goodput_rps']:.2f} | "
                         f"{_count(w, 'rejected')} | {_count(w, 'timeouts')} | {_ms(_inter(w, 'ttft_p50'))} / "
                         f"{_ms(_inter(w, 'ttft_p99'))} | {_ms(_inter(w, 'tpot_p50'))} / "
                         f"{_ms(_inter(w, 'tpot_p99'))} |")
    return "\n".join(lines)


def overload_verdict(windows: dict) -> tuple[str, bool | None]:
    """slo_aware vs p2c in the overload windows: goodput ratio >= 2, 0 timeouts, admitted
    interactive p99 TTFT <= 500 ms."""
    if "slo_aware" not in windows or "p2c" not in windows:
        return "", None
    lines = ["| window | slo_aware goodput | p2c goodput | least_load goodput | slo_aware / p2c | slo_aware timeouts "
             "| slo_aware 429s | slo_aware interactive TTFT p99 (admitted) | met |", "|---" * 9 + "|"]
    ok_all = True
    for name in OVERLOAD_WINDOWS:
        s, b = windows["slo_aware"].get(name), windows["p2c"].get(name)
        if s is None or b is None:
            continue
        ll = windows.get("least_load", {}).get(name)
        ratio = s["goodput_rps"] / b["goodput_rps"] if b["goodput_rps"] else float("inf")
        p99 = _inter(s, "ttft_p99")
        ok = ratio >= 2.0 and _count(s, "timeouts") == 0 and (p99 is None or p99 <= 0.5)
        ok_all &= ok or name == "burst"  # the acceptance names the 1.5x and 2x windows
        lines.append(f"| {name} | {s['goodput_rps']:.2f} | {b['goodput_rps']:.2f} | "
                     f"{'-' if ll is None else format(ll['goodput_rps'], '.2f')} | "
                     f"{ratio:.2f}x | {_count(s, 'timeouts')} | {_count(s, 'rejected')} | {_ms(p99)} ms | "
                     f"{'yes' if ok else 'no'} |")
    return "\n".join(lines), ok_all


def fidelity_tables(payload: dict) -> str:
    measured, kinds = payload["measured"], payload["true_models"]
    labels = [w for w in next(iter(measured.values())) if w.endswith("x")]
    head = "| policy | window | source | attainment interactive / batch | goodput (req/s) | 429 | " \
           "interactive TTFT p50 / p99 (ms) | interactive TPOT p50 / p99 (ms) | batch TTFT p50 / p99 (ms) |"
    lines = [head, "|---" * 9 + "|"]
    for pol, by in measured.items():
        for name, w in by.items():
            rows = [("measured", w)] + [(f"sim ({k})", payload["windows"][k][pol][name]) for k in kinds]
            for src, x in rows:
                b = x["classes"].get("batch", {})
                lines.append(f"| {pol} | {name} | {src} | {_att(x)} | {x['goodput_rps']:.2f} | "
                             f"{_count(x, 'rejected')} | "
                             f"{_ms(_inter(x, 'ttft_p50'))} / {_ms(_inter(x, 'ttft_p99'))} | "
                             f"{_ms(_inter(x, 'tpot_p50'))} / {_ms(_inter(x, 'tpot_p99'))} | "
                             f"{_ms(b.get('ttft_p50'))} / {_ms(b.get('ttft_p99'))} |")
    g = ["| policy | measured goodput (90% crossing) | " + " | ".join(f"sim ({k})" for k in kinds) + " | within 15% |",
         "|---" * (3 + len(kinds)) + "|"]
    for pol, by in measured.items():
        real = crossing(by, labels)
        sims = [crossing(payload["windows"][k][pol], labels) for k in kinds]
        errs = [abs(s - real) / real if real and s is not None else None for s in sims]
        cells = " | ".join("-" if s is None else f"{s:.1f} req/s ({'-' if e is None else f'{e:+.0%}'.replace('+', '')})"
                           for s, e in zip(sims, errs))
        ok = [e is not None and e <= FIDELITY_TOLERANCE for e in errs]
        lines_ok = ", ".join(f"{k}: {'yes' if o else 'no'}" for k, o in zip(kinds, ok))
        g.append(f"| {pol} | {'-' if real is None else f'{real:.1f} req/s'} | {cells} | {lines_ok} |")
    return "\n".join(lines) + "\n\nGoodput, interpolated where the worse class crosses 90% between the windows " \
        f"{', '.join(labels)} (error against the measured one):\n\n" + "\n".join(g)


def markdown(payload: dict) -> str:
    kinds = payload["true_models"]
    per = payload.get("predicted_goodputs")
    out = [f"G = {payload['goodput']:.1f} req/s"
           + (f" (simulator's goodput per policy: {', '.join(f'{k} {v:.1f}' for k, v in per.items())})" if per else "")
           + f"; step-time coefficients: `{payload['coefficients']}`; {payload['num_requests']} requests."]
    primary = payload.get("measured")
    if primary:
        out += [f"\n**Measured** ({payload.get('device') or 'GPU'}) and **predicted**, per window:\n",
                fidelity_tables(payload)]
    else:
        primary = payload["windows"][kinds[0]]
        out += [f"\n**Predicted** (simulator, {kinds[0]} step model), per window:\n", window_table(primary)]
    table, ok = overload_verdict(primary)
    if table:
        out += [f"\n**Overload** ({'measured' if payload.get('measured') else 'predicted'}; target: slo_aware >= 2x "
                "p2c goodput at 1.5x and 2x, 0 timeouts, admitted interactive TTFT p99 <= 500 ms): "
                f"{'met' if ok else 'not met'}\n", table]
    return "\n".join(out) + "\n"


def plot(payload: dict, path: str) -> bool:
    """Attainment (worse class) against the window rate, per policy: measured solid, simulated dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = payload["true_models"]
    sources = [(f"sim ({k})", payload["windows"][k], "--") for k in kinds]
    if payload.get("measured"):
        sources.insert(0, ("measured", payload["measured"], "-"))
    pols = list(sources[0][1])
    fig, axes = plt.subplots(2, len(pols), figsize=(5 * len(pols), 8.0), squeeze=False)
    for ax, pol in zip(axes[1], pols):  # goodput per window: bars (first source), markers (the others)
        names = list(sources[0][1][pol])
        for k, (name, by, _) in enumerate(sources):
            ys = [by[pol][n]["goodput_rps"] if n in by[pol] else 0.0 for n in names]
            if k == 0:
                ax.bar(range(len(names)), ys, color="lightsteelblue", label=f"{name}: goodput")
            else:
                ax.plot(range(len(names)), ys, "o" if k == 1 else "x", label=f"{name}: goodput")
        ax.plot(range(len(names)), [sources[0][1][pol][n]["rate"] for n in names], "_", ms=14, color="k",
                label="offered")
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_ylabel("requests/s that met their SLO")
        ax.legend(fontsize=6)
    for ax, pol in zip(axes[0], pols):
        for name, by, style in sources:
            ws = [w for n, w in by[pol].items() if n.endswith("x") and w["min_attainment"] is not None]
            ws.sort(key=lambda w: w["rate"])
            for cls, marker in (("interactive", "o"), ("batch", "s")):
                ax.plot([w["rate"] for w in ws], [w["classes"].get(cls, {}).get("attainment") for w in ws], style,
                        marker=marker, ms=4, label=f"{name}: {cls}")
        ax.axhline(0.9, color="grey", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("SLO attainment (429s and timeouts are misses)")
        ax.set_title(pol)
        ax.legend(fontsize=6)
    fig.suptitle(f"one replica, G = {payload['goodput']:.1f} req/s; {os.path.basename(payload['coefficients'])}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
