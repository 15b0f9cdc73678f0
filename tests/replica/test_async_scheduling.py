"""Async (one-step-lookahead) scheduling: the same outputs as the synchronous engine, every KV
block accounted for, and the next step really launched before the previous one is read back.

Each comparison runs one workload through two engines that differ only in ``async_scheduling``
and asserts identical tokens, finish reasons, stop reasons, text and log-probs, plus a clean
block pool at the end. Stop conditions are placed from a first unconstrained run, so that
sequences finish by EOS, stop token, stop string, max_tokens and max_model_len at chosen
positions in the middle of a batch (while the lookahead has already scheduled them again).
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvray import LLM, SamplingParams
from kvray.replica.engine import LLMEngine
from kvray.replica.sampler import SampleResult
from kvray.replica.sequence import SequenceStatus
from tests.conftest import random_prompts

PRESET = "kvray:tiny-qwen3"
LENGTHS = [1, 3, 9, 16, 17, 30, 33, 47, 64, 80, 100, 130]


def make(async_scheduling: bool, **kw) -> LLM:
    kw.setdefault("max_model_len", 512)
    return LLM(PRESET, async_scheduling=async_scheduling, **kw)


def summary(outs) -> list[tuple]:
    return [(o.token_ids, o.finish_reason, o.stop_reason, o.text, o.num_cached_tokens) for o in outs]


def assert_clean(llm: LLM) -> None:
    eng = llm.engine
    assert not eng.has_unfinished()
    bm = eng.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_total_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_total_blocks))


def count_lookaheads(llm: LLM) -> dict:
    """Wrap the runner: count launches whose decode inputs were gathered on the device."""
    runner = llm.engine.runner
    orig = runner.execute
    seen = {"launches": 0, "lookahead": 0, "mixed": 0}

    def execute(scheduled, pending=None, prev_tokens=None, prompt_lp=None):
        seen["launches"] += 1
        if pending:
            seen["lookahead"] += 1
            if any(n > 1 for _, n in scheduled):
                seen["mixed"] += 1  # a prompt chunk shares the step with gathered decodes
        return orig(scheduled, pending, prev_tokens, prompt_lp)

    runner.execute = execute
    return seen


def compare(prompts, params, **kw):
    """Run both modes; assert the same outputs and clean pools. Returns (sync, async) outputs and
    the async engine's lookahead counts."""
    results = {}
    counts = None
    for mode in (False, True):
        llm = make(mode, **kw)
        if mode:
            counts = count_lookaheads(llm)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert_clean(llm)
        results[mode] = outs
    sync, asyn = results[False], results[True]
    assert summary(asyn) == summary(sync)
    for a, b in zip(asyn, sync):
        if b.logprobs is not None:
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
            if b.top_logprobs:
                assert [sorted(d) for d in a.top_logprobs] == [sorted(d) for d in b.top_logprobs]
    assert counts["lookahead"] > 0, counts
    return sync, asyn, counts


@pytest.fixture(scope="module")
def free_run():
    """Greedy outputs without stop conditions (64 tokens each), to place stops from."""
    llm = make(False)
    prompts = random_prompts(llm.engine.vocab_size, LENGTHS, seed=11)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    return prompts, [o.token_ids for o in outs], llm.tokenizer


def test_stop_token_and_max_tokens_finishes_mid_batch(free_run):
    prompts, free, _ = free_run
    params = []
    for i, toks in enumerate(free):
        k = [1, 5, 9, 20, 33, 2][i % 6]
        if i % 3 == 0:  # stop at the token generated at position k (or an earlier copy of it)
            params.append(SamplingParams(temperature=0.0, max_tokens=64, stop_token_ids=[toks[k]]))
        else:  # length finish at k + 1 tokens
            params.append(SamplingParams(temperature=0.0, max_tokens=k + 1))
    sync, _, _ = compare(prompts, params)
    assert {o.finish_reason for o in sync} == {"stop", "length"}
    assert len({len(o.token_ids) for o in sync}) > 4  # finishes spread over many steps


def test_eos_finishes_mid_batch(free_run, monkeypatch):
    prompts, free, _ = free_run
    eos = free[4][7]  # a token some sequences produce part-way through
    hits = sum(eos in t for t in free)
    assert 0 < hits
    monkeypatch.setattr(LLMEngine, "_eos_ids", lambda self: {eos})
    sync, _, _ = compare(prompts, SamplingParams(temperature=0.0, max_tokens=64))
    stopped = [o for o in sync if o.finish_reason == "stop"]
    assert len(stopped) == hits and all(o.token_ids[-1] == eos for o in stopped)


