"""What structured outputs cost per engine step: a batch of decodes with none, some or all rows
under a JSON-schema grammar, in one engine (CUDA graphs and async scheduling as served).

Each mode runs ``--batch`` requests of ``--prompt`` random prompt tokens and ``--tokens``
output tokens (the schema is one long bounded string, so constrained rows also run to
``--tokens``: every mode has the same steps). The grammar is compiled before timing (a served
request waits for it off the step loop). Reported: the median wall time of the decode steps
(``LLMEngine.step`` calls after the prefill ones), min and median over ``--repeat`` runs, and
the difference to the unconstrained batch of the same run.

  python benchmarks/structured_overhead.py [--preset qwen3-0.6b] [--batch 64] [--repeat 3]

The built-in presets have a 1,024-token tokenizer: the mask is filled over that vocabulary (and
the rest of the model's 151,936 rows masked out), so this is the engine's share of the cost; a
real 150k-token tokenizer makes the fill itself slower (xgrammar's own figures apply).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts benchmarks/ first on sys.path, where its file names could shadow
# installed packages: import from the repository root instead (siblings as benchmarks.X).
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(_ROOT / "benchmarks")]

from kvray import LLM, SamplingParams, StructuredOutputs  # noqa: E402

SCHEMA = {"type": "object", "required": ["text"],  # a string too long to close within --tokens
          "properties": {"text": {"type": "string", "minLength": 3000, "maxLength": 4000}}}


def run(llm: LLM, batch: int, structured: int, prompt: int, tokens: int, rng: random.Random) -> tuple[float, float]:
    """(median decode-step seconds, output tokens per second) of one batch."""
    eng = llm.engine
    so = StructuredOutputs(json_schema=json.dumps(SCHEMA))
    vocab = len(llm.tokenizer)
    seqs = []
    for i in range(batch):
        sp = SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=True,
                            structured_outputs=so if i < structured else None)
        seqs.append(eng.make_sequence(None, [rng.randrange(vocab) for _ in range(prompt)], sp))
    for s in seqs:
        if s.grammar is not None:
            s.grammar.future.result()
        eng.add_sequence(s)
    times, t0 = [], time.perf_counter()
    while eng.has_unfinished():
        t = time.perf_counter()
        eng.step()
        if all(s.num_output_tokens > 0 for s in seqs):  # past the prefill steps
            times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    assert all(s.num_output_tokens == tokens for s in seqs), [(s.num_output_tokens, s.finish_reason, s.error) for s in seqs]
    steady = times[2:-2] or times
    return statistics.median(steady), batch * tokens / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    llm = LLM(f"kvray:{a.preset}", device=a.device, max_num_seqs=max(a.batch, 8), max_model_len=2048,
              enable_prefix_caching=False)
    rng = random.Random(0)
    modes = [("none", 0), (f"{a.batch // 8} of {a.batch}", a.batch // 8), (f"all {a.batch}", a.batch)]
    run(llm, a.batch, a.batch, a.prompt, 8, rng)  # warm-up: compile, first masks
    res: dict[str, list[tuple[float, float]]] = {m: [] for m, _ in modes}
    for _ in range(a.repeat):
        for name, k in modes:
            res[name].append(run(llm, a.batch, k, a.prompt, a.tokens, rng))
    base = statistics.median(s for s, _ in res["none"])
    lines = [f"structured outputs, {a.preset}, batch {a.batch}, prompt {a.prompt}, {a.tokens} tokens, "
             f"{a.repeat} runs (min / median)", "",
             "| rows with a JSON-schema grammar | decode step ms | overhead per step ms | output tok/s |",
             "|---|---|---|---|"]
    for name, _ in modes:
        steps = sorted(s for s, _ in res[name])
        tps = sorted(t for _, t in res[name])
        med = statistics.median(steps)
        lines.append(f"| {name} | {steps[0] * 1e3:.2f} / {med * 1e3:.2f} | {(med - base) * 1e3:+.2f} | "
                     f"{tps[-1]:,.0f} / {statistics.median(tps):,.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
