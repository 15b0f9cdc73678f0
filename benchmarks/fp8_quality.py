"""FP8 quality: teacher-forced agreement of FP8 weights and of the FP8 KV cache with the unquantized
model (issue 26: >= 90% top-1 agreement over 20 prompts x 64 tokens, and the mean absolute
log-probability difference).

The unquantized engine writes 64 greedy tokens after each prompt. Every variant then reads each
whole sequence (prompt + those tokens) in one forward through its paged KV cache (so every
attention read goes through the cache, FP8 or not), and at each of the 64 positions that predict a
generated token we compare: its top-1 token with the reference's, and the log-probability it gives
the reference's token with the reference's own.

  python benchmarks/fp8_quality.py [--model kvray:smollm2-135m-instruct] [--prompts 20] [--tokens 64]
                                   [--device auto] [--variants fp8-weights,fp8-kv] [--out quality.json]

Without --model: the real SmolLM2 preset if this kvray has it, else kvray:llama-3.1-8b against its
bf16 self. On the CPU the reference runs in float32 and FP8 weights are dequantized (the CPU path),
so the figure there is the weight / KV rounding alone; on a GPU the FP8 GEMMs also quantize the
activations per token.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]

from kvray import LLM, SamplingParams  # noqa: E402
from kvray.replica.forward_context import ForwardContext, forward_context  # noqa: E402
from kvray.replica.models.loader import resolve_model  # noqa: E402
from kvray.replica.models.presets import PRESETS  # noqa: E402

VARIANTS = {"fp8-weights": {"quantization": "fp8"}, "fp8-kv": {"kv_cache_dtype": "fp8"},
            "fp8-weights+kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}
TOPICS = ["the history of the printing press", "how a refrigerator works", "the rules of chess",
          "why the sky is blue", "a recipe for bread", "the life cycle of a star", "how vaccines train the immune system",
          "the causes of the French Revolution", "what a hash table is", "how to plant tomatoes",
          "the water cycle", "the difference between weather and climate", "how airplanes fly",
          "the plot of Hamlet", "what inflation means", "how photosynthesis works", "the Roman aqueducts",
          "how to learn a language", "what a black hole is", "the invention of the telephone"]


REAL_MODEL, FALLBACK_MODEL = "kvray:smollm2-135m-instruct", "kvray:llama-3.1-8b"


def default_model() -> str:
    """The real SmolLM2 preset when this kvray has it and can resolve it, else the 8B preset."""
    try:
        from kvray.replica.models import real_presets  # noqa: F401  (only where the real preset exists)
    except ImportError:
        if REAL_MODEL.removeprefix("kvray:") not in PRESETS:
            return FALLBACK_MODEL
    try:
        resolve_model(REAL_MODEL)
        return REAL_MODEL
    except ValueError as e:
        print(f"{REAL_MODEL} is not available here ({e}); using {FALLBACK_MODEL} against its bf16 self", flush=True)
        return FALLBACK_MODEL


def prompts(tokenizer, n: int) -> list[list[int]]:
    texts = [f"Write a short explanation of {TOPICS[i % len(TOPICS)]}." for i in range(n)]
    return [tokenizer(t).input_ids for t in texts]


@torch.inference_mode()
def sequence_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Log-probabilities [len(ids), vocab] (float32) of one sequence read in one forward through the
    engine's paged KV cache (its first blocks; the engine must be idle)."""
    runner = llm.engine.runner
    dev, bs = runner.device, runner.block_size
    n = len(ids)
    blocks = -(-n // bs)
    if blocks > runner.num_blocks:
        raise ValueError(f"a {n}-token sequence needs {blocks} KV blocks; the engine has {runner.num_blocks}")
    table = torch.arange(blocks, dtype=torch.int32, device=dev).view(1, -1)
    ctx = ForwardContext(torch.arange(n, device=dev), table, torch.tensor([0, n], dtype=torch.int32, device=dev),
                         torch.tensor([n], dtype=torch.int32, device=dev), max_query_len=n, max_seq_len=n)
    with forward_context(ctx):
        hidden = runner.model(torch.tensor(ids, device=dev), torch.arange(n, device=dev))
    return runner.model.compute_logits(hidden).float().log_softmax(-1).cpu()


def make_llm(model: str, device: str, options: dict) -> LLM:
    seq_budget = 4096  # KV tokens: one sequence at a time
    return LLM(model, device=device, enforce_eager=True, num_kv_blocks=seq_budget // 16, max_model_len=2048,
               max_num_seqs=32, **options)


def compare(ref: list[torch.Tensor], var: list[torch.Tensor], seqs: list[list[int]], starts: list[int]) -> dict:
    """Top-1 agreement and mean |log-prob difference| of the sequence's own tokens, at the positions
    that predict the generated tokens (position t predicts token t + 1)."""
    agree = total = 0
    diffs = []
    for r, v, seq, s in zip(ref, var, seqs, starts):
        rr, vv = r[s - 1:-1], v[s - 1:-1]
        target = torch.tensor(seq[s:])[:, None]
        agree += int((vv.argmax(-1) == rr.argmax(-1)).sum())
        total += target.numel()
        diffs.append((vv.gather(1, target) - rr.gather(1, target)).abs().view(-1))
    return {"top1_agreement": agree / total, "mean_abs_logprob_diff": float(torch.cat(diffs).mean()),
            "tokens": total}


def self_check(ref: list[torch.Tensor], seqs: list[list[int]], starts: list[int]) -> float:
    """How often the reference's one-forward read picks the token it generated step by step."""
    hits = sum(int((r[s - 1:-1].argmax(-1) == torch.tensor(seq[s:])).sum()) for r, seq, s in zip(ref, seqs, starts))
    return hits / sum(len(seq) - s for seq, s in zip(seqs, starts))


def run(model: str, num_prompts: int, num_tokens: int, device: str, variants: list[str]) -> dict:
    base = make_llm(model, device, {})
    ps = prompts(base.tokenizer, num_prompts)
    outs = base.generate(ps, SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True), use_tqdm=False)
    seqs = [p + o.token_ids for p, o in zip(ps, outs)]
    starts = [len(p) for p in ps]
    ref = [sequence_logprobs(base, s) for s in seqs]
    result = {"model": model, "device": str(base.engine.device), "dtype": str(base.engine.runner.dtype),
              "prompts": num_prompts, "tokens_per_prompt": num_tokens, "variants": {}}
    # the reference read in one forward agrees with what it generated step by step (ties aside)
    result["reference_self_check"] = self_check(ref, seqs, starts)
    del base
    gc.collect()
    for name in variants:
        llm = make_llm(model, device, VARIANTS[name])
        stats = compare(ref, [sequence_logprobs(llm, s) for s in seqs], seqs, starts)
        stats["how"] = llm.engine.runner.quantization_name or "", llm.engine.runner.kv_cache_dtype_name
        result["variants"][name] = stats
        print(f"{model} {name}: top-1 agreement {stats['top1_agreement']:.1%} over {stats['tokens']} tokens, "
              f"mean |logprob diff| {stats['mean_abs_logprob_diff']:.4f}", flush=True)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="fp8-weights,fp8-kv")
    ap.add_argument("--threshold", type=float, default=0.90)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    result = run(args.model or default_model(), args.prompts, args.tokens, args.device, variants)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    low = [v for v, s in result["variants"].items() if s["top1_agreement"] < args.threshold]
    if low:
        print(f"below the {args.threshold:.0%} threshold: {', '.join(low)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
