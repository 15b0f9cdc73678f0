"""Tensor parallelism on the CPU (gloo): two ranks give the tokens of one, each reads only its
shard of the checkpoint, and a rank never outlives its engine nor dies unnoticed.

Models: ``tiny-qwen3`` (GQA, 2 KV heads = 2 ranks, tied embeddings); a test Llama with one KV
head (MQA: replicated on both ranks), an untied lm_head, a vocabulary of 1031 (odd: the last
rank's shard is padded) and biases on every projection (row-parallel biases added once);
``tiny-qwen3-moe`` (every expert split by its intermediate features, a dense layer too);
``tiny-llama`` in FP8 with 16x16 block scales (each rank reads whole blocks of them) and in
compressed-tensors FP8-dynamic (per-channel scales, split with their rows or replicated).
"""
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvray import LLM, SamplingParams
from kvray.replica.models import fp8_checkpoint
from kvray.replica.models.bpe import LLAMA3_TOKENIZER
from kvray.replica.models.loader import resolve_model
from kvray.replica.models.presets import Preset, _tiny, make_checkpoint
from kvray.replica.parallel.lifecycle import RankFailure
from tests.conftest import random_prompts

ROOT = Path(__file__).resolve().parents[2]
MQA = Preset("tiny-tp-mqa", "test: MQA, untied, vocab 1031, all biases",
             _tiny("LlamaForCausalLM", "llama", num_key_value_heads=1, vocab_size=1031, tie_word_embeddings=False,
                   attention_bias=True, mlp_bias=True, rope_theta=10000.0, rms_norm_eps=1e-5),
             LLAMA3_TOKENIZER, seed=9)
# chunked prefill (32-token steps), 4 sequences at a time, async scheduling (the default)
OPTS = dict(device="cpu", max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=32, max_num_seqs=4)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def mqa_dir(tmp_path_factory) -> str:
    return str(make_checkpoint(MQA, tmp_path_factory.mktemp("tp") / "mqa"))