def test_stop_strings_mid_batch(free_run):
    prompts, free, tok = free_run
    params = []
    for i, toks in enumerate(free):
        text = tok.decode(toks[:40], skip_special_tokens=True)
        stop = text[len(text) // 2:len(text) // 2 + 3].strip() if i % 2 == 0 else None
        params.append(SamplingParams(temperature=0.0, max_tokens=48, stop=[stop] if stop else None))
    sync, _, _ = compare(prompts, params)
    assert sum(o.finish_reason == "stop" and isinstance(o.stop_reason, str) for o in sync) >= 3


def test_max_model_len_finish():
    prompts = random_prompts(1000, [20, 60, 120, 125, 127], seed=5)
    sync, _, _ = compare(prompts, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True), max_model_len=128)
    assert [len(p) + len(o.token_ids) for p, o in zip(prompts, sync)] == [120, 128, 128, 128, 128]
    assert [o.finish_reason for o in sync] == ["length"] * 5


def test_seeded_sampling_and_logprobs():
    prompts = random_prompts(1000, LENGTHS, seed=12)
    params = [SamplingParams(temperature=0.9, top_k=50 if i % 2 else -1, top_p=0.9 if i % 3 else 1.0, seed=100 + i,
                             max_tokens=8 + 4 * i, logprobs=[None, 0, 3][i % 3], stop_token_ids=[7, 9])
              for i in range(len(prompts))]
    params[0] = SamplingParams(temperature=0.0, max_tokens=30, logprobs=2)  # greedy in the same batch
    compare(prompts, params)


def test_preemption_with_few_blocks():
    prompts = random_prompts(1000, LENGTHS + [200, 150, 90], seed=13)
    params = [SamplingParams(temperature=0.0, max_tokens=64, stop_token_ids=[3, 5, 8]) for _ in prompts]
    sync, asyn, _ = compare(prompts, params, num_kv_blocks=32, max_num_batched_tokens=256)
    assert sum(o.metrics.num_preemptions for o in asyn) > 0
    assert sum(o.metrics.num_preemptions for o in sync) > 0


def test_preempted_while_its_last_token_is_in_flight():
    """B's last token is in flight when the lookahead schedule preempts B to give A a block; B
    must then finish from the waiting queue (and leave it). The synchronous engine finishes B
    first and never preempts."""
    pa, pb = random_prompts(1000, [20, 20], seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=43, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)]
    kw = dict(max_model_len=64, block_size=8, num_kv_blocks=8)
    results = {}
    for mode in (False, True):
        llm = make(mode, **kw)
        eng = llm.engine
        finished_waiting = []
        orig = eng.scheduler.finish

        def finish(seq, reason, orig=orig, log=finished_waiting):
            log.append(seq.status is SequenceStatus.WAITING)
            return orig(seq, reason)

        eng.scheduler.finish = finish
        seqs = [eng.make_sequence(f"p{i}", p, sp) for i, (p, sp) in enumerate(zip((pa, pb), params))]
        for seq in seqs:
            eng.add_sequence(seq)
        while eng.has_unfinished():
            eng.step()
            check_holders(eng)
        assert_clean(llm)
        results[mode] = [(s.output_token_ids, s.finish_reason, s.metrics.num_preemptions) for s in seqs]
        assert any(finished_waiting) == mode
    assert [r[:2] for r in results[True]] == [r[:2] for r in results[False]]
    assert results[True][1][2] == 1 and results[False][1][2] == 0


def test_prefix_caching():
    shared = random_prompts(1000, [70], seed=3)[0]
    prompts = [shared + s for s in random_prompts(1000, [1, 7, 20, 33, 50, 64, 90, 5], seed=4)]
    params = SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[11])
    runs = {}
    for mode in (False, True):
        llm = make(mode)
        counts = count_lookaheads(llm)
        # one request computes the shared prefix, the others reuse it; then all of it is cached
        first = llm.generate(prompts[:1], params, use_tqdm=False) + llm.generate(prompts[1:], params, use_tqdm=False)
        second = llm.generate(prompts, params, use_tqdm=False)
        assert_clean(llm)
        assert all(o.num_cached_tokens >= 64 for o in second)
        runs[mode] = (summary(first), summary(second), llm.engine.block_manager.stats()["prefix_hit_tokens"])
    assert counts["lookahead"] > 0
    assert runs[True] == runs[False]
    assert [o[0] for o in runs[True][0]] == [o[0] for o in runs[True][1]]


