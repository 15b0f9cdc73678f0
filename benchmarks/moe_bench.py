"""Benchmark one MoE layer (kvray.kernels.fused_moe) on a CUDA GPU, against the hardware and transformers.

    python benchmarks/moe_bench.py [--tokens 64,4096] [--reps 20] [--out DIR] [--no-append] [--dry-run]

The layer is Qwen3-30B-A3B's (128 experts, top-8 renormalised, hidden 2048, expert width 768, bf16),
random weights; the router gate is included (a bf16 matmul, as in the model). For each token count:

* kvray: the block (gate + fused MoE) captured in a CUDA graph, as the engine runs it (tiles
  autotuned at the first call); median of ``--reps`` replays timed with CUDA events;
* decode sizes: the expert bytes the batch touches (distinct routed experts x 3 x H x I x 2 bytes,
  plus the gate) over the time, as a fraction of the copy bandwidth measured in the same run
  (target >= 60% at 64 tokens);
* prefill sizes: the expert FLOPs (2 x tokens x k x 3 x H x I) over the time, as a fraction of
  the bf16 matmul rate measured in the same run (target >= 50% at 4096 tokens);
* transformers: its Qwen3MoeSparseMoeBlock on the same weights and inputs (grouped_mm, and the
  per-expert loop "eager"), eager PyTorch (it cannot be captured), and the relative difference.

Prints a markdown table, appends it to benchmarks/RESULTS.md (unless --no-append) and writes
DIR/moe_results.md + JSON with --out. --dry-run: tiny shapes on the CPU under the Triton
interpreter (checks the script, times nothing meaningful). About 1-2 minutes on an H100/H200,
most of it compiling and tuning the tiles.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]
import kvray.kernels as K  # noqa: E402
from kvray.kernels import moe  # noqa: E402

SHAPE = dict(E=128, H=2048, I=768, k=8)
DRY_SHAPE = dict(E=8, H=64, I=32, k=2)


def timed(fn, reps: int, cuda: bool) -> float:
    """Median seconds of ``fn`` over ``reps`` runs (after one)."""
    fn()
    ts = []
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def hf_block(shape, gate, w13, w2, impl: str):
    """transformers' Qwen3MoeSparseMoeBlock holding the same weights (stacked in transformers 5,
    one module per expert before)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    cfg = Qwen3MoeConfig(hidden_size=shape["H"], moe_intermediate_size=shape["I"], num_experts=shape["E"],
                         num_experts_per_tok=shape["k"], norm_topk_prob=True)
    cfg._experts_implementation = impl
    block = Qwen3MoeSparseMoeBlock(cfg).to(device=w13.device, dtype=w13.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(gate)
        if hasattr(block.experts, "gate_up_proj"):
            block.experts.gate_up_proj.copy_(w13)
            block.experts.down_proj.copy_(w2)
        else:  # pragma: no cover - transformers 4
            for e, ex in enumerate(block.experts):
                ex.gate_proj.weight.copy_(w13[e, :shape["I"]])
                ex.up_proj.weight.copy_(w13[e, shape["I"]:])
                ex.down_proj.weight.copy_(w2[e])
    return block


@torch.inference_mode()
def run(tokens: list[int], reps: int, dry: bool, ceilings) -> list[dict]:
    shape = DRY_SHAPE if dry else SHAPE
    dev, dt = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    E, H, I, k = shape["E"], shape["H"], shape["I"], shape["k"]
    g = torch.Generator(device=dev).manual_seed(0)
    gate = (torch.randn(E, H, device=dev, generator=g) * 0.02).to(dt)
    w13 = (torch.randn(E, 2 * I, H, device=dev, generator=g) * 0.02).to(dt)
    w2 = (torch.randn(E, H, I, device=dev, generator=g) * 0.02).to(dt)
    expert_bytes = 3 * H * I * w13.element_size()
    copy_bw, mm_rate = ceilings
    rows = []
    for t in tokens:
        x = torch.randn(t, H, device=dev, generator=g).to(dt)
        block = lambda: K.fused_moe(x, w13, w2, x @ gate.t(), k, True)  # noqa: E731
        out = block()  # autotunes the tile of this token bucket (CUDA), compiles
        fn = block
        if not dry:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                block()
            fn = graph.replay
        sec = timed(fn, reps, not dry)
        _, ids = K.moe_route(x @ gate.t(), k, True)
        touched = len(ids.unique())
        nbytes = touched * expert_bytes + gate.numel() * gate.element_size()
        flops = 2 * t * k * 3 * H * I
        tile = moe.tuned_tiles().get((tuple(w13.shape), k, dt, str(x.device), moe.token_bucket(t)))
        row = {"tokens": t, "kvray_us": sec * 1e6, "touched_experts": touched, "touched_gb": nbytes / 1e9,
               "gb_s": nbytes / sec / 1e9, "of_copy_bw": nbytes / sec / copy_bw, "tflops": flops / sec / 1e12,
               "of_matmul": flops / sec / mm_rate, "tile": str(tile or moe.default_tile(t, E, k, dt))}
        for impl in ("grouped_mm", "eager"):
            try:
                hf = hf_block(shape, gate, w13, w2, impl)
                ref = hf(x[None])
                ref = (ref[0] if isinstance(ref, tuple) else ref)[0]  # transformers 4 also returns router logits
                row[f"hf_{impl}_us"] = timed(lambda: hf(x[None]), max(3, reps // 4), not dry) * 1e6
                row[f"hf_{impl}_rel_diff"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            except Exception as e:  # report, don't hide: the baseline failed on this image
                row[f"hf_{impl}_error"] = repr(e)[:100].replace("|", "/")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows, dev, copy_bw, mm_rate, command) -> str:
    lines = [f"\n### MoE layer (Qwen3-30B-A3B shape) — {dev} — {datetime.date.today()}\n",
             f"Command: `{command}`  ",
             f"Measured copy bandwidth {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s. kvray: the "
             "block (gate + fused MoE) replayed from a CUDA graph; transformers: Qwen3MoeSparseMoeBlock, eager.\n",
             "| tokens | kvray us | experts touched | GB touched | % copy BW | TFLOP/s | % matmul | HF grouped_mm us | "
             "HF eager us | x vs best HF | rel. diff vs HF | tile |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf = [r[f"hf_{i}_us"] for i in ("grouped_mm", "eager") if f"hf_{i}_us" in r]
        hf_txt = [f"{r[f'hf_{i}_us']:,.0f}" if f"hf_{i}_us" in r else r.get(f"hf_{i}_error", "-")
                  for i in ("grouped_mm", "eager")]
        diff = r.get("hf_grouped_mm_rel_diff", r.get("hf_eager_rel_diff"))
        speedup = f"{min(hf) / r['kvray_us']:.1f}" if hf else "-"
        diff_txt = f"{diff:.1e}" if diff is not None else "-"
        lines.append(f"| {r['tokens']} | {r['kvray_us']:,.1f} | {r['touched_experts']} | {r['touched_gb']:.3f} | "
                     f"{r['of_copy_bw']:.1%} | {r['tflops']:.0f} | {r['of_matmul']:.1%} | {hf_txt[0]} | {hf_txt[1]} | "
                     f"{speedup} | {diff_txt} | {r['tile']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,64,256,1024,4096", help="comma list of token counts")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="also write DIR/moe_results.md and DIR/moe_results.json")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        dev, ceilings = "CPU (dry run)", (1e10, 1e11)
    else:
        from benchmarks.offline_throughput import measure_ceilings
        dev, ceilings = torch.cuda.get_device_name(), measure_ceilings()
        print(f"device {dev}: copy {ceilings[0] / 1e12:.2f} TB/s, bf16 matmul {ceilings[1] / 1e12:.0f} TFLOP/s",
              flush=True)
    rows = run(tokens, 2 if args.dry_run else args.reps, args.dry_run, ceilings)
    text = table(rows, dev, *ceilings, "python benchmarks/moe_bench.py " + " ".join(sys.argv[1:]))
    print(text)
    if not args.no_append and not args.dry_run:
        with open(_ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        Path(args.out, "moe_results.md").write_text(text)
        Path(args.out, "moe_results.json").write_text(json.dumps({"device": dev, "copy_bw": ceilings[0],
                                                                  "mm_rate": ceilings[1], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
