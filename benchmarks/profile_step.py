"""Where a decode step's time goes: torch profiler over steady-state decode steps.

  python benchmarks/profile_step.py [--preset qwen3-0.6b] [--batch 256] [--context 1024] [--enforce-eager]
                                   [--sync-scheduling] [--chunks 256,512,1024,2048,4096] [--engine-args JSON]
Prints the top CUDA kernels by total time and the step's wall time vs its GPU time. With async
scheduling (the default) the host work of a step overlaps the GPU, so wall ~ GPU time when the
host keeps up; --sync-scheduling shows the synchronous engine. ``--chunks`` also times mixed
steps: the running decodes plus a prefill chunk of each size (a new prompt arriving every step),
which is how the step budget (max_num_batched_tokens) is chosen: the largest chunk whose step
keeps the decodes well within their TPOT.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]
from kvray import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--sync-scheduling", action="store_true", help="async_scheduling=False")
    ap.add_argument("--chunks", default="", help="also time steps with a prefill chunk of each size (comma list)")
    ap.add_argument("--engine-args", default="{}", help="JSON of extra LLM options, e.g. '{\"quantization\": \"fp8\"}'")
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",") if c]
    llm = LLM(f"kvray:{args.preset}", gpu_memory_utilization=0.9, enforce_eager=args.enforce_eager,
              async_scheduling=not args.sync_scheduling, **json.loads(args.engine_args),
              **({"max_num_batched_tokens": max(chunks) + args.batch, "max_num_seqs": args.batch + 8} if chunks else {}))
    eng = llm.engine
    rng = random.Random(0)
    p = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for i in range(args.batch):
        eng.add_sequence(eng.make_sequence(f"p{i}", [rng.randrange(1000) for _ in range(args.context)], p))
    while any(s.is_prefill for s in eng.scheduler.running) or eng.scheduler.num_waiting:
        eng.step()
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    wall = (time.perf_counter() - t0) / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_total = sum(e.self_device_time_total for e in events) / args.steps / 1e3
    print(f"{args.preset} decode batch {args.batch} context ~{args.context}: wall {wall * 1e3:.3f} ms/step, "
          f"GPU busy {gpu_total:.3f} ms/step ({'eager' if args.enforce_eager else 'CUDA graphs'}, "
          f"{'sync' if args.sync_scheduling else 'async'} scheduling)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"  {e.self_device_time_total / args.steps / 1e3:8.3f} ms  x{e.count // args.steps:<4d} {e.key[:90]}")
    prof_cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print("top CPU (self) per step:")
    for e in prof_cpu:
        print(f"  {e.self_cpu_time_total / args.steps / 1e3:8.3f} ms  {e.key[:90]}")
    for chunk in chunks:
        print(f"mixed steps, {args.batch} decodes + a {chunk}-token prefill chunk: "
              f"{mixed_step_ms(eng, chunk, args.steps, rng):.3f} ms/step")


def mixed_step_ms(eng, chunk: int, steps: int, rng) -> float:
    """Wall time per step while every step carries the running decodes plus one new prompt of
    ``chunk`` tokens (which finishes after its first token, so the decode batch stays the same)."""
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def add(i):
        eng.add_sequence(eng.make_sequence(f"c{chunk}-{i}", [rng.randrange(1000) for _ in range(chunk)], one))

    for i in range(3):  # warm: one step each
        add(-1 - i)
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        add(i)
        eng.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


if __name__ == "__main__":
    main()
