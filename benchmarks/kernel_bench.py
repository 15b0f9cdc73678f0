"""Benchmark kvray's Triton paged attention on a CUDA GPU (issue 3).

    python benchmarks/kernel_bench.py [--sweep] [--out DIR] [--no-append]

* copy bandwidth: a large device-to-device copy (bytes read + written), measured in the same run;
* decode (Qwen3-0.6B shape: 16 q heads, 8 KV heads, d=128, block 16, bf16), batch {1,16,64,256} x
  context {512,2048,8192}: time, achieved bandwidth (K/V read + q + out), fraction of the copy
  bandwidth, and the time of torch SDPA on the same K/V gathered into contiguous tensors;
* prefill, 1-8 sequences of 512-8192 tokens: TFLOP/s (causal FLOPs) and time against torch SDPA's
  flash backend on contiguous tensors;
* --sweep: also time a few tile configurations of the decode and prefill paths (tuning aid).

Times are triton.testing.do_bench medians (it flushes L2 between runs). The table is printed,
appended to benchmarks/RESULTS.md with the device name, date and command, and written to
DIR/kernels_results.md (+ raw JSON) when --out is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]
import kvray.kernels as K  # noqa: E402

H, KVH, D, PAGE, DT = 16, 8, 128, 16, torch.bfloat16
SCALE = 1.0 / math.sqrt(D)
DECODE_BATCHES, DECODE_CTX = (1, 16, 64, 256), (512, 2048, 8192)
PREFILL = ((1, 512), (1, 2048), (1, 4096), (1, 8192), (2, 4096), (4, 2048), (8, 512), (8, 1024), (8, 4096))
SWEEP_DECODE = ((1, 8192, (16, 32), ((128, 4, 1), (64, 2, 1))), (16, 512, (2, 4), ((128, 4, 1), (64, 2, 2))),
                (16, 2048, (4,), ((64, 2, 2), (128, 4, 1))))
SWEEP_PREFILL = ()
L2_BYTES = 50 * 2 ** 20
ATTN = K.triton_impl(False).attention
DEV = "cuda"
DRY = False          # --dry-run: tiny shapes on the CPU under the Triton interpreter (checks the script)


def sync():
    if not DRY:
        torch.cuda.synchronize()


def bench(fn) -> float:
    fn()
    sync()
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.randn(256 * 1024 * 1024 if not DRY else 1024, device=DEV)        # 1 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def matmul_tflops() -> float:
    n = 8192 if not DRY else 64
    a = torch.randn(n, n, device=DEV, dtype=DT)
    b = torch.randn(n, n, device=DEV, dtype=DT)
    ms = bench(lambda: a @ b)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def paged_inputs(n_seqs: int, seq_len: int, q_len: int, n_sets: int = 1):
    """Queries plus ``n_sets`` block tables over disjoint, shuffled pages of one cache (rotating
    among them keeps repeated calls from reading K/V out of L2)."""
    pages = seq_len // PAGE
    nb = n_seqs * pages
    kc = torch.randn(n_sets * nb, PAGE, KVH, D, device=DEV, dtype=DT)
    vc = torch.randn_like(kc)
    perm = torch.randperm(n_sets * nb, device=DEV).to(torch.int32)
    bts = [perm[r * nb:(r + 1) * nb].view(n_seqs, pages) for r in range(n_sets)]
    q = torch.randn(n_seqs * q_len, H, D, device=DEV, dtype=DT)
    qsl = torch.arange(0, n_seqs * q_len + 1, q_len, device=DEV, dtype=torch.int32)
    sl = torch.full((n_seqs,), seq_len, device=DEV, dtype=torch.int32)
    return q, kc, vc, bts, qsl, sl


def n_sets_for(kv_bytes: int) -> int:
    return 1 if DRY else max(1, min(128, math.ceil(4 * L2_BYTES / kv_bytes)))


def graph_ms(calls) -> float:
    """Per-call time of one CUDA graph that runs ``calls`` back to back (median of 15 replays):
    how the engine runs decode, one call per layer, each on its own cache."""
    if DRY:
        t = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t) * 1e3 / len(calls)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return sorted(times)[len(times) // 2] / len(calls)


def cpu_us(fn, n=200) -> float:
    """Host time per call when nothing waits on the GPU (launch-bound if above the GPU time)."""
    n = n if not DRY else 2
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t) / n * 1e6
    sync()
    return t


def kernel_us(calls, reps=3) -> dict:
    """Per-call device time of each kernel, from the torch profiler (CUPTI)."""
    if DRY:
        return {}
    from torch.profiler import ProfilerActivity, profile
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            for c in calls:
                c()
        sync()
    res = {}
    for e in prof.key_averages():
        tot = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if tot and ("paged_attn" in e.key or "combine" in e.key):
            res[e.key[:40]] = tot / (reps * len(calls))
    return res


def contiguous_kv(kc, vc, bt):
    """[n, KVH, S, D] copies of each sequence's K/V, as SDPA wants them."""
    n, pages = bt.shape
    k = kc[bt.long()].reshape(n, pages * PAGE, KVH, D).transpose(1, 2).contiguous()
    v = vc[bt.long()].reshape(n, pages * PAGE, KVH, D).transpose(1, 2).contiguous()
    return k, v


