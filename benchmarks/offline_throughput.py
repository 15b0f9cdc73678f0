"""Offline throughput of one kvray replica against transformers, and the hardware floor.

Workloads (docs/benchmarks.md):
  A: 256 requests, prompt and output lengths each uniform in [100, 1024], random ids, ignore_eos, random.Random(0)
  B: 256 requests x (512 prompt, 256 output)
Baselines in the same run on the same random weights: transformers `generate` with static
batches (left padding; batch 64 for A, 256 for B; only the requested output tokens count) and
transformers continuous batching `generate_batch`.
Floor: max(bytes / copy bandwidth, FLOPs / matmul rate), bytes = weights once per decode step
(steps = the longest output) + every K/V byte read by every generated token; both ceilings are
measured in this run. MoE models (docs/moe.md): a decode step reads the dense weights and the
experts its batch routes to (expected distinct experts for B tokens, k of E each), and FLOPs count
the active parameters (k experts a token), see decode_weights.

  python benchmarks/offline_throughput.py [--presets qwen3-0.6b:AB,llama-3.2-1b:B] [--hf-subset 64] [--sync-scheduling]
kvray runs with async (one-step-lookahead) scheduling, the engine default; --sync-scheduling turns it off.
Appends a markdown table to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import bisect
import datetime
import gc
import json
import os
import random
import statistics
import sys
import time

import torch

from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]

from kvray import LLM, SamplingParams  # noqa: E402
from kvray.replica.models.loader import resolve_model  # noqa: E402
from kvray.replica.models.moe import moe_spec  # noqa: E402


def workload(name: str, vocab: int):
    rng = random.Random(0)
    if name == "A":
        lens = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(256)]
    else:
        lens = [(512, 256)] * 256
    prompts = [[rng.randrange(vocab) for _ in range(p)] for p, _ in lens]
    return prompts, [o for _, o in lens]


def cuda_time(fn, reps=5) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return sorted(ts)[len(ts) // 2]


def measure_ceilings() -> tuple[float, float]:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    copy_bw = 2 * n / cuda_time(lambda: b.copy_(a), reps=10)
    a = b = None  # free them (a del here reads as undefined names in the lambda to linters)
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_rate = 2 * 8192 ** 3 / cuda_time(lambda: m @ m, reps=10)
    m = None
    torch.cuda.empty_cache()
    return copy_bw, mm_rate


def decode_weights(cfg, outs, weight_bytes, num_params=None) -> tuple[float, float]:
    """(weight bytes read by all decode steps, parameters each token computes with). Every request
    decodes from the first step, so step s has batch B_s = #{o > s}. A dense model reads all its
    weights each step; an MoE model reads its dense part and, per sparse layer, the experts the
    batch routes to: E * (1 - (1 - k/E)^B_s) in expectation for uniform routing (random weights
    route about uniformly), and a token computes with its k experts only (bf16: 2 bytes a parameter).
    ``num_params``: a dense model's parameter count where its bytes are not 2 a parameter (FP8)."""
    steps = max(outs)
    spec = moe_spec(cfg)
    if spec is None:
        return weight_bytes * steps, (num_params if num_params is not None else weight_bytes / 2)
    expert_bytes = 2 * spec.params_per_expert(cfg.hidden_size)
    sparse = len(spec.sparse_layers)
    dense_bytes = weight_bytes - sparse * spec.num_experts * expert_bytes
    done = sorted(outs)
    total = sum(dense_bytes + sparse * expert_bytes * spec.expected_active_experts(len(done) - bisect.bisect_right(done, s))
                for s in range(steps))
    return total, (dense_bytes + sparse * spec.top_k * expert_bytes) / 2