def _fp8_block_16(out: Path) -> str:
    """tiny-llama in the HF fp8 format with 16 x 16 blocks: every rank's slice is whole blocks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fp8_checkpoint, "BLOCK", (16, 16))
        return str(fp8_checkpoint.convert_checkpoint(resolve_model("kvray:tiny-llama"), out, "fp8-block"))


@pytest.fixture(scope="module", params=["gqa", "mqa", "moe", "fp8-block", "fp8-dynamic"])
def pair(request, mqa_dir, tmp_path_factory):
    """(TP=1 engine, TP=2 engine, prompts) of one model."""
    model = {"gqa": "kvray:tiny-qwen3", "mqa": mqa_dir, "moe": "kvray:tiny-qwen3-moe",
             "fp8-dynamic": "kvray:tiny-llama-fp8-dynamic"}.get(request.param)
    model = model or _fp8_block_16(tmp_path_factory.mktemp("tp") / "fp8")
    one = LLM(model, **OPTS)
    two = LLM(model, tensor_parallel_size=2, **OPTS)
    shared = random_prompts(one.engine.vocab_size, [20], seed=1)[0]
    lengths = [1, 3, 17, 33, 60, 5, 90, 12]
    prompts = [(shared + p if i % 3 == 0 else p)  # some share a prefix: prefix-cache hits
               for i, p in enumerate(random_prompts(one.engine.vocab_size, lengths, seed=2))]
    yield one, two, prompts
    two.engine.runner.close()


def _tokens(llm, prompts, params=GREEDY):
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_two_ranks_give_the_greedy_tokens_of_one(pair):
    one, two, prompts = pair
    want = _tokens(one, prompts)
    assert _tokens(two, prompts) == want
    assert _tokens(two, prompts) == want  # again: every block comes from the prefix cache now
    assert two.engine.runner.quantization_name == one.engine.runner.quantization_name
    # what each rank holds: half the query heads, half the KV heads or the one KV head (replicated)
    cfg = one.engine.hf_config
    a1, a2 = one.engine.runner.layers[0], two.engine.runner.layers[0]
    assert (a1.num_heads, a2.num_heads) == (cfg.num_attention_heads, cfg.num_attention_heads // 2)
    assert a2.num_kv_heads == max(1, cfg.num_key_value_heads // 2)
    assert two.engine.runner.kv_bytes_per_block() * (2 if cfg.num_key_value_heads >= 2 else 1) == \
        one.engine.runner.kv_bytes_per_block()
    assert two.engine.block_manager.num_total_blocks == two.engine.runner.num_blocks == OPTS["num_kv_blocks"]


def test_two_ranks_give_the_prompt_logprobs_of_one(pair):
    """Prompt log-probs come from every rank's vocabulary shard of the planned rows (sent to rank 1
    with the step's header), in chunks of the 32-token steps, next to a request that wants none."""
    one, two, prompts = pair
    params = [SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=k) for k in (2, 0, 5)] + [GREEDY]
    want = one.generate(prompts[:4], params, use_tqdm=False)
    got = two.generate(prompts[:4], params, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        if w.prompt_logprobs is None:
            assert g.prompt_logprobs is None
            continue
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs) > 1
        for a, b in zip(w.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            assert set(a) == set(b) and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_graph_replays_on_two_ranks_give_the_eager_tokens(pair):
    """Rank 0 pads each step to its CUDA-graph bucket and names it in the header; rank 1 runs the
    same padded forward (on the CPU, what a replay computes, run eagerly)."""
    from kvray.replica.cuda_graphs import StepGraphs

    one, two, prompts = pair
    want = _tokens(one, prompts)
    runner, eng = two.engine.runner, two.engine
    runner.graphs = StepGraphs(runner.model, runner.inputs, eng.config.max_num_seqs, eng.max_num_batched_tokens,
                               eng.max_model_len, capture=False)
    try:
        sampled = [SamplingParams(temperature=0.8, seed=i, max_tokens=10) for i in range(len(prompts))]
        want_sampled = _tokens(one, prompts, sampled)
        assert _tokens(two, prompts) == want
        assert _tokens(two, prompts, sampled) == want_sampled  # seeded sampling on rank 0 only
    finally:
        runner.graphs = None


def test_the_model_must_split_evenly():
    with pytest.raises(ValueError, match="tensor_parallel_size=3: the model's num_attention_heads=4"):
        LLM("kvray:tiny-qwen3", tensor_parallel_size=3, device="cpu")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM("kvray:tiny-qwen3", tensor_parallel_size=0, device="cpu")
    # 128 x 128 FP8 block scales, 192 MLP features: each rank's 96 would split a block
    with pytest.raises(ValueError, match=r"down_proj.weight_scale_inv'?: a tensor-parallel shard \[0, 96\) of 192 "
                       "features is not made of whole blocks of 128"):
        LLM("kvray:tiny-llama-fp8-block", tensor_parallel_size=2, device="cpu")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while _alive(pid):
        assert time.monotonic() - t0 < timeout_s, f"process {pid} still alive after {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_a_dead_rank_fails_the_engine_at_once(mqa_dir):
    llm = LLM(mqa_dir, tensor_parallel_size=2, device="cpu", max_model_len=2048, num_kv_blocks=512)
    victim = llm.engine.runner.ranks.pids[0]
    long = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)
    _tokens(llm, [[1, 2, 3]], SamplingParams(max_tokens=2))  # running
    t0 = None

    def kill():
        nonlocal t0
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)

    import threading
    threading.Timer(1.0, kill).start()
    with pytest.raises(RankFailure, match=rf"tensor-parallel rank 1 \(pid {victim}\) died \(killed by SIGKILL\)"):
        _tokens(llm, [[1, 2, 3]] * 4, long)
    assert time.monotonic() - t0 < 5.0
    assert not llm.engine.has_unfinished()
    with pytest.raises(RankFailure):  # and stays failed: nothing runs on half a model
        _tokens(llm, [[4, 5]], SamplingParams(max_tokens=2))


def test_an_engine_dropped_without_close_stops_its_ranks(mqa_dir):
    llm = LLM(mqa_dir, tensor_parallel_size=2, device="cpu", max_model_len=128, num_kv_blocks=16)
    pid = llm.engine.runner.ranks.pids[0]
    assert _alive(pid)
    del llm
    gc.collect()
    _wait_gone(pid, 15.0)


