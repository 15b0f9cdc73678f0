"""What a CUDA-graph replay computes, checked on the CPU: every step padded to its bucket (padding
tokens that write no KV and belong to no sequence, padding sequences without query tokens) and
run with the bucket's fixed kernel hints gives the same greedy tokens as the unpadded eager step,
on random arrivals with chunked prefill, prefix-cache hits and preemption. The Triton kernels'
handling of the same padding is checked against the reference in test_kernels.py; only the
capture and replay themselves need a GPU (test_engine_gpu.py)."""
import random

import pytest

from kvray import LLM, SamplingParams
from kvray.replica.cuda_graphs import Bucket, StepGraphs, decode_buckets, token_buckets
from tests.conftest import random_prompts


def test_buckets_cover_every_step_shape():
    assert decode_buckets(256)[:5] == [1, 2, 4, 8, 16] and decode_buckets(256)[-1] == 256
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    tb = token_buckets(2048)
    assert tb[0] == 16 and tb[-1] == 2048 and tb == sorted(set(tb))
    assert all(b / a <= 1.5 for a, b in zip(tb[2:], tb[3:]))  # little padding
    assert token_buckets(100)[-1] == 100
    g = StepGraphs(None, None, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, capture=False)
    assert g.bucket(5, 5) == Bucket(8, 8, True)  # decode only
    assert g.bucket(6, 5) == Bucket(16, 8, False)  # a chunk among decodes
    assert g.bucket(64, 2) == Bucket(64, 8, False)
    assert g.bucket(65, 2) is None


def _emulated(llm) -> StepGraphs:
    """The engine's runner with graphs whose replay is the recorded forward run eagerly."""
    runner = llm.engine.runner
    g = StepGraphs(runner.model, runner.inputs, llm.engine.config.max_num_seqs, llm.engine.max_num_batched_tokens,
                   llm.engine.max_model_len, capture=False)
    g.replay = lambda bucket, n: g.forward(bucket)[:n]
    runner.graphs = g
    return g


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_padded_steps_give_the_eager_tokens(async_scheduling):
    opts = dict(max_model_len=256, max_num_seqs=6, max_num_batched_tokens=48, num_kv_blocks=32, block_size=8,
                async_scheduling=async_scheduling)
    eager = LLM("kvray:tiny-qwen3", **opts)
    graphs = LLM("kvray:tiny-qwen3", **opts)
    g = _emulated(graphs)
    seen = []
    real_bucket = g.bucket
    g.bucket = lambda t, s: seen.append(real_bucket(t, s)) or seen[-1]

    rng = random.Random(7)
    vocab = eager.engine.vocab_size
    shared = random_prompts(vocab, [20], seed=11)[0]
    prompts = [shared + p if i % 3 == 0 else p  # some share a prefix (cache hits)
               for i, p in enumerate(random_prompts(vocab, [rng.randint(3, 90) for _ in range(14)], seed=12))]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(2, 40), ignore_eos=True) for _ in prompts]

    def run(llm):
        eng = llm.engine
        seqs, out, pending = [], {}, list(zip(prompts, params))
        while pending or eng.has_unfinished():  # arrivals: 0-2 new requests per step
            for _ in range(rng.randint(0, 2)):
                if pending:
                    p, sp = pending.pop(0)
                    s = eng.make_sequence(None, p, sp)
                    eng.add_sequence(s)
                    seqs.append(s)
            eng.step()
        for s in seqs:
            out[s.request_id] = s.output_token_ids
        return [out[s.request_id] for s in seqs]

    rng.seed(99)
    want = run(eager)
    rng.seed(99)
    got = run(graphs)
    assert got == want
    assert any(b.decode for b in seen) and any(not b.decode for b in seen)  # both kinds of graph ran
    assert graphs.engine.scheduler.num_preemptions > 0  # 32 blocks of 8 tokens for 6 sequences: some recompute
    bm = graphs.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
