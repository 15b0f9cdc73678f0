"""A request can never kill an engine: what fails for one request fails that request alone.

Per-request failures (a stop check that raises), a whole step that raises, hypothesis-generated
sampling parameters, and the online engine's bounded queue.
"""
import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvray import LLM, SamplingParams
from kvray.replica.async_engine import AsyncLLMEngine, QueueFull
from kvray.replica.config import EngineConfig
from kvray.slo import SLOTarget
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("kvray:tiny-qwen3", max_model_len=128, num_kv_blocks=64)


@pytest.fixture(scope="module")
def prompts(llm):
    return random_prompts(llm.engine.vocab_size, [9, 17, 30], seed=3)


@pytest.fixture(scope="module")
def reference(llm, prompts):
    return [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _clean(llm) -> None:
    eng = llm.engine
    assert not eng.has_unfinished()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_total_blocks


def test_a_failing_request_fails_alone_and_the_llm_stays_usable(llm, prompts, reference, monkeypatch):
    from kvray.replica.detokenizer import TextStream

    real = TextStream.add
    calls = {"n": 0}

    def flaky(self, new_ids, finished):  # the stop check of one request raises on its 3rd token
        if self._stops == ["never-matches-xyz"]:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("a stop-string check blew up")
        return real(self, new_ids, finished)

    monkeypatch.setattr(TextStream, "add", flaky)
    bad = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=["never-matches-xyz"])
    with pytest.raises(RuntimeError, match="prompt 1: RuntimeError: a stop-string check blew up"):
        llm.generate(prompts, [GREEDY, bad, GREEDY], use_tqdm=False)
    _clean(llm)
    monkeypatch.setattr(TextStream, "add", real)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference


def test_a_step_that_raises_fails_its_requests_and_the_engine_goes_on(llm, prompts, reference, monkeypatch):
    """The async step loop's view: one failed step ends the running requests with an error;
    requests that were still waiting, and later ones, are served as usual."""
    eng = llm.engine
    real = eng.runner.execute
    state = {"n": 0}

    def breaks_once(*a, **k):
        state["n"] += 1
        if state["n"] == 2:
            raise RuntimeError("injected step failure")
        return real(*a, **k)

    monkeypatch.setattr(eng.runner, "execute", breaks_once)
    seqs = [eng.make_sequence(f"s{i}", p, GREEDY) for i, p in enumerate(prompts)]
    for s in seqs:
        eng.add_sequence(s)
    while eng.has_unfinished():
        eng.step()
    failed = [s for s in seqs if s.error is not None]
    assert failed and all("injected step failure" in s.error and s.finish_reason == "abort" for s in failed)
    for s in seqs:
        if s.error is None:
            assert s.output_token_ids == reference[seqs.index(s)]
    _clean(llm)
    monkeypatch.setattr(eng.runner, "execute", real)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference


def test_steps_failing_in_a_row_raise(llm, prompts, monkeypatch):
    eng = llm.engine

    def always(*a, **k):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(eng.runner, "execute", always)
    for _ in range(2):  # a failed step fails its request; the engine carries on
        with pytest.raises(RuntimeError, match="the engine failed prompt 0: RuntimeError: the device is gone"):
            llm.generate([prompts[0]], GREEDY, use_tqdm=False)
    with pytest.raises(RuntimeError, match="^the device is gone$"):  # the third in a row: the engine is broken
        llm.generate([prompts[0]], GREEDY, use_tqdm=False)
    monkeypatch.undo()
    _clean(llm)


INTS = st.one_of(st.integers(-3, 40), st.integers(-2**70, 2**70), st.sampled_from([2**63, 2**64, -2**63 - 1]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=st.fixed_dictionaries({}, optional={
    "temperature": FLOATS, "top_p": FLOATS, "top_k": INTS, "max_tokens": INTS, "min_tokens": INTS,
    "seed": st.one_of(st.none(), INTS), "logprobs": st.one_of(st.none(), INTS), "ignore_eos": st.booleans(),
    "stop": st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=3), max_size=20)),
    "stop_token_ids": st.one_of(st.none(), st.lists(INTS, max_size=4)), "priority": FLOATS}))
def test_generated_sampling_params_never_break_the_engine(llm, prompts, reference, kw):
    kw.setdefault("max_tokens", 4)
    try:
        if "priority" in kw:  # the SLO record carries it (and checks it)
            kw["slo"] = SLOTarget("generated", priority=kw.pop("priority"))
        params = SamplingParams(**kw)
    except ValueError:
        params = None
    if params is not None:
        out = llm.generate([prompts[0]], params, use_tqdm=False)[0]
        assert 1 <= len(out.token_ids) <= params.max_tokens
    _clean(llm)


def test_generated_params_then_a_normal_request_matches(llm, prompts, reference):
    """After everything the property test threw at it, the engine still gives the reference tokens."""
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference


def test_the_online_engine_refuses_past_its_queue_limit():
    cfg = EngineConfig(model="kvray:tiny-qwen3", max_model_len=128, max_num_seqs=2, max_queued_requests=3,
                       num_kv_blocks=64)
    engine = AsyncLLMEngine(cfg)
    prompt = random_prompts(engine.vocab_size, [10], seed=5)[0]
    long = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)

    async def main():
        sinks, refused = [], []
        for i in range(8):  # at once: 2 run, 3 wait, the rest are refused
            try:
                q: asyncio.Queue = asyncio.Queue()
                engine.submit(f"r{i}", prompt, long, q.put_nowait)
                sinks.append(q)
            except QueueFull as e:
                refused.append(e)
        assert len(sinks) == 5 and len(refused) == 3
        assert "max_queued_requests=3" in str(refused[0]) and refused[0].retry_after_s > 0
        for q in sinks:  # every admitted request runs to its end
            while True:
                d = await asyncio.wait_for(q.get(), 60)
                assert not isinstance(d, BaseException), d
                if d.finished:
                    break
        # drained: admitted again
        out = [o async for o in engine.generate("after", prompt, SamplingParams(temperature=0.0, max_tokens=3))]
        assert out[-1].finished

    try:
        asyncio.run(main())
    finally:
        asyncio.run(engine.shutdown(timeout_s=1))