def test_chunked_prefill_small_budget(free_run):
    prompts, free, _ = free_run
    params = [SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[t[6]] if i % 4 == 1 else None)
              for i, t in enumerate(free)]
    _, _, counts = compare(prompts, params, max_num_batched_tokens=32, max_num_seqs=6)
    assert counts["mixed"] > 0  # decodes gathered on the device next to prompt chunks


def drive_with_aborts(mode: bool, prompts, abort_at: dict[int, int], **kw):
    """Step by hand; abort request i once it has delivered abort_at[i] tokens (0: right after
    admission, while its prompt is still being computed)."""
    llm = make(mode, **kw)
    eng = llm.engine
    seqs = [eng.make_sequence(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=50)) for i, p in enumerate(prompts)]
    for s in seqs:
        eng.add_sequence(s)
    aborted = set()
    while eng.has_unfinished():
        eng.step()
        for i, n in abort_at.items():
            s = seqs[i]
            if i not in aborted and not s.is_finished and s.num_output_tokens >= n and s.status is SequenceStatus.RUNNING:
                assert eng.abort(s.request_id) is s
                aborted.add(i)
        check_holders(eng)
    assert_clean(llm)
    return [(s.output_token_ids, s.finish_reason) for s in seqs]


def test_abort_mid_generation():
    prompts = random_prompts(1000, LENGTHS, seed=14)
    abort_at = {0: 3, 2: 0, 5: 10, 7: 1, 11: 0}
    sync = drive_with_aborts(False, prompts, abort_at, max_num_batched_tokens=64)
    asyn = drive_with_aborts(True, prompts, abort_at, max_num_batched_tokens=64)
    assert asyn == sync
    assert [sync[i][1] for i in abort_at] == ["abort"] * len(abort_at)
    assert len(sync[5][0]) == 10


def check_holders(eng) -> None:
    """Every block's reference count equals the number of live sequences holding it."""
    bm = eng.block_manager
    bm.check_invariants()
    holders: dict[int, int] = {}
    assert all(s.status is SequenceStatus.WAITING for s in eng.scheduler.waiting)
    for s in eng.scheduler.running + list(eng.scheduler.waiting):
        for b in s.block_table:
            holders[b] = holders.get(b, 0) + 1
        assert -1 not in s.token_ids  # no placeholder survives a step
    for b in range(bm.num_total_blocks):
        assert bm.ref_count(b) == holders.get(b, 0), f"block {b}"


def test_lookahead_launches_before_reading_back():
    """In steady decode, step k+1 is launched before step k's tokens are read, its input ids
    gathered from step k's sampled-token tensor; step() returns step k's sequences."""
    llm = make(True)
    eng = llm.engine
    log = []
    orig_exec, orig_resolve = eng.runner.execute, SampleResult.resolve

    def execute(scheduled, pending=None, prev_tokens=None, prompt_lp=None):
        seqs, res, plp = orig_exec(scheduled, pending, prev_tokens, prompt_lp)
        log.append(("launch", res, len(pending or ())))
        return seqs, res, plp

    def resolve(self):
        log.append(("resolve", self))
        return orig_resolve(self)

    eng.runner.execute = execute
    SampleResult.resolve = resolve
    try:
        for i, p in enumerate(random_prompts(1000, [5, 9, 12, 20], seed=2)):
            eng.add_sequence(eng.make_sequence(f"s{i}", p, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)))
        returned = []
        while eng.has_unfinished():
            returned.append(sorted(s.num_output_tokens for s in eng.step()))
    finally:
        SampleResult.resolve = orig_resolve
    assert returned == [[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3], [4, 4, 4, 4], [5, 5, 5, 5], [6, 6, 6, 6]]
    launches = [i for i, e in enumerate(log) if e[0] == "launch"]
    assert [log[i][2] for i in launches] == [0, 4, 4, 4, 4, 4]  # the last token of each needs no further step
    resolves = {id(e[1]): i for i, e in enumerate(log) if e[0] == "resolve"}
    for k in range(len(launches) - 1):  # launch k+1 comes before resolve k
        assert launches[k + 1] < resolves[id(log[launches[k]][1])]
    hist = list(eng.step_history)
    assert len(hist) == 6 and all(r.duration_s > 0 for r in hist)
    assert eng.stats().num_running == 0


