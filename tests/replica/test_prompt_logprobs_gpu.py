"""Prompt log-probs on the GPU's serving path (run with `pytest -m gpu`): CUDA graphs for mixed
and decode steps, async scheduling, Triton kernels, chunked prefill (a 128-token step budget)
and a prefix-cache hit, against transformers' teacher-forced log-probs in float32, and the
same engine run eagerly."""
import pytest
import torch

from kvray import LLM, SamplingParams
from kvray.replica.models.loader import resolve_model
from tests.conftest import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PRESET = "tiny-qwen3"
LENGTHS = [2, 17, 64, 129, 300, 40, 250, 90]


def run(enforce_eager: bool):
    llm = LLM(f"kvray:{PRESET}", dtype="float32", max_model_len=512, max_num_batched_tokens=128,
              max_num_seqs=16, enforce_eager=enforce_eager, gpu_memory_utilization=0.3)
    prompts = random_prompts(llm.engine.vocab_size, LENGTHS, seed=21)
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    asked = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=3)
    llm.generate(prompts[:2], plain, use_tqdm=False)  # two prompts in the prefix cache first
    outs = llm.generate(prompts, [asked, plain] * 4, use_tqdm=False)  # decodes share steps with prompt chunks
    assert llm.engine.runner.graphs is None if enforce_eager else llm.engine.runner.graphs is not None
    del llm
    torch.cuda.empty_cache()
    return prompts, outs


def test_prompt_logprobs_with_cuda_graphs_match_transformers_and_eager():
    from transformers import AutoModelForCausalLM

    prompts, graphs = run(enforce_eager=False)
    _, eager = run(enforce_eager=True)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(f"kvray:{PRESET}"), dtype=torch.float32).cuda().eval()
    for i in range(0, len(prompts), 2):
        p = prompts[i]
        with torch.inference_mode():
            ref = torch.log_softmax(hf(torch.tensor([p], device="cuda")).logits[0, :-1].float(), -1).cpu()
        g, e = graphs[i].prompt_logprobs, eager[i].prompt_logprobs
        assert g[0] is None and len(g) == len(p) and graphs[i].num_cached_tokens == 0
        for j in range(1, len(p)):
            assert abs(g[j][p[j]] - ref[j - 1, p[j]].item()) < 2e-3, (i, j)
            assert set(g[j]) == set(e[j]) and all(abs(g[j][t] - e[j][t]) < 1e-4 for t in g[j]), (i, j)
            top = sorted(g[j].values(), reverse=True)[:3]
            assert all(abs(a - b) < 2e-3 for a, b in zip(top, ref[j - 1].topk(3).values.tolist())), (i, j)
        assert graphs[i].token_ids == eager[i].token_ids
    for i in range(1, len(prompts), 2):
        assert graphs[i].prompt_logprobs is None and graphs[i].token_ids == eager[i].token_ids