def floor_tok_s(cfg, prompts, outs, copy_bw, mm_rate, weight_bytes, num_params=None, kv_elem_bytes=2) -> dict:
    """The floor of the run's own storage (weight bytes as loaded, K/V bytes of its cache dtype); the
    FLOP ceiling is the measured bf16 matmul rate whatever the weights (so an FP8 run's floor is
    that of its bytes at bf16 compute)."""
    layers, kvh = cfg.num_hidden_layers, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = cfg.num_attention_heads
    kv_per_token = 2 * layers * kvh * hd * kv_elem_bytes
    kv_reads = sum(o * len(p) + o * (o + 1) // 2 for p, o in zip(prompts, outs))  # context tokens read per decode
    weight_reads, params = decode_weights(cfg, outs, weight_bytes, num_params)
    bytes_total = weight_reads + kv_reads * kv_per_token
    tokens = sum(len(p) + o for p, o in zip(prompts, outs))
    attn_flops = 4 * layers * heads * hd * (kv_reads + sum(len(p) ** 2 // 2 for p in prompts))
    flops = 2 * params * tokens + attn_flops
    t = max(bytes_total / copy_bw, flops / mm_rate)
    return {"floor_tok_s": sum(outs) / t, "floor_bytes_s": bytes_total / copy_bw, "floor_flops_s": flops / mm_rate}


def run_kvray(llm, prompts, outs, repeat: int = 1) -> tuple[list[float], dict]:
    """tok/s of each of ``repeat`` runs of the workload in the same engine, after one warm-up."""
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outs]
    eng = llm.engine
    peak = {"blocks": 0}
    orig = eng.step

    def step():
        r = orig()
        used = eng.block_manager.num_total_blocks - eng.block_manager.num_free_blocks
        peak["blocks"] = max(peak["blocks"], used)
        return r

    eng.step = step
    llm.generate(prompts[:8], [SamplingParams(max_tokens=8, ignore_eos=True)] * 8, use_tqdm=False)  # warm-up
    tok_s, preemptions = [], 0
    for _ in range(repeat):
        # Every run prefills every prompt: a repeat of the same prompts would otherwise find them in
        # the prefix cache (an earlier version of --repeat measured that, 20% fast on workload B).
        eng.block_manager.reset_prefix_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        tok_s.append(sum(outs) / (time.perf_counter() - t0))
        assert [len(r.token_ids) for r in res] == outs
        assert not any(r.num_cached_tokens for r in res), "a timed run hit the prefix cache"
        preemptions = max(preemptions, sum(r.metrics.num_preemptions for r in res))
    eng.step = orig
    return tok_s, {"peak_block_usage": peak["blocks"] / eng.block_manager.num_total_blocks,
                   "preemptions": preemptions}


def repeat_stats(tok_s: list[float], floor: float) -> dict:
    """min and median tok/s and fraction of the floor over the repeats, and every repeat's tok/s.
    ``kvray_tok_s`` is the median (the figure the baselines are compared with)."""
    med = statistics.median(tok_s)
    return {"kvray_tok_s": med, "kvray_tok_s_min": min(tok_s), "kvray_tok_s_median": med,
            "kvray_tok_s_repeats": tok_s, "of_floor_min": min(tok_s) / floor, "of_floor_median": med / floor}


@torch.inference_mode()
def run_hf_static(hf, prompts, outs, batch, pad_id) -> float:
    total_time, total_tok = 0.0, 0
    for i in range(0, len(prompts), batch):
        ps, os_ = prompts[i:i + batch], outs[i:i + batch]
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(ps):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.cuda(), mask.cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=max(os_), min_new_tokens=max(os_), do_sample=False,
                    pad_token_id=pad_id, eos_token_id=None)
        torch.cuda.synchronize()
        total_time += time.perf_counter() - t0
        total_tok += sum(os_)
    return total_tok / total_time


def run_hf_cb(hf, prompts, outs) -> float:
    """transformers continuous batching. Not under inference_mode: its manager thread updates its own
    static tensors in place, which inference tensors forbid."""
    from transformers import GenerationConfig
    groups: dict[int, list[int]] = {}
    order = sorted(range(len(outs)), key=lambda i: outs[i])
    for k in range(4):  # quartiles of output length, each run to its own max (only requested tokens count)
        idx = order[k * len(order) // 4:(k + 1) * len(order) // 4]
        if idx:
            groups[max(outs[i] for i in idx)] = idx
    total_time = 0.0
    for max_new, idx in groups.items():
        gc = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            res = hf.generate_batch(inputs=[prompts[i] for i in idx], generation_config=gc)
        torch.cuda.synchronize()
        total_time += time.perf_counter() - t0
        produced = [len(getattr(r, "generated_tokens", None) or []) for r in res.values()]
        if len(produced) != len(idx) or min(produced) < max_new:  # a failed batch must not look fast
            raise RuntimeError(f"generate_batch returned {len(produced)} results, shortest {min(produced, default=0)} "
                               f"tokens, for {len(idx)} requests of {max_new}")
    return sum(outs) / total_time


def single_stream(llm, vocab) -> float:
    rng = random.Random(1)
    prompt = [rng.randrange(vocab) for _ in range(512)]
    p = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
    llm.generate([prompt], p, use_tqdm=False)
    out = llm.generate([prompt], p, use_tqdm=False)[0]
    m = out.metrics
    return (m.finished_time - m.first_token_time) / (len(out.token_ids) - 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="qwen3-0.6b:AB,llama-3.2-1b:B")
    ap.add_argument("--hf-subset", type=int, default=64, help="requests of workload A given to the HF baselines")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--sync-scheduling", action="store_true", help="async_scheduling=False (for comparison)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of each kvray workload in the same engine "
                    "(after the warm-up): reports their min and median")
    ap.add_argument("--out", default=None, help="also write JSON here")
    ap.add_argument("--hf-cb-only", action="store_true", help="only the transformers generate_batch baseline")
    ap.add_argument("--engine-args", default="{}", help="JSON of extra LLM options for every preset, e.g. "
                    "'{\"quantization\": \"fp8\", \"kv_cache_dtype\": \"fp8\"}'")
    args = ap.parse_args()
    engine_args = json.loads(args.engine_args)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    dev = torch.cuda.get_device_name()
    copy_bw, mm_rate = measure_ceilings()
    print(f"device {dev}: copy {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    if args.hf_cb_only:
        return hf_cb_only(args)
    for spec in args.presets.split(","):
        preset, wls = spec.split(":")
        llm = LLM(f"kvray:{preset}", gpu_memory_utilization=0.9, enforce_eager=args.enforce_eager,
                  async_scheduling=not args.sync_scheduling, **engine_args)
        eng = llm.engine
        cfg = eng.hf_config
        weight_bytes = sum(p.numel() * p.element_size() for p in eng.runner.model.parameters())
        num_params = sum(p.numel() for n, p in eng.runner.model.named_parameters() if "scale" not in n)
        kv_alloc = eng.runner.kv_cache.numel() * eng.runner.kv_cache.element_size()
        free, total = torch.cuda.mem_get_info()
        info = {"kv_tokens": eng.block_manager.num_total_blocks * eng.config.block_size, "engine_args": engine_args,
                "kv_cache_dtype": eng.runner.kv_cache_dtype_name, "quantization": eng.runner.quantization_name,
                "kv_gib": kv_alloc / 2**30, "gpu_used_frac": (total - free) / total}
        print(f"{preset}: KV capacity {info['kv_tokens']} tokens ({info['kv_gib']:.1f} GiB), "
              f"GPU memory in use {info['gpu_used_frac']:.3f} of total", flush=True)
        if preset.startswith("qwen3"):
            info["single_stream_ms_per_token"] = single_stream(llm, eng.vocab_size)
            print(f"single stream 512 in / 256 out: {info['single_stream_ms_per_token']:.3f} ms/token", flush=True)
        preset_rows, workloads = [], {}
        for wl in wls:
            prompts, outs = workload(wl, min(eng.vocab_size, len(eng.tokenizer)))
            workloads[wl] = (prompts, outs)
            floor = floor_tok_s(cfg, prompts, outs, copy_bw, mm_rate, weight_bytes, num_params,
                                eng.runner.kv_cache.element_size())
            runs, extra = run_kvray(llm, prompts, outs, args.repeat)
            stats = repeat_stats(runs, floor["floor_tok_s"])
            preset_rows.append({"preset": preset, "workload": wl, **stats, **floor, **extra, **info})
            print(f"{preset} {wl}: kvray {stats['kvray_tok_s_min']:,.0f} / {stats['kvray_tok_s']:,.0f} tok/s (min / median "
                  f"of {args.repeat}) = {stats['of_floor_min']:.1%} / {stats['of_floor_median']:.1%} of floor "
                  f"{floor['floor_tok_s']:,.0f} (runs {', '.join(f'{x:,.0f}' for x in runs)}; peak KV use "
                  f"{extra['peak_block_usage']:.1%}, preemptions {extra['preemptions']})", flush=True)
        pad_id = eng.tokenizer.pad_token_id or 0
        del llm, eng  # free the GPU for the baselines
        gc.collect()
        torch.cuda.empty_cache()
        if not args.skip_hf:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(resolve_model(f"kvray:{preset}"), dtype=torch.bfloat16).cuda().eval()
            for row in preset_rows:
                wl = row["workload"]
                prompts, outs = workloads[wl]
                n = args.hf_subset if wl == "A" else len(prompts)
                tok_s = row["kvray_tok_s"]
                row["hf_static_tok_s"] = run_hf_static(hf, prompts[:n], outs[:n], 64 if wl == "A" else 256, pad_id)
                print(f"  {preset} {wl} hf static generate: {row['hf_static_tok_s']:,.0f} tok/s -> kvray "
                      f"x{tok_s / row['hf_static_tok_s']:.1f}", flush=True)
                torch.cuda.empty_cache()
                try:
                    row["hf_cb_tok_s"] = run_hf_cb(hf, prompts[:n], outs[:n])
                    print(f"  {preset} {wl} hf generate_batch: {row['hf_cb_tok_s']:,.0f} tok/s -> kvray "
                          f"x{tok_s / row['hf_cb_tok_s']:.1f}", flush=True)
                except Exception as e:  # report, don't hide: the baseline failed on this image
                    row["hf_cb_error"] = repr(e)[:120].replace("|", "/")
                    print(f"  hf generate_batch failed: {e!r}"[:300], flush=True)
                torch.cuda.empty_cache()
            del hf
            gc.collect()
            torch.cuda.empty_cache()
        rows.extend(preset_rows)
    write_results(dev, copy_bw, mm_rate, rows, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "copy_bw": copy_bw, "mm_rate": mm_rate, "rows": rows}, f, indent=1)


def hf_cb_only(args) -> None:
    """Rerun only transformers' continuous-batching baseline (same workloads and subset)."""
    from transformers import AutoModelForCausalLM
    from kvray.replica.models.loader import load_config
    lines = [f"\n### transformers generate_batch baseline — {torch.cuda.get_device_name()} — {datetime.date.today()}\n",
             f"Command: `python benchmarks/offline_throughput.py --hf-cb-only --presets {args.presets} "
             f"--hf-subset {args.hf_subset}`\n", "| model | workload | requests | generate_batch tok/s |", "|---|---|---|---|"]
    for spec in args.presets.split(","):
        preset, wls = spec.split(":")
        path = resolve_model(f"kvray:{preset}")
        vocab = min(load_config(path).vocab_size, 1024)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        for wl in wls:
            prompts, outs = workload(wl, vocab)
            n = args.hf_subset if wl == "A" else len(prompts)
            try:
                tok_s = f"{run_hf_cb(hf, prompts[:n], outs[:n]):,.0f}"
            except Exception as e:
                tok_s = f"failed: {repr(e)[:100]}".replace("|", "/")
            lines.append(f"| {preset} | {wl} | {n} | {tok_s} |")
            print(lines[-1], flush=True)
        del hf
        gc.collect()
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "hf_cb_results.md"), "w") as f:
            f.write(text)