def test_host_list_sampler_falls_back_to_sync():
    """A sampler that hands back host lists (a test stand-in) gives nothing to gather from: no
    lookahead, and the sampler sees each sequence with exactly its real tokens."""
    llm = make(True)
    eng = llm.engine
    real = eng.runner.sampler
    seen = []

    def sampler(logits, seqs):
        seen.append([s.token_ids[-1] for s in seqs])
        res = real(logits, seqs)
        return SampleResult(res.token_ids.tolist())

    eng.runner.sampler = sampler
    counts = count_lookaheads(llm)
    prompts = random_prompts(1000, [4, 30], seed=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert counts["lookahead"] == 0 and all(-1 not in s for s in seen)
    ref = make(False).generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert_clean(llm)


def test_gather_writes_previous_tokens_into_inputs():
    llm = make(True)
    eng = llm.engine
    seqs = [eng.make_sequence(f"g{i}", [5 + i] * (3 + i), SamplingParams(max_tokens=4)) for i in range(3)]
    for s in seqs:
        eng.add_sequence(s)
    out = eng.scheduler.schedule()
    eng.scheduler.update_after_step(out)
    for s in seqs:
        s.token_ids.append(-1)
    out = eng.scheduler.schedule()
    assert [n for _, n in out.scheduled] == [1, 1, 1]
    prev = torch.tensor([70, 71, 72])
    step = eng.runner.inputs.build(out.scheduled, {seqs[0]: 2, seqs[2]: 0, seqs[1]: 1}, prev)
    assert step.input_ids.tolist() == [72, 71, 70]
    assert step.positions.tolist() == [3, 4, 5] and step.sample_index is None


# ---- randomized block accounting on the real engine, both modes ---------------------------
@st.composite
def engine_workloads(draw):
    bs = draw(st.sampled_from([8, 16]))
    max_model_len = draw(st.sampled_from([64, 96, 128]))
    min_blocks = -(-max_model_len // bs)
    return dict(
        engine=dict(block_size=bs, max_model_len=max_model_len, num_kv_blocks=draw(st.integers(min_blocks, 3 * min_blocks)),
                    max_num_batched_tokens=draw(st.sampled_from([16, 40, 128])), max_num_seqs=draw(st.integers(1, 8)),
                    enable_prefix_caching=draw(st.booleans())),
        prefix=draw(st.integers(0, 40)),
        reqs=draw(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 30), st.booleans(),
                                     st.one_of(st.none(), st.integers(0, 12))), min_size=2, max_size=10)),
        seed=draw(st.integers(0, 2**16)),
    )


def run_engine_workload(mode: bool, w) -> list:
    llm = make(mode, **w["engine"])
    eng = llm.engine
    rng = random.Random(w["seed"])
    mml = w["engine"]["max_model_len"]
    shared = [rng.randrange(1000) for _ in range(w["prefix"])]
    seqs, abort_at = [], {}
    for i, (n, out_len, stop, abort) in enumerate(w["reqs"]):
        prompt = (shared + [rng.randrange(1000) for _ in range(n)])[:mml - 1]
        p = SamplingParams(temperature=0.0, max_tokens=out_len, stop_token_ids=[1, 2, 3, 4] if stop else None)
        seqs.append(eng.make_sequence(f"w{i}", prompt, p))
        if abort is not None:
            abort_at[i] = abort
    for s in seqs:
        eng.add_sequence(s)
    for _ in range(2000):
        if not eng.has_unfinished():
            break
        eng.step()
        for i, n in abort_at.items():
            s = seqs[i]
            if not s.is_finished and s.num_output_tokens >= n:
                eng.abort(s.request_id)
        check_holders(eng)
    assert_clean(llm)
    return [(s.output_token_ids, s.finish_reason) for s in seqs]


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(engine_workloads())
def test_random_workloads_match_and_keep_blocks_consistent(w):
    assert run_engine_workload(True, w) == run_engine_workload(False, w)