def sdpa(q4, k, v, causal, flash_only):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [SDPBackend.FLASH_ATTENTION] if flash_only and not DRY else \
        [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q4, k, v, is_causal=causal, scale=SCALE, enable_gqa=True)
        gqa = True
    except RuntimeError:
        gqa = False
        k, v = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)

    def run():
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q4, k, v, is_causal=causal, scale=SCALE, enable_gqa=gqa)
    return run


def decode_case(batch: int, ctx: int, copy_bw: float, profile: bool = False) -> dict:
    kv_bytes = 2 * batch * ctx * KVH * D * 2
    n_sets = n_sets_for(kv_bytes)
    q, kc, vc, bts, qsl, sl = paged_inputs(batch, ctx, 1, n_sets)
    out = torch.empty_like(q)
    cfg = ATTN.pick_config(batch, batch, KVH, H // KVH, D, 1, ctx, ATTN._num_sms(q.device))

    def call(bt):
        return lambda: K.paged_attention(q, kc, vc, bt, qsl, sl, SCALE, out=out, max_seq_len=ctx, max_query_len=1)
    calls = [call(bt) for bt in bts]
    ms = bench(calls[0])
    g_ms = graph_ms(calls)
    host = cpu_us(calls[0])
    kern = kernel_us(calls) if profile else {}
    q4 = q.view(batch, 1, H, D).transpose(1, 2)
    runs = [sdpa(q4, *contiguous_kv(kc, vc, bt), causal=False, flash_only=False) for bt in bts]
    calls[0]()
    ref = runs[0]().transpose(1, 2).reshape(batch, H, D)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    sdpa_ms = bench(runs[0])
    try:
        sdpa_g = graph_ms(runs)
    except RuntimeError:
        sdpa_g = float("nan")
    nbytes = kv_bytes + 2 * q.numel() * 2
    del q, kc, vc, out, runs
    if not DRY:
        torch.cuda.empty_cache()
    return dict(batch=batch, ctx=ctx, splits=cfg["num_splits"], sets=n_sets, ms=ms, graph_ms=g_ms,
                bw=nbytes / (ms * 1e-3), frac=nbytes / (ms * 1e-3) / copy_bw,
                graph_bw=nbytes / (g_ms * 1e-3), graph_frac=nbytes / (g_ms * 1e-3) / copy_bw,
                sdpa_ms=sdpa_ms, sdpa_graph_ms=sdpa_g, rel_err=rel, host_us=host, kernels_us=kern)


def prefill_case(n: int, s: int) -> dict:
    q, kc, vc, bts, qsl, sl = paged_inputs(n, s, s)
    bt = bts[0]
    out = torch.empty_like(q)
    ms = bench(lambda: K.paged_attention(q, kc, vc, bt, qsl, sl, SCALE, out=out, max_seq_len=s, max_query_len=s))
    k, v = contiguous_kv(kc, vc, bt)
    q4 = q.view(n, s, H, D).transpose(1, 2).contiguous()
    run = sdpa(q4, k, v, causal=True, flash_only=True)
    ref = run().transpose(1, 2).reshape(n * s, H, D)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    sdpa_ms = bench(run)
    flops = 4 * D * H * n * s * (s + 1) / 2
    del q, kc, vc, k, v, q4, out
    if not DRY:
        torch.cuda.empty_cache()
    return dict(n=n, s=s, ms=ms, tflops=flops / (ms * 1e-3) / 1e12, sdpa_ms=sdpa_ms,
                sdpa_tflops=flops / (sdpa_ms * 1e-3) / 1e12, ratio=sdpa_ms / ms, rel_err=rel)


def sweep(log) -> list:
    """Decode configs timed as graphs over rotating caches; prefill configs with do_bench."""
    rows = []

    def run_cfgs(tag, n, s, q_len, cfgs, graph):
        inputs = paged_inputs(n, s, q_len, n_sets_for(2 * n * s * KVH * D * 2) if graph else 1)
        q, kc, vc, bts, qsl, sl = inputs
        out = torch.empty_like(q)
        for cfg in cfgs:
            calls = [(lambda bt=bt, cfg=cfg: ATTN.paged_attention_triton(
                q, kc, vc, bt, qsl, sl, SCALE, out, config=cfg, max_query_len=q_len, max_seq_len=s)) for bt in bts]
            try:
                ms = graph_ms(calls) if graph else bench(calls[0])
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a config
                ms = float("nan")
                log(f"  {tag} {cfg}: FAILED {type(e).__name__}: {str(e)[:160]}")
            rows.append(dict(tag=tag, cfg=cfg, ms=ms))
            log(f"  {tag:>14} {json.dumps(cfg)}: {ms * 1e3:9.1f} us")

    def dcfg(splits, triples):
        return [dict(num_splits=sp, block_n=bn, num_warps=w, num_stages=st) for sp in splits for bn, w, st in triples]

    for n, s, splits, triples in SWEEP_DECODE:
        run_cfgs(f"dec b{n} c{s}", n, s, 1, dcfg(splits, triples), True)
    pre = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, num_splits=1)
           for bm, bn, w, st in ((128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3))]
    for n, s in SWEEP_PREFILL:
        run_cfgs(f"pre {n}x{s}", n, s, s, pre, False)
    return rows


