"""Greedy parity with transformers `generate`, token for token, on CPU in float32.

Each test runs prompts through kvray under one engine configuration (plain, prefix-cached,
chunked prefill, preemption) and compares every generated token with transformers.
"""
import pytest

from kvray import LLM, SamplingParams
from kvray.slo import SLOTarget
from tests.conftest import TINY_PRESETS, hf_greedy, random_prompts

# 17 prompts of mixed lengths from 1 to 300 tokens, up to 64 new tokens each.
LENGTHS = [1, 2, 5, 9, 15, 16, 17, 31, 33, 48, 64, 100, 127, 150, 200, 255, 300]
MAX_NEW = [64, 40, 64, 17, 64, 1, 33, 64, 8, 64, 50, 64, 3, 64, 20, 64, 64]


@pytest.fixture(scope="module", params=TINY_PRESETS)
def case(request, hf_loader):
    preset = request.param
    llm = LLM(f"kvray:{preset}", max_model_len=512)
    hf = hf_loader(preset)
    eos = llm.engine.eos_token_ids
    prompts = random_prompts(llm.engine.vocab_size, LENGTHS, seed=len(preset) + 7)
    expected = [hf_greedy(hf, p, n, eos) for p, n in zip(prompts, MAX_NEW)]
    return preset, hf, llm, prompts, expected


def greedy(max_new):
    return [SamplingParams(temperature=0.0, max_tokens=n) for n in max_new]


def check(outs, expected):
    assert len(outs) == len(expected)
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert o.token_ids == e, f"prompt {i} (len {len(o.prompt_token_ids)}): kvray {o.token_ids} != hf {e}"
        assert o.finish_reason in ("stop", "length")


def test_greedy_parity(case):
    _, _, llm, prompts, expected = case
    check(llm.generate(prompts, greedy(MAX_NEW), use_tqdm=False), expected)


def test_parity_with_prefix_cache_hits(case):
    preset, hf, _, _, _ = case
    llm = LLM(f"kvray:{preset}", max_model_len=512)
    eng = llm.engine
    shared = random_prompts(eng.vocab_size, [70], seed=3)[0]
    suffixes = random_prompts(eng.vocab_size, [1, 7, 20, 33, 50, 64, 90, 5, 12, 40, 2, 16, 30, 45, 60, 75, 99], seed=4)
    prompts = [shared + s for s in suffixes]
    expected = [hf_greedy(hf, p, n, eng.eos_token_ids) for p, n in zip(prompts, MAX_NEW)]
    # First pass: one request computes the shared 70-token prefix (4 full blocks); the other
    # sixteen, admitted after it, reuse those blocks.
    check(llm.generate(prompts[:1], greedy(MAX_NEW[:1]), use_tqdm=False), expected[:1])
    check(llm.generate(prompts[1:], greedy(MAX_NEW[1:]), use_tqdm=False), expected[1:])
    first = eng.block_manager.stats()
    assert first["prefix_hit_tokens"] >= 16 * 64, first
    # Second pass: every full prompt block is already cached.
    check(llm.generate(prompts, greedy(MAX_NEW), use_tqdm=False), expected)
    second = eng.block_manager.stats()
    queried = second["prefix_queried_tokens"] - first["prefix_queried_tokens"]
    hits = second["prefix_hit_tokens"] - first["prefix_hit_tokens"]
    full_blocks = sum((len(p) - 1) // 16 * 16 for p in prompts)
    assert hits == full_blocks, (hits, full_blocks)
    assert hits / queried > 0.8


def test_parity_with_chunked_prefill(case):
    preset, _, _, prompts, expected = case
    llm = LLM(f"kvray:{preset}", max_model_len=512, max_num_batched_tokens=32, max_num_seqs=8)
    check(llm.generate(prompts, greedy(MAX_NEW), use_tqdm=False), expected)


def test_parity_under_preemption(case):
    preset, _, _, prompts, expected = case
    # 40 blocks of 16 = 640 tokens of KV for ~2,000 tokens of prompts: preemption must happen.
    llm = LLM(f"kvray:{preset}", max_model_len=512, num_kv_blocks=40, max_num_batched_tokens=256)
    outs = llm.generate(prompts, greedy(MAX_NEW), use_tqdm=False)
    check(outs, expected)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_total_blocks


def test_deadline_policy_keeps_greedy_output():
    # Scheduling order and chunk sizes change, tokens must not: greedy output is per sequence.
    prompts = random_prompts(1000, [3, 40, 90, 200], seed=31)
    params = [SamplingParams(temperature=0.0, max_tokens=24, slo=SLOTarget("t", t, 50))
              for t in (500, 10000, 500, 10000)]
    fcfs = LLM("kvray:tiny-qwen3", max_model_len=512, max_num_batched_tokens=64)
    deadline = LLM("kvray:tiny-qwen3", max_model_len=512, max_num_batched_tokens=64, scheduling_policy="deadline")
    assert type(deadline.engine.policy).__name__ == "DeadlinePolicy"
    a = fcfs.generate(prompts, params, use_tqdm=False)
    b = deadline.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
