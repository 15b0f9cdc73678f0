"""The async engine: streaming, abort, stats, health and shutdown."""
import asyncio

import pytest

from kvray import LLM, SamplingParams
from kvray.replica.async_engine import AsyncLLMEngine
from kvray.replica.config import EngineConfig
from tests.conftest import random_prompts


@pytest.fixture(scope="module", params=["thread", "process"])
def engine(request):
    """Both places the step loop can run: a thread of this process, or a child process."""
    eng = AsyncLLMEngine(EngineConfig(model="kvray:tiny-qwen3", max_model_len=256, max_num_seqs=16),
                         process=request.param == "process")
    yield eng
    if eng.is_alive():
        asyncio.run(eng.shutdown(timeout_s=1))


def test_streams_match_offline_generate(engine):
    prompts = random_prompts(engine.vocab_size, [3, 17, 40, 90], seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    offline = LLM("kvray:tiny-qwen3", max_model_len=256).generate(prompts, params, use_tqdm=False)

    async def one(i, p):
        outs = [o async for o in engine.generate(f"s{i}", p, params)]
        return outs

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for outs, ref in zip(results, offline):
        assert len(outs) >= 2  # streamed, not one blob
        assert sum(len(o.new_token_ids) for o in outs) == 25
        assert outs[-1].token_ids == ref.token_ids
        assert "".join(o.new_text for o in outs) == outs[-1].text == ref.text
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert outs[-1].metrics.first_token_time is not None


def test_abort_frees_blocks_and_stats(engine):
    prompt = random_prompts(engine.vocab_size, [60], seed=22)[0]
    total = engine.stats().num_total_blocks

    async def main():
        gen = engine.generate("to-abort", prompt, SamplingParams(max_tokens=200, ignore_eos=True))
        got = 0
        async for _ in gen:
            got += 1
            if got == 3:
                stats = engine.stats()
                await asyncio.sleep(0.2)  # past one request-snapshot period
                states = engine.request_snapshots()
                break
        await gen.aclose()  # the consumer walked away: the engine must abort the request
        for _ in range(100):
            if engine.stats().num_free_blocks == total and engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.02)
        return stats, states

    during, states = asyncio.run(main())
    assert len(states) == 1 and states[0].prefill_left == 0 and states[0].first_token is not None  # prefilled
    assert during.num_running == 1 and during.num_free_blocks < total
    assert during.tokens_in_flight >= 60 and during.num_steps > 0 and during.step_coeffs
    after = engine.stats()
    assert after.num_free_blocks == total and after.num_running == 0 and after.num_waiting == 0


def test_explicit_abort_ends_stream_with_abort_reason(engine):
    prompt = random_prompts(engine.vocab_size, [10], seed=23)[0]

    async def main():
        outs = []
        async for o in engine.generate("explicit", prompt, SamplingParams(max_tokens=500, ignore_eos=True)):
            outs.append(o)
            if len(outs) == 2:
                engine.abort("explicit")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert len(outs[-1].token_ids) < 500


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
def test_graceful_shutdown_finishes_in_flight(process):
    eng = AsyncLLMEngine(EngineConfig(model="kvray:tiny-qwen3", max_model_len=128), process=process)
    prompt = [5, 6, 7]

    async def main():
        task = asyncio.create_task(
            _last(eng.generate("g", prompt, SamplingParams(max_tokens=30, ignore_eos=True))))
        await asyncio.sleep(0.01)
        await eng.shutdown(timeout_s=30)
        out = await task
        with pytest.raises(RuntimeError, match="shutting down"):
            await _last(eng.generate("late", prompt, SamplingParams(max_tokens=3)))
        return out

    out = asyncio.run(main())
    assert out.finish_reason == "length" and len(out.token_ids) == 30
    assert not eng.is_alive()
    eng.check_health()  # stopped on purpose: not a failure
    if process:
        assert eng._process.proc.returncode == 0