def markdown(dev: str, copy_bw: float, mm: float, dec: list, pre: list, cmd: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Kernels: Triton paged attention ({dev}, {now})", "",
             f"Command: `{cmd}`  ", f"torch {torch.__version__}, triton {__import__('triton').__version__}. "
             f"Measured copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write), bf16 matmul {mm:.0f} TFLOP/s. "
             "Times: do_bench medians with L2 flushed.", "",
             "### Decode (16 q heads, 8 KV heads, d=128, block 16, bf16)", "",
             "Two timings per row. *eager*: one call per do_bench iteration (L2 flushed before each), so it "
             "includes the Python launch path whenever that is slower than the GPU. *graph*: one CUDA graph "
             "replaying the call over `sets` disjoint caches (at least 4x the L2 in total, so K/V come from HBM), "
             "time per call: how the engine runs decode (CUDA graphs, one call per layer). Bandwidth = (K/V read + "
             "q + out) / time. SDPA runs on the same K/V gathered into contiguous [b, kv_heads, ctx, d] tensors, "
             "timed the same two ways.", "",
             "| batch | ctx | splits | sets | eager (us) | eager % copy BW | graph (us) | graph GB/s | graph % copy BW "
             "| SDPA eager (us) | SDPA graph (us) | SDPA/ours (graph) | rel err |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in dec:
        lines.append(f"| {r['batch']} | {r['ctx']} | {r['splits']} | {r['sets']} | {r['ms'] * 1e3:.1f} | "
                     f"{100 * r['frac']:.0f}% | {r['graph_ms'] * 1e3:.1f} | {r['graph_bw'] / 1e9:.0f} | "
                     f"{100 * r['graph_frac']:.0f}% | {r['sdpa_ms'] * 1e3:.1f} | {r['sdpa_graph_ms'] * 1e3:.1f} | "
                     f"{r['sdpa_graph_ms'] / r['graph_ms']:.2f} | {r['rel_err']:.1e} |")
    kern = [r for r in dec if r["kernels_us"]]
    if kern:
        lines += ["", "Kernel device times (torch profiler, us per call) and host time per eager call:", ""]
        for r in kern:
            lines.append(f"- b={r['batch']} ctx={r['ctx']}: " + ", ".join(
                f"{k.split('(')[0]} {v:.1f}" for k, v in r["kernels_us"].items()) + f"; host {r['host_us']:.1f} us")
    lines += ["", "### Prefill (causal, same heads; SDPA = flash backend on contiguous tensors)", "",
              "| seqs x tokens | time (ms) | TFLOP/s | SDPA flash (ms) | SDPA TFLOP/s | ours / SDPA speed | rel err |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in pre:
        lines.append(f"| {r['n']} x {r['s']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['sdpa_ms']:.3f} | "
                     f"{r['sdpa_tflops']:.0f} | {100 * r['ratio']:.0f}% | {r['rel_err']:.1e} |")
    big = [r for r in dec if r["batch"] >= 64 and r["ctx"] >= 2048]
    one = [r for r in dec if r["batch"] == 1 and r["ctx"] == 8192]
    p4k = [r for r in pre if r["s"] == 4096]
    lines += ["", "Targets:"]
    if big:
        for key, name in (("graph_frac", "graph"), ("frac", "eager")):
            lines.append(f"- decode batch >= 64, ctx >= 2048 at >= 70% of copy BW ({name}): min "
                         f"{100 * min(r[key] for r in big):.0f}% -> {'met' if all(r[key] >= 0.7 for r in big) else 'NOT met'}")
    if one:
        for key, name in (("graph_frac", "graph"), ("frac", "eager")):
            lines.append(f"- decode batch 1, ctx 8192 at >= 40% ({name}): {100 * one[0][key]:.0f}% -> "
                         f"{'met' if one[0][key] >= 0.4 else 'NOT met'}")
    if p4k:
        lines.append("- prefill at 4k tokens >= 70% of SDPA flash: "
                     + ", ".join(f"{r['n']}x{r['s']} {100 * r['ratio']:.0f}%" for r in p4k)
                     + f" -> {'met' if all(r['ratio'] >= 0.7 for r in p4k) else 'NOT met'}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also time tile configurations")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for kernels_results.md / .json")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = ap.parse_args()
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    global DEV, DRY, ATTN, DECODE_BATCHES, DECODE_CTX, PREFILL, DT, SWEEP_DECODE, SWEEP_PREFILL, L2_BYTES
    if args.dry_run:
        DEV, DRY, ATTN, DT = "cpu", True, K.triton_impl(True).attention, torch.float32
        DECODE_BATCHES, DECODE_CTX, PREFILL = (1, 2), (512, 1024), ((1, 64), (2, 128))
        SWEEP_DECODE, SWEEP_PREFILL = ((1, 1024, (2, 4), ((64, 2, 1), (32, 2, 2))),), ((1, 128),)
        os.environ["TRITON_INTERPRET"] = "1"
        args.no_append = True
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_bench.py needs a CUDA GPU")

    def log(msg):
        print(msg, flush=True)

    dev = torch.cuda.get_device_name() if not DRY else "cpu (dry run)"
    if not DRY:
        L2_BYTES = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", L2_BYTES)
    t0 = time.time()
    copy_bw = copy_bandwidth()
    mm = matmul_tflops()
    log(f"{dev}: copy {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mm:.0f} TFLOP/s")
    raw = dict(device=dev, copy_bw=copy_bw, matmul_tflops=mm)
    if args.sweep:
        log("sweep:")
        raw["sweep"] = sweep(log)
    dec = []
    for b in DECODE_BATCHES:
        for c in DECODE_CTX:
            r = decode_case(b, c, copy_bw, profile=(b, c) in ((1, 8192), (1, 2048), (64, 2048), (16, 2048)))
            dec.append(r)
            log(f"decode b={b:4d} ctx={c:5d} splits={r['splits']:2d} sets={r['sets']:3d}: eager {r['ms'] * 1e3:8.1f} us "
                f"({100 * r['frac']:3.0f}%)  graph {r['graph_ms'] * 1e3:8.1f} us ({100 * r['graph_frac']:3.0f}%)  "
                f"sdpa eager {r['sdpa_ms'] * 1e3:8.1f} graph {r['sdpa_graph_ms'] * 1e3:8.1f} us  host {r['host_us']:.1f} us"
                f"  err {r['rel_err']:.1e}  kernels {json.dumps({k: round(v, 1) for k, v in r['kernels_us'].items()})}")
    pre = []
    for n, s in PREFILL:
        r = prefill_case(n, s)
        pre.append(r)
        log(f"prefill {n}x{s}: {r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s  sdpa-flash {r['sdpa_ms']:.3f} ms "
            f"{r['sdpa_tflops']:.0f} TFLOP/s  ({100 * r['ratio']:.0f}%)  err {r['rel_err']:.1e}")
    raw.update(decode=dec, prefill=pre, seconds=time.time() - t0)
    md = markdown(dev, copy_bw, mm, dec, pre, cmd)
    print("\n" + md)
    if not args.no_append:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), "a") as f:
            f.write("\n" + md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels_results.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "kernels_results.json"), "w") as f:
            json.dump(raw, f, indent=1, default=str)


if __name__ == "__main__":
    main()
