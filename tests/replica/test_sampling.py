"""Sampling: seeds, top-k/top-p distributions, stop strings and stop tokens."""
import math

import pytest
import torch

from kvray import LLM, SamplingParams
from kvray.replica.sampler import Sampler
from kvray.replica.sequence import Sequence
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def llm():
    return LLM("kvray:tiny-qwen3", max_model_len=256)


def _prompts(llm, n=6, seed=11):
    return random_prompts(llm.engine.vocab_size, [5 + 7 * i for i in range(n)], seed=seed)


def test_seeded_run_repeats_exactly(llm):
    prompts = _prompts(llm)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=24, ignore_eos=True)
              for i in range(len(prompts))]
    a = llm.generate(prompts, params, use_tqdm=False)
    # Same seeds, different batch composition (reversed, with an unseeded neighbour): same tokens.
    b = llm.generate(prompts[::-1] + prompts[:1], params[::-1] + [SamplingParams(temperature=1.0, max_tokens=24)],
                     use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b[:len(prompts)][::-1]]
    c = llm.generate(prompts, [SamplingParams(temperature=1.0, top_p=0.9, seed=999, max_tokens=24, ignore_eos=True)
                               for _ in prompts], use_tqdm=False)
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_top_k_1_equals_greedy(llm):
    prompts = _prompts(llm, seed=12)
    g = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    k1 = llm.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=20), use_tqdm=False)
    assert [o.token_ids for o in g] == [o.token_ids for o in k1]


def _truncated_softmax(logits, temperature, top_k, top_p):
    probs = torch.softmax(logits / temperature, -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[:top_k]] = True
    p = torch.where(keep, probs, 0)
    p = p / p.sum()
    sp, so = p.sort(descending=True)
    before = sp.cumsum(0) - sp
    nucleus = torch.zeros_like(keep)
    nucleus[so[before < top_p]] = True
    p = torch.where(nucleus & keep, p, 0)
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, -1, 0.6), (1.5, 6, 0.8)])
def test_empirical_distribution_matches_truncated_softmax(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, generator=gen) * 0.7
    n = 40000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    seqs = [Sequence(str(i), [1], params, 16) for i in range(n)]
    draws = torch.tensor(Sampler(torch.device("cpu"), seed=1)(logits.expand(n, -1).clone(), seqs).resolve().token_ids)
    counts = torch.bincount(draws, minlength=10).double() / n
    expected = _truncated_softmax(logits.double(), temperature, top_k if top_k > 0 else 10, top_p)
    # Tokens outside the truncation are never drawn; the rest match within 4 standard errors.
    assert torch.all(counts[expected == 0] == 0)
    se = torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((counts - expected).abs() <= 4 * se + 1e-9), (counts, expected)
    assert (expected > 0).sum() >= 2  # the case really samples


def test_logprobs_are_log_softmax_of_the_chosen_token(llm):
    prompts = _prompts(llm, n=2, seed=13)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5, logprobs=3), use_tqdm=False)
    for o in outs:
        assert len(o.logprobs) == len(o.token_ids) == len(o.top_logprobs)
        for tok, lp, top in zip(o.token_ids, o.logprobs, o.top_logprobs):
            assert lp <= 0 and len(top) == 3
            assert max(top, key=top.get) == tok  # greedy picks the most likely token
            assert math.isclose(top[tok], lp, rel_tol=1e-5)


def test_stop_string_cuts_text_exactly(llm):
    prompt = _prompts(llm, n=1, seed=14)
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    text = base.text
    assert len(text) > 12
    stop = text[8:12]
    cut = text.index(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == base.token_ids[:len(out.token_ids)]
    assert len(out.token_ids) < len(base.token_ids)


def test_stop_token_ids_end_output(llm):
    prompt = _prompts(llm, n=1, seed=15)
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    tok = base.token_ids[5]
    first = base.token_ids.index(tok)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[tok]),
                       use_tqdm=False)[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    length = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert length.finish_reason == "length" and len(length.token_ids) == 3


def test_eos_stops_unless_ignored(llm, monkeypatch):
    prompt = _prompts(llm, n=1, seed=16)
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    fake_eos = base.token_ids[3]  # declare a token the model is known to emit as EOS
    monkeypatch.setattr(llm.engine, "eos_token_ids", {fake_eos})
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(fake_eos) + 1]
    assert out.finish_reason == "stop"
    ign = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    assert ign.token_ids == base.token_ids and ign.finish_reason == "length"