def test_health_fails_when_the_engine_thread_dies():
    prompt = [5, 6, 7]

    broken = AsyncLLMEngine(EngineConfig(model="kvray:tiny-qwen3", max_model_len=128))

    def boom():
        raise RuntimeError("simulated GPU fault")

    broken.engine.step = boom

    async def crash():
        with pytest.raises(RuntimeError, match="engine loop died"):
            await _last(broken.generate("x", prompt, SamplingParams(max_tokens=3)))

    asyncio.run(crash())
    with pytest.raises(RuntimeError, match="engine loop died"):
        broken.check_health()


def test_a_dead_engine_process_fails_its_streams_and_health():
    eng = AsyncLLMEngine(EngineConfig(model="kvray:tiny-qwen3", max_model_len=128), process=True)
    prompt = [5, 6, 7]

    async def main():
        outs = []
        with pytest.raises(RuntimeError, match=r"the engine process died \(killed by SIGKILL\)"):
            async for o in eng.generate("x", prompt, SamplingParams(max_tokens=100, ignore_eos=True)):
                outs.append(o)
                if len(outs) == 2:
                    eng._process.proc.kill()  # what a CUDA fault or the OOM killer does to it
        return outs

    outs = asyncio.run(main())
    assert len(outs) == 2
    assert not eng.is_alive()
    with pytest.raises(RuntimeError, match=r"engine process died \(killed by SIGKILL\)"):
        eng.check_health()


async def _last(agen):
    last = None
    async for o in agen:
        last = o
    return last


def test_streamed_text_never_shows_part_of_a_stop_string(engine):
    prompt = random_prompts(engine.vocab_size, [12], seed=24)[0]
    base = LLM("kvray:tiny-qwen3", max_model_len=256).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    stop = base.text[10:16]
    assert len(stop) == 6

    async def main():
        return [o async for o in engine.generate(
            "stop", prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]))]

    outs = asyncio.run(main())
    streamed = "".join(o.new_text for o in outs)
    assert streamed == outs[-1].text == base.text[:base.text.index(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop


def test_delta_outputs_carry_only_new_tokens(engine):
    prompt = random_prompts(engine.vocab_size, [9], seed=25)[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)

    async def run(delta):
        return [o async for o in engine.generate(f"d{delta}", prompt, params, delta=delta)]

    full, deltas = asyncio.run(run(False)), asyncio.run(run(True))
    assert [t for o in deltas for t in o.token_ids] == full[-1].token_ids
    assert [lp for o in deltas for lp in o.logprobs] == full[-1].logprobs
    assert all(o.token_ids == o.new_token_ids and o.text == "" for o in deltas)
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"


def test_the_engine_process_exits_with_its_parent():
    """No orphaned engine (holding a GPU's memory) when its parent is killed outright."""
    import os
    import subprocess
    import sys
    import time

    code = ("import time\n"
            "from kvray.replica.async_engine import AsyncLLMEngine\n"
            "from kvray.replica.config import EngineConfig\n"
            "e = AsyncLLMEngine(EngineConfig(model='kvray:tiny-qwen3', max_model_len=128), process=True)\n"
            "print(e._process.proc.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()

    def running(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 30
    while running(child) and time.time() < deadline:
        time.sleep(0.2)
    alive = running(child)
    if alive:
        os.kill(child, 9)
    assert not alive, "the engine process outlived its parent"


def test_the_serving_side_of_an_engine_process_does_not_load_torch():
    """A replica's own process holds tokens, not tensors: about 70 MB instead of 350."""
    import subprocess
    import sys

    code = ("import asyncio, sys\n"
            "from kvray import SamplingParams\n"
            "from kvray.platform.replica import LLMReplica\n"
            "r = LLMReplica('kvray:tiny-qwen3', {'max_model_len': 128})\n"
            "async def main():\n"
            "    items = [b async for b in r.generate('a', [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))]\n"
            "    await r.__del__()\n"
            "    return sum(len(b.ids) for b in items[1:])  # after Bound: the tokens\n"
            "print(asyncio.run(main()), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["4", "False"], out.stdout + out.stderr[-2000:]
