"""Prompt log-probs (``SamplingParams(prompt_logprobs=k)``) against transformers' teacher-forced
log-probs of the same checkpoint (CPU, float32): in one prefill, in chunks, after a prefix-cache
hit, through preemptions, with async scheduling on and off, and next to ordinary requests."""
import pytest
import torch

from kvray import LLM, SamplingParams
from kvray.replica.async_engine import AsyncLLMEngine
from kvray.replica.config import EngineConfig
from tests.conftest import random_prompts

PRESET = "tiny-qwen3"
TOL = 1e-4


@pytest.fixture(scope="module")
def hf(hf_loader):
    return hf_loader(PRESET)


@torch.inference_mode()
def teacher_forced(hf, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: log-probs at positions 0..n-2 (row i predicts token i + 1)."""
    logits = hf(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def check(out, hf, k: int) -> None:
    prompt = out.prompt_token_ids
    lps = out.prompt_logprobs
    assert lps is not None and len(lps) == len(prompt) and lps[0] is None
    ref = teacher_forced(hf, prompt)
    for i in range(1, len(prompt)):
        entry, row = lps[i], ref[i - 1]
        assert abs(entry[prompt[i]] - row[prompt[i]].item()) < TOL, (i, entry[prompt[i]], row[prompt[i]].item())
        top_v, top_i = row.topk(k) if k else (row[:0], row[:0].long())
        assert set(entry) == {prompt[i]} | set(top_i.tolist()), i
        for t, v in zip(top_i.tolist(), top_v.tolist()):
            assert abs(entry[t] - v) < TOL


def llm(**kw) -> LLM:
    return LLM(f"kvray:{PRESET}", max_model_len=512, dtype="float32", device="cpu", **kw)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_one_prefill_and_chunked_prefill(hf, async_scheduling):
    """Prompts of 1 to 300 tokens, a 64-token step budget: most prompts take several chunks,
    some share a step with others' chunks and decodes."""
    eng = llm(max_num_batched_tokens=64, async_scheduling=async_scheduling)
    prompts = random_prompts(eng.engine.vocab_size, [1, 2, 17, 64, 65, 150, 300], seed=5)
    params = [SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=k) for k in (0, 1, 2, 3, 5, 0, 4)]
    outs = eng.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outs, params):
        check(out, hf, p.prompt_logprobs)
        assert out.num_cached_tokens == 0


def test_with_and_without_a_prefix_cache_hit(hf):
    """A prompt whose blocks are all in the prefix cache: the request that asks for prompt
    log-probs recomputes it (no hit, the same log-probs), and ordinary requests still hit."""
    eng = llm()
    prompt = random_prompts(eng.engine.vocab_size, [100], seed=9)[0]
    plain = SamplingParams(temperature=0.0, max_tokens=3)
    asked = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2)
    first = eng.generate([prompt], [plain], use_tqdm=False)[0]
    assert first.prompt_logprobs is None and first.num_cached_tokens == 0
    without_hit = eng.generate([prompt], [asked], use_tqdm=False)[0]
    assert without_hit.num_cached_tokens == 0  # the cache held 96 of its tokens: not used
    check(without_hit, hf, 2)
    assert without_hit.token_ids == first.token_ids
    again = eng.generate([prompt], [plain], use_tqdm=False)[0]
    assert again.num_cached_tokens == 96 and again.token_ids == first.token_ids
    # a prompt extending the cached one: the same log-probs for the shared part, and the rest
    longer = prompt + random_prompts(eng.engine.vocab_size, [40], seed=10)[0]
    out = eng.generate([longer], [asked], use_tqdm=False)[0]
    check(out, hf, 2)
    assert out.prompt_logprobs[:100] == without_hit.prompt_logprobs


def test_through_preemptions(hf):
    """A KV pool too small for the batch: requests are preempted while (or after) their prompt
    is computed, and recomputed; each prompt log-prob is still there once."""
    eng = llm(num_kv_blocks=40, max_num_batched_tokens=48, block_size=16)
    prompts = random_prompts(eng.engine.vocab_size, [120, 90, 150, 60, 110, 130], seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)
    outs = eng.generate(prompts, params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    for out in outs:
        check(out, hf, 1)


def test_generation_unchanged_next_to_prompt_logprob_requests():
    """Ordinary requests in the same steps give the same tokens as alone; and the one token a
    prompt-log-prob request generates is the greedy one."""
    eng = llm(max_num_batched_tokens=64)
    prompts = random_prompts(eng.engine.vocab_size, [40, 70, 33, 90], seed=12)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    alone = [o.token_ids for o in eng.generate(prompts, greedy, use_tqdm=False)]
    mixed = eng.generate(prompts, [greedy, SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=3)] * 2,
                         use_tqdm=False)
    assert [o.token_ids for o in mixed] == alone
    assert [o.prompt_logprobs is None for o in mixed] == [True, False, True, False]


def test_bounds():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
def test_async_engine_returns_them(hf, process):
    """The serving engine hands the prompt log-probs out with the first output (in process
    mode they cross the process boundary in the first Delta)."""
    import asyncio

    engine = AsyncLLMEngine(EngineConfig(model=f"kvray:{PRESET}", max_model_len=256, device="cpu",
                                         max_num_batched_tokens=32), process=process)
    prompt = random_prompts(engine.vocab_size, [70], seed=13)[0]

    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=1)
        outs = [o async for o in engine.generate("r", prompt, params, delta=True)]
        await engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[0].prompt_logprobs is not None
    check(outs[0], hf, 1)
