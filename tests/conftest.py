import random

import pytest
import torch

TINY_PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]


def random_prompts(vocab_size: int, lengths: list[int], seed: int, low: int = 0) -> list[list[int]]:
    """Random token-id prompts (ids from `low` up to the vocabulary, so special tokens can be skipped)."""
    rng = random.Random(seed)
    return [[rng.randrange(low, vocab_size) for _ in range(n)] for n in lengths]


@torch.inference_mode()
def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    """transformers' greedy generate on one unpadded prompt: the tokens after the prompt."""
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                            eos_token_id=list(eos_ids), pad_token_id=next(iter(eos_ids)), top_k=None, top_p=None,
                            temperature=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def hf_loader():
    from transformers import AutoModelForCausalLM

    from kvray.replica.models.loader import resolve_model

    cache = {}

    def load(preset: str):
        if preset not in cache:
            path = resolve_model(f"kvray:{preset}")
            cache[preset] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[preset]

    return load


@pytest.fixture(autouse=True)
def _restore_kernel_backend():
    """An engine built with ``attention_backend=...`` sets the process-wide kernel backend: give
    every test the one it started with, so a test that forced Triton cannot leak it to the next."""
    from kvray.kernels import dispatch
    before = dispatch.get_override()
    yield
    dispatch.set_attention_backend(before)
