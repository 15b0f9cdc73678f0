"""What tensor parallelism adds to an engine step, piece by piece (docs/parallel.md).

  python benchmarks/tp_step_sync.py [--ranks N] [--hidden 4096] [--layers 32] [--max-model-len 4096]
                                    [--max-num-seqs 256] [--max-tokens 2048] [--engine PRESET] [--tp N]
                                    [--batches 64,256] [--out FILE.json]

* host: packing a step's header and sending it from rank 0 to another process over a control
  socket (half a ping-pong round trip): what every step costs rank 0's host, and the other
  ranks' delay before they launch the step;
* device (CUDA; ``--ranks`` processes, one per GPU; 1 runs NCCL with a single rank): the one
  broadcast of the packed step inputs (decode steps of 1..max_num_seqs sequences, and the
  largest mixed step), eagerly and replayed in a CUDA graph, and the all-reduce of a step's
  hidden states [tokens, hidden] in bf16 in a graph, per op and per step (2 per layer + 1);
* ``--engine PRESET``: decode steps (context 1000) of an engine, TP=``--tp`` against TP=1; with
  ``--tp 1`` (one GPU), the engine with every collective run through a one-rank NCCL group
  against the same engine without collectives.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]
import torch  # noqa: E402

from kvray.replica.parallel.group import connect  # noqa: E402
from kvray.replica.step_inputs import StepHeader, StepLayout  # noqa: E402


def _echo(conn) -> None:
    while (msg := conn.recv_bytes()) != b"Q":
        conn.send_bytes(msg[:1])


def host_header_us(iters: int) -> dict:
    """Pack a header, send it, get a 1-byte answer: half the round trip is the one-way latency."""
    ours, theirs = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_echo, args=(theirs,), daemon=True)
    proc.start()
    header = StepHeader(256, 256, 64, 0, 256, 1, 4096, 256, 256, 1)
    rtts, packs = [], []
    for i in range(iters + 50):
        t0 = time.perf_counter()
        data = b"S" + header.pack()
        t1 = time.perf_counter()
        ours.send_bytes(data)
        ours.recv_bytes()
        t2 = time.perf_counter()
        if i >= 50:
            packs.append(t1 - t0)
            rtts.append(t2 - t1)
    ours.send_bytes(b"Q")
    proc.join(5)
    return {"pack_us": statistics.median(packs) * 1e6, "one_way_us": statistics.median(rtts) / 2 * 1e6,
            "one_way_p99_us": sorted(rtts)[int(0.99 * len(rtts))] / 2 * 1e6}


def _timed(fn, iters: int) -> float:
    """Microseconds per call of ``fn`` (device time between two events)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _graph(fn, repeat: int = 1) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(repeat):
            fn()
    return g


def _device_rank(rank: int, size: int, port: int, args, out) -> None:
    dev = torch.device("cuda", rank)
    store = None
    if rank == 0:
        import torch.distributed as dist
        store = dist.TCPStore("127.0.0.1", port, size, True, wait_for_workers=False)
    group = connect(rank, size, dev, port, store=store)
    layout = StepLayout(max(args.max_tokens, args.max_num_seqs), args.max_num_seqs, -(-args.max_model_len // 16))
    flat = torch.zeros(layout.size, dtype=torch.int64, device=dev)
    rows = {}
    for b in sorted({1, 8, 32, 64, 128, 256, args.max_num_seqs} & set(range(1, args.max_num_seqs + 1))):
        part = flat[:layout.prefix(b)]
        eager = _timed(lambda: group.broadcast(part), args.iters)
        g = _graph(lambda: group.broadcast(part))
        rows[f"broadcast decode b={b} ({part.numel() * 8 / 1024:.0f} KiB)"] = (eager, _timed(g.replay, args.iters))
    for t in (1, 64, 256, args.max_tokens):
        x = torch.randn(t, args.hidden, dtype=torch.bfloat16, device=dev)
        g = _graph(lambda: group.all_reduce(x), repeat=10)
        per_op = _timed(g.replay, max(1, args.iters // 10)) / 10
        rows[f"all-reduce [{t}, {args.hidden}] bf16"] = (None, per_op)
        rows[f"  per step ({2 * args.layers + 1} all-reduces)"] = (None, per_op * (2 * args.layers + 1))
    if rank == 0:
        out.put(rows)
    group.all_reduce(torch.zeros(1, device=dev))


def device_costs(args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_device_rank, args=(r, args.ranks, port, args, out)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    rows = out.get(timeout=600)
    for p in procs:
        p.join(60)
    return rows


def engine_steps(args) -> dict:
    """Decode step wall time (async scheduling, CUDA graphs) of two engines of ``args.engine``."""
    from kvray import LLM, SamplingParams
    from kvray.replica.model_runner import ModelRunner
    from kvray.replica.parallel.group import host_store

    def one_rank_join(self, *_):
        store = host_store(1, 60)
        return connect(0, 1, self.device, store.port, store=store)

    def run(tp: int, one_rank: bool) -> dict:
        real = ModelRunner._join
        if one_rank:
            ModelRunner._join = one_rank_join
        try:
            llm = LLM(f"kvray:{args.engine}", tensor_parallel_size=tp, max_model_len=2048, gpu_memory_utilization=0.85,
                      max_num_seqs=max(args.batches))
        finally:
            ModelRunner._join = real
        eng, rng, res = llm.engine, random.Random(0), {}
        for b in args.batches:
            p = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
            seqs = [eng.make_sequence(f"b{b}-{i}", [rng.randrange(1000) for _ in range(1000)], p) for i in range(b)]
            for s in seqs:
                eng.add_sequence(s)
            while any(s.is_prefill for s in eng.scheduler.running) or eng.scheduler.num_waiting:
                eng.step()
            for _ in range(5):
                eng.step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                eng.step()
            torch.cuda.synchronize()
            res[b] = (time.perf_counter() - t0) / 50 * 1e3
            for s in seqs:
                eng.abort(s.request_id)
            while eng.has_unfinished():
                eng.step()
        eng.runner.close()
        del llm, eng
        gc.collect()
        torch.cuda.empty_cache()
        return res

    base = run(1, False)
    other = run(args.tp, args.tp == 1)
    label = "one-rank NCCL collectives" if args.tp == 1 else f"TP={args.tp}"
    return {f"{args.engine} decode b={b} ctx 1000: TP=1 {base[b]:.3f} ms, {label} {other[b]:.3f} ms "
            f"(x{base[b] / other[b]:.2f})": (base[b], other[b]) for b in args.batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=None, help="GPUs for the device part (default: up to 2 seen)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--engine", help="also time decode steps of this preset, e.g. qwen3-0.6b or llama-3.1-8b")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of the engine compared with TP=1")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    results = {"host": host_header_us(args.iters * 5)}
    h = results["host"]
    print(f"host: header pack {h['pack_us']:.1f} us, rank 0 -> rank 1 over the control socket {h['one_way_us']:.1f} us "
          f"(p99 {h['one_way_p99_us']:.1f} us)")
    if torch.cuda.is_available():
        args.ranks = args.ranks or min(2, torch.cuda.device_count())
        results["device"] = device_costs(args)
        print(f"device ({args.ranks} rank{'s' if args.ranks > 1 else ''}, {torch.cuda.get_device_name(0)}): "
              "us per op, eager / in a CUDA graph")
        for name, (eager, graph) in results["device"].items():
            print(f"  {name:48s} {'' if eager is None else f'{eager:8.1f}'} {graph:8.1f}")
        if args.engine:
            results["engine"] = engine_steps(args)
            for line in results["engine"]:
                print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
