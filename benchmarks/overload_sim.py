"""One replica under a load program, in the simulator: fidelity and overload (issue 27).

The program (``benchmarks/sim/program.py``): windows at 0.7x, 1x, 1.5x and 2x the replica's
goodput G with pauses between them, then a 10x burst of 10 s on top of 0.7x G; the Azure code +
conversation mix (conv -> interactive 500 ms / 50 ms, code -> batch 10 s / 200 ms), Poisson
arrivals. G is the simulator's goodput of the replica (the best policy's: every policy is
overloaded at 1.5x), or ``--goodput X``.

Without ``--measured`` it predicts each policy's outcome per window. With ``--measured
OUT/routing_program.json`` (what ``benchmarks/routing_gpu.py --program`` measured on a GPU) it
replays exactly those arrivals (same program, G and seed) and puts predicted and measured
attainment, TTFT, TPOT and goodput side by side. Writes OUT/<name>.json, .md and .png.

  python benchmarks/overload_sim.py --model llama-3.1-8b --out out/overload_sim
  python benchmarks/overload_sim.py --coeffs OUT/step_coeffs_llama-3.1-8b.json --true-model split \\
      --measured OUT/routing_program.json --out OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from multiprocessing import get_context
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]

from benchmarks.sim import program as prog  # noqa: E402
from benchmarks.sim import fidelity_report as rep  # noqa: E402
from benchmarks.sim.cluster import SimConfig  # noqa: E402
from benchmarks.sim.replica import ReplicaConfig  # noqa: E402
from benchmarks.sim.steps import true_model  # noqa: E402
from benchmarks.sim.workload import CLASSES, DEFAULT_TRACES, merged_trace  # noqa: E402
from kvray.step_cost import coeffs_file, load_coeffs  # noqa: E402

POLICIES = ["slo_aware", "p2c", "least_load"]


def program_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """The program's options (shared with routing_gpu.py --program)."""
    p.add_argument("--goodput", default="auto", help="G in req/s, or 'auto': the simulator's (best policy's)")
    p.add_argument("--levels", default="1,1.5,2", help="window loads after the burst, multiples of G")
    p.add_argument("--window", type=float, default=10.0, help="seconds of arrivals of a window at <= 1x")
    p.add_argument("--overload", type=float, default=12.0, help="seconds of arrivals judged in a window above 1x")
    p.add_argument("--settle", type=float, default=6.0, help="seconds at a window's load above 1x before it is judged")
    p.add_argument("--gap", type=float, default=2.0, help="pause after each window (queues drain)")
    p.add_argument("--burst", type=float, default=10.0, help="seconds of the burst (and of the windows around it)")
    p.add_argument("--burst-factor", type=float, default=10.0)
    p.add_argument("--burst-base", type=float, default=0.7)
    p.add_argument("--drain", type=float, default=11.0, help="cut-off after the last arrival: longer than any "
                   "TTFT target, so that a request still unanswered then (a timeout) has missed it anyway")
    p.add_argument("--cv", type=float, default=1.0, help="inter-arrival coefficient of variation (1: Poisson)")
    p.add_argument("--code-trace", default=DEFAULT_TRACES["code"], help="Azure code trace (batch requests)")
    p.add_argument("--conv-trace", default=DEFAULT_TRACES["conv"], help="Azure conversation trace (interactive)")
    if seed:
        p.add_argument("--seed", type=int, default=0)


def make_program(a, goodput: float) -> list[prog.Phase]:
    return prog.overload_program(goodput, levels=tuple(float(x) for x in a.levels.split(",")), window_s=a.window,
                                 overload_s=a.overload, settle_s=a.settle, gap_s=a.gap, burst_base=a.burst_base,
                                 burst_factor=a.burst_factor, burst_s=a.burst)


def sim_config(coeffs_path: str, kind: str, replica: ReplicaConfig, drain_s: float) -> SimConfig:
    return SimConfig(replica=replica, true_coeffs=load_coeffs(coeffs_path), true_model=true_model(coeffs_path, kind),
                     drain_s=drain_s, warmup_frac=0.1)


def _goodput_task(t):
    policy, cfg, seed, cv, max_model_len, traces = t
    return policy, prog.predict_goodput(policy, merged_trace(traces), cfg, seed=seed, cv=cv,
                                        duration_s=60.0, steps=7, max_model_len=max_model_len)


def predicted_goodputs(policies, cfg: SimConfig, seed: int, cv: float, jobs: int,
                       traces: dict = DEFAULT_TRACES) -> dict[str, float]:
    tasks = [(p, cfg, seed, cv, cfg.replica.max_model_len, traces) for p in policies]
    if jobs > 1:
        with get_context("fork").Pool(min(jobs, len(tasks))) as pool:
            return dict(pool.map(_goodput_task, tasks))
    return dict(map(_goodput_task, tasks))


