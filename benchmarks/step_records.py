"""Record real engine step times on the GPU and fit the step-time model to them.

  python benchmarks/step_records.py --preset llama-3.1-8b --out-dir OUT [--install]

Runs the serving workload's lengths (the Azure code + conversation traces merged, prompts up to
max_model_len) through an ``LLMEngine`` configured as a serving replica (step budget 2048,
``max_num_seqs`` 256, CUDA graphs): at each concurrency of ``--concurrency``, requests are
refilled as others finish for ``--refill-steps`` steps (decodes plus prompt chunks of every
size, as online), then left to drain for ``--drain-steps`` (decode-only steps of shrinking
batches). Every step (batched tokens, context tokens, sequences, seconds) is recorded; the fits
(``benchmarks/sim/steps.py``) are the one linear model ``t = a + b*batched + c*context + d*seqs``
that engines fit online, and separate fits of decode-only and mixed steps (the simulator's
``--true-model split``), each with its median and p90 relative error, in-sample and on held-out
steps (every 4th step left out of the fit).

Writes OUT/step_coeffs_<preset>.json (the format of kvray/step_coeffs/<model>.json, with the
model's shape; ``--install`` also writes it there, so the engine starts from it) and
OUT/step_records_<preset>.json (the raw records).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]

from benchmarks.sim.steps import fit, fit_split  # noqa: E402
from benchmarks.sim.workload import DEFAULT_TRACES, merged_trace  # noqa: E402


def drive(eng, lengths, concurrency: int, refill_steps: int, drain_steps: int, rng: random.Random) -> None:
    """Keep ``concurrency`` requests in the engine for ``refill_steps`` steps, then let them drain
    (at most ``drain_steps`` more steps; what is left is aborted)."""
    from kvray import SamplingParams

    live = set()
    ids = range(eng.vocab_size)

    def add():
        p, o = lengths[rng.randrange(len(lengths))]
        seq = eng.make_sequence(None, rng.choices(ids, k=p),
                                SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True))
        eng.add_sequence(seq)
        live.add(seq)

    for _ in range(concurrency):
        add()
    for k in range(refill_steps + drain_steps):
        eng.step()
        for s in [s for s in live if s.is_finished]:
            live.discard(s)
            if k < refill_steps:
                add()
        if not live:
            break
    for s in live:
        eng.abort(s.request_id)
    while eng.has_unfinished():
        eng.step()


def errors(coeffs, records) -> dict:
    errs = sorted(abs(coeffs.predict(b, c, s) - t) / t for b, c, s, t in records if t > 0)
    return {"median_rel_err": errs[len(errs) // 2], "p90_rel_err": errs[int(0.9 * len(errs))]} if errs else {}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--out-dir", default="out/step_records")
    ap.add_argument("--install", action="store_true", help="also write kvray/step_coeffs/<preset>.json")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--concurrency", default="16,64,160,256")
    ap.add_argument("--refill-steps", type=int, default=200)
    ap.add_argument("--drain-steps", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="{}", help="JSON of extra engine options (a CPU smoke test: "
                    '\'{"device": "cpu", "num_kv_blocks": 256}\')')
    return ap


def record_steps(eng) -> list:
    """The engine's step records from now on (its ``step`` wrapped to keep each new one)."""
    records = []
    orig = eng.step

    def step():
        out = orig()
        r = eng.step_history[-1] if eng.step_history else None
        if r is not None and (not records or records[-1] is not r):
            records.append(r)
        return out

    eng.step = step
    return records


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    import torch

    from kvray import LLM
    from kvray.step_cost import COEFFS_DIR, shape_of

    t0 = time.time()
    llm = LLM(f"kvray:{a.preset}", max_model_len=a.max_model_len, max_num_seqs=256, gpu_memory_utilization=0.9,
              **json.loads(a.engine))
    eng = llm.engine
    print(f"engine ready in {time.time() - t0:.0f} s", flush=True)
    records = record_steps(eng)
    limit = a.max_model_len - 2
    lengths = [(max(1, min(r.prompt, limit - 1)), max(1, min(r.output, 1024, limit - min(r.prompt, limit - 1))))
               for r in merged_trace(DEFAULT_TRACES)]
    rng = random.Random(a.seed)
    drive(eng, lengths, 8, 20, 20, rng)  # warm-up
    records.clear()
    t1 = time.time()
    for n in (int(x) for x in a.concurrency.split(",")):
        drive(eng, lengths, n, a.refill_steps, a.drain_steps, rng)
        print(f"concurrency {n}: {len(records)} steps so far, {time.time() - t1:.0f} s", flush=True)
    rows = [(r.num_batched_tokens, r.num_context_tokens, r.num_seqs, r.duration_s) for r in records]
    coeffs, stats = fit(rows)
    train = [r for i, r in enumerate(rows) if i % 4]
    held = [r for i, r in enumerate(rows) if not i % 4]
    held_coeffs, _ = fit(train)
    dtype = next(eng.runner.model.parameters()).dtype
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"model": a.preset, **dict(zip("abcd", coeffs.as_tuple())), "device": device,
              "source": f"{len(rows)} engine steps of {a.preset} (Azure code + conversation lengths, concurrency "
                        f"{a.concurrency}), benchmarks/step_records.py, {time.strftime('%Y-%m-%d')}",
              **{k: v for k, v in stats.items() if k != "steps"},
              "held_out": errors(held_coeffs, held), "split": fit_split(rows),
              "engine": {"max_num_batched_tokens": eng.max_num_batched_tokens, "max_num_seqs": 256,
                         "max_model_len": eng.max_model_len, "num_kv_blocks": eng.block_manager.num_total_blocks},
              "shape": shape_of(eng.hf_config, dtype)}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1) + "\n"
    (out / f"step_coeffs_{a.preset}.json").write_text(text)
    (out / f"step_records_{a.preset}.json").write_text(json.dumps(rows))
    if a.install:
        Path(COEFFS_DIR, f"{a.preset}.json").write_text(text)
    print(text, flush=True)
    return result


if __name__ == "__main__":
    main()