def write_results(dev, copy_bw, mm_rate, rows, args) -> str:
    lines = [f"\n### Offline throughput — {dev} — {datetime.date.today()}\n",
             f"Command: `python benchmarks/offline_throughput.py --presets {args.presets} --hf-subset {args.hf_subset}"
             f"{' --enforce-eager' if args.enforce_eager else ''}"
             f"{' --sync-scheduling' if args.sync_scheduling else ''}"
             f"{f' --repeat {args.repeat}' if args.repeat > 1 else ''}"
             f"{f' --engine-args {chr(39)}{args.engine_args}{chr(39)}' if args.engine_args != '{}' else ''}`  ",
             f"Measured copy bandwidth {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s.\n",
             f"kvray: median of {args.repeat} run(s) in the same engine after a warm-up; every run's tok/s in the last column.\n",
             "| model | workload | kvray tok/s (median) | floor tok/s | % of floor (min) | % of floor (median) | HF static tok/s | x static "
             "| HF generate_batch tok/s | x CB | KV tokens | peak KV use | kvray tok/s per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["kvray_tok_s"]
        hs, hc = r.get("hf_static_tok_s"), r.get("hf_cb_tok_s")
        hs_txt = f"{hs:,.0f} | {k / hs:.1f}" if hs else "- | -"
        hc_txt = f"{hc:,.0f} | {k / hc:.1f}" if hc else f"{r.get('hf_cb_error', '-')} | -"
        per_run = ", ".join(f"{x:,.0f}" for x in r["kvray_tok_s_repeats"])
        lines.append(f"| {r['preset']}{' ' + json.dumps(r['engine_args']) if r['engine_args'] else ''} | {r['workload']} | {k:,.0f} | {r['floor_tok_s']:,.0f} | {r['of_floor_min']:.1%} | "
                     f"{r['of_floor_median']:.1%} | {hs_txt} | {hc_txt} | {r['kv_tokens']:,} | {r['peak_block_usage']:.1%} "
                     f"| {per_run} |")
    for r in rows:
        if "single_stream_ms_per_token" in r:
            lines.append(f"\nSingle stream ({r['preset']}, 512 in / 256 out): {r['single_stream_ms_per_token']:.3f} ms per output token.")
            break
    text = "\n".join(lines) + "\n"
    print(text)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    with open(path, "a") as f:
        f.write(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "offline_results.md"), "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