def _sim_task(t):
    policy, labelled, cfg, seed = t
    return policy, prog.simulate(policy, labelled, cfg, seed=seed)


def simulate_all(policies, labelled, cfg: SimConfig, seed: int, jobs: int) -> dict[str, list[prog.Outcome]]:
    tasks = [(p, labelled, cfg, seed) for p in policies]
    if jobs > 1:
        with get_context("fork").Pool(min(jobs, len(tasks))) as pool:
            return dict(pool.map(_sim_task, tasks))
    return dict(map(_sim_task, tasks))


def merge_measured(runs: list[dict]) -> dict:
    """One record of several runs of the same program (same G, seed and windows), policies merged."""
    merged = dict(runs[0], policies=dict(runs[0]["policies"]))
    for r in runs[1:]:
        if r["program_args"] != merged["program_args"] or r["goodput"] != merged["goodput"]:
            raise SystemExit("--measured: the runs played different programs (program_args or goodput differ)")
        merged["policies"].update(r["policies"])
        merged["num_kv_blocks"] = merged.get("num_kv_blocks") or r.get("num_kv_blocks")
    return merged


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="coefficients of kvray/step_coeffs/<model>.json")
    p.add_argument("--coeffs", default=None, help="a coefficients JSON instead (benchmarks/step_records.py's)")
    p.add_argument("--true-model", choices=["linear", "split", "both"], default="linear",
                   help="the simulator's step times: the one linear fit, or split decode/mixed fits (both: two runs)")
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    p.add_argument("--measured", nargs="+", default=None,
                   help="routing_program.json of routing_gpu.py --program (several: runs of the same program, "
                   "their policies merged)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks of the replica (default: the measured "
                   "replica's, else the simulator's default)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="out/overload_sim")
    program_args(p)
    return p


def write(payload: dict, out: Path) -> None:
    md = rep.markdown(payload)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(payload, indent=1, default=str))
    Path(f"{out}.md").write_text(md)
    has_png = rep.plot(payload, f"{out}.png")
    print(md)
    print(f"wrote {out}.json, {out}.md" + (f", {out}.png" if has_png else ""))


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    coeffs_path = a.coeffs or coeffs_file(a.model)
    measured = merge_measured([json.loads(Path(m).read_text()) for m in a.measured]) if a.measured else None
    if measured:  # the measured run's program, G, seed and replica
        for k, v in measured["program_args"].items():
            if k not in ("code_trace", "conv_trace"):  # the same traces, perhaps at another path here
                setattr(a, k, v)
        a.goodput = measured["goodput"]
        a.policies = [x for x in a.policies if x in measured["policies"]]
        a.num_blocks = a.num_blocks or measured.get("num_kv_blocks")
    replica = ReplicaConfig(max_model_len=a.max_model_len, enable_prefix_caching=False)  # random prompts: no hits
    if a.num_blocks:
        replica.num_blocks = a.num_blocks
    kinds = ["linear", "split"] if a.true_model == "both" else [a.true_model]
    if a.true_model == "both" and "split" not in json.loads(Path(coeffs_path).read_text()):
        kinds = ["linear"]  # a file without decode/mixed fits (an estimate)
    cfgs = {k: sim_config(coeffs_path, k, replica, a.drain) for k in kinds}
    traces = {"code": a.code_trace, "conv": a.conv_trace}
    goodputs = None
    if a.goodput == "auto":
        goodputs = predicted_goodputs(a.policies, cfgs[kinds[0]], a.seed, a.cv, a.jobs, traces)
        goodput = max(goodputs.values())
    else:
        goodput = float(a.goodput)
    phases = make_program(a, goodput)
    labelled = prog.program_requests(merged_trace(traces), phases, seed=a.seed, cv=a.cv,
                                     max_model_len=a.max_model_len)
    predicted = {k: simulate_all(a.policies, labelled, cfg, a.seed, a.jobs) for k, cfg in cfgs.items()}
    windows = {k: {pol: prog.summarize_windows(outs, phases, CLASSES) for pol, outs in by.items()}
               for k, by in predicted.items()}
    payload = {"coefficients": coeffs_path, "true_models": kinds, "goodput": goodput, "predicted_goodputs": goodputs,
               "phases": [vars(ph) for ph in phases], "num_requests": len(labelled), "windows": windows,
               "command": "python benchmarks/overload_sim.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if measured:
        payload["measured"] = {pol: prog.summarize_windows(prog.outcomes_from_json(m["outcomes"]), phases, CLASSES)
                               for pol, m in measured["policies"].items() if pol in a.policies}
        payload["device"] = measured.get("device")
    write(payload, Path(a.out))
    return payload


if __name__ == "__main__":
    main()