def test_ranks_die_with_their_engine_process(mqa_dir):
    """SIGKILL the process that runs rank 0: rank 1 goes with it (PR_SET_PDEATHSIG), at once."""
    script = (f"from kvray import LLM; import time; llm = LLM({mqa_dir!r}, tensor_parallel_size=2, device='cpu', "
              "max_model_len=128, num_kv_blocks=16); print(llm.engine.runner.ranks.pids[0], flush=True); "
              "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        worker = int(proc.stdout.readline())
        assert _alive(worker)
        proc.kill()
        proc.wait(10)
        print(f"rank 1 gone {_wait_gone(worker, 5.0):.2f} s after rank 0 was killed")
    finally:
        proc.kill()


# ---- each rank reads its shard only ------------------------------------------------------------

BIG = Preset("tp-load", "test: 4 layers of 512 x 2048, vocab 8192, untied: 96 MB in float32",
             _tiny("LlamaForCausalLM", "llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=8192,
                   tie_word_embeddings=False, rope_theta=10000.0), LLAMA3_TOKENIZER, seed=11)
LOAD_SCRIPT = """
import json, sys
from kvray import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=int(sys.argv[2]), device="cpu", max_model_len=64, num_kv_blocks=8)
print(json.dumps(llm.engine.runner.rank_load_reports))
"""


def _load_reports(path: str, tp: int) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, path, str(tp)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_each_rank_reads_only_its_slice_of_the_checkpoint(tmp_path):
    path = str(make_checkpoint(BIG, tmp_path / "big"))
    ckpt = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    [single] = _load_reports(path, 1)
    ranks = _load_reports(path, 2)
    mib = 2**20
    def fmt(r):
        return (f"read {r['checkpoint_bytes_read'] / mib:.1f} MiB, holds {r['param_bytes'] / mib:.1f} MiB, peak memory "
                f"+{r['load_peak_anon_bytes'] / mib:.0f} MiB (RSS with the mapped file +{r['load_peak_rss_bytes'] / mib:.0f})")
    print(f"checkpoint {ckpt / mib:.1f} MiB; TP=1: {fmt(single)}; TP=2: "
          + "; ".join(f"rank {r['rank']} {fmt(r)}" for r in ranks))
    assert single["checkpoint_bytes_read"] > 0.99 * ckpt - 2**16
    for r in ranks:
        # everything but the replicated norms (a few KiB) is split in two
        assert r["checkpoint_bytes_read"] < 0.51 * single["checkpoint_bytes_read"]
        assert r["param_bytes"] < 0.51 * single["param_bytes"]
        # and the process never held much more while loading: the other half was never read
        assert r["load_peak_anon_bytes"] < 0.6 * single["load_peak_anon_bytes"]


# ---- one rank through the backend: what a single GPU can test of NCCL ----------------------------

def one_rank_group(monkeypatch) -> None:
    """Engines built from now on run every collective through a real one-rank group (gloo on the
    CPU, NCCL on a GPU) instead of skipping them: the per-step broadcast, the all-reduces, the
    logits gather. A one-rank collective is an identity, so the tokens must not change."""
    from kvray.replica.model_runner import ModelRunner
    from kvray.replica.parallel.group import connect, host_store

    def join(self, model_path, hf_config, rank, store_port):
        store = host_store(1, 60)
        return connect(0, 1, self.device, store.port, store=store)

    monkeypatch.setattr(ModelRunner, "_join", join)


def test_a_one_rank_group_runs_every_collective_and_changes_nothing(monkeypatch):
    opts = dict(OPTS, max_model_len=128)
    prompts = random_prompts(1024, [3, 40, 9], seed=5)
    want = _tokens(LLM("kvray:tiny-qwen3", **opts), prompts)
    one_rank_group(monkeypatch)
    llm = LLM("kvray:tiny-qwen3", **opts)
    group = llm.engine.runner.group
    assert group.distributed and group.size == 1 and group.backend_name == "gloo" and llm.engine.runner.inputs.shared
    calls = {"broadcast": 0, "all_reduce": 0, "gather": 0}
    for name in calls:
        real = getattr(group, name)
        monkeypatch.setattr(group, name, lambda x, _real=real, _name=name: calls.__setitem__(_name, calls[_name] + 1)
                            or _real(x))
    assert _tokens(llm, prompts) == want
    steps = calls["broadcast"]
    assert steps > 0 and calls["gather"] > 0  # once per step; the logits of the steps that sample
    assert calls["all_reduce"] == steps * (1 + 2 * llm.engine.hf_config.num_hidden_layers)  # embedding, o, down


def test_a_serving_engine_that_cannot_split_says_why():
    """In the engine process (what a replica runs) both ranks fail to load: the replica is told the
    reason, not that a rank died, and no rank process is left behind."""
    from kvray.replica.async_engine import AsyncLLMEngine
    from kvray.replica.config import EngineConfig
    from kvray.replica.engine_process import EngineProcessError

    before = set(_ranks())
    with pytest.raises(EngineProcessError, match="down_proj.weight_scale_inv'?: a tensor-parallel shard"):
        AsyncLLMEngine(EngineConfig("kvray:tiny-llama-fp8-block", tensor_parallel_size=2, device="cpu"), process=True)
    deadline = time.monotonic() + 10
    while set(_ranks()) - before:
        assert time.monotonic() < deadline, "a rank process outlived its failed engine"
        time.sleep(0.1)


def _ranks() -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"kvray.replica.parallel.worker" in (entry / "cmdline").read_bytes() \
                    and _alive(int(entry.name)):
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def test_collectives_that_return_no_work_are_not_waited_on():
    """NCCL in recent torch returns no work object for a collective issued on the current stream
    (``asyncOp`` off): the group must take that as done, not call ``.wait()`` on None."""
    import torch

    from kvray.replica.parallel.group import ParallelGroup

    class NoWork:  # a backend that runs each collective at once and returns nothing
        def allreduce(self, xs, opts):
            xs[0].mul_(2)

        def broadcast(self, xs, opts):
            xs[0].fill_(7)

        def gather(self, out, xs, opts):
            out[0][0].copy_(xs[0])

    g = ParallelGroup(0, 1, torch.device("cpu"), NoWork())
    x = torch.ones(3)
    assert torch.equal(g.all_reduce(x), torch.full((3,), 2.0))
    assert torch.equal(g.broadcast(x), torch.full((3,), 7.0))
    assert torch.equal(g.gather(x)[0], x)
