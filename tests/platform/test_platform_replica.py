"""LLMReplica outside Serve: token batches, the token channel, aborts, stats, health, shutdown."""
import asyncio
from types import SimpleNamespace

import pytest

from kvray import SamplingParams
from kvray.platform.replica import LLMReplica
from kvray.platform.token_streams import _Active, _Outbox, _Request
from kvray.records import Bound, Delta, Refusal, RoutingHint

ENGINE = {"max_num_seqs": 16, "max_model_len": 256, "device": "cpu", "num_kv_blocks": 256}


def make(shutdown_timeout_s=30.0, **kw):
    return LLMReplica("kvray:tiny-qwen3", ENGINE, shutdown_timeout_s, **kw)


def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def test_batches_stats_and_errors():
    async def main():
        r = make()
        try:
            hint = RoutingHint("a", 5, 30)
            gen = r.generate("a", [1, 2, 3, 4, 5], greedy(30, logprobs=1), hint=hint)
            assert await gen.__anext__() == Bound("local")  # the replica that took it, then its tokens
            first = await gen.__anext__()
            assert first.ids and first.finish_reason is None and len(first.logprobs) == len(first.ids)
            stats = r.stats()
            assert stats.num_active_requests == 1 and 0 < stats.outstanding_tokens <= 30
            assert stats.engine.num_running == 1 and stats.engine.num_total_blocks > stats.engine.num_free_blocks
            assert stats.healthy and stats.num_requests_total == 1 and stats.time > 0
            assert (await r.record_routing_stats())["kvray"].replica_id == stats.replica_id
            rest = [b async for b in gen]
            ids = first.ids + [t for b in rest for t in b.ids]
            assert len(ids) == 30 and rest[-1].finish_reason == "length"
            assert len(first.top_logprobs) == len(first.ids)
            assert r.stats().outstanding_tokens == 0
            # refused requests: one Refusal, nothing left behind
            for prompt in ([], list(range(300))):
                items = [b async for b in r.generate(f"bad{len(prompt)}", prompt, greedy(4))]
                assert len(items) == 1 and isinstance(items[0], Refusal) and items[0].status == 400 and items[0].message
            params = SamplingParams()
            params.max_tokens = 0  # changed after construction: the engine validates again
            bad = [b async for b in r.generate("bad-params", [1, 2], params)]
            assert bad[0].status == 400
            info = await r.model_info()
            assert info["max_model_len"] == 256 and info["block_size"] == 16 and info["tokenizer"] is not None
            assert info["kv_cache_dtype"] == "float32" and info["quantization"] is None  # what /v1/models shows
            assert info["kv_cache_tokens"] == stats.engine.num_total_blocks * 16 > 0
        finally:
            await r.__del__()

    asyncio.run(main())


def test_first_batches_go_ahead_in_the_channel():
    """A request's first batch is put before the batches of streams already running, so the
    Router starts its response before it writes their chunks (TTFT under load)."""
    replica = SimpleNamespace(_interval_s=0.0, _first_token_at=None)

    def delta(ids, finished=False):
        return Delta(new_token_ids=ids, finished=finished, finish_reason="length" if finished else None)

    async def main():
        box = _Outbox()
        box.readers = 1
        reqs = {rid: _Request(replica, rid, _Active(4, 8), box) for rid in "abc"}
        reqs["a"].on_delta(delta([1]))  # a: first batch
        assert [rid for rid, _ in box.take()] == ["a"]
        reqs["a"].on_delta(delta([2]))  # a: running now
        reqs["b"].on_delta(delta([3]))  # b and c: first batches, after a's in the same step
        reqs["a"].on_delta(delta([4]))
        reqs["c"].on_delta(delta([5]))
        items = box.take()
        assert [(rid, b.ids) for rid, b in items] == [("b", [3]), ("c", [5]), ("a", [2]), ("a", [4])]
        reqs["b"].on_delta(delta([6], finished=True))
        reqs["c"].on_delta(delta([7]))
        assert [rid for rid, _ in box.take()] == ["b", "c"]  # both running: arrival order
        assert reqs["b"].done.done() and not reqs["c"].done.done()

    asyncio.run(main())


def test_stream_interval_merges_steps():
    async def main():
        r = make(stream_interval_ms=10_000)
        try:
            bound, *items = [b async for b in r.generate("m", [1, 2, 3], greedy(12))]
            # the first batch goes out at once (it may hold two steps if both were ready), the
            # rest waits for the interval, which the request outlives: one more batch
            assert bound == Bound("local")
            assert len(items) == 2 and items[0].ids and len(items[0].ids) + len(items[1].ids) == 12
        finally:
            await r.__del__()

    asyncio.run(main())


def test_channel_carries_every_request():
    async def main():
        r = make()
        try:
            chan = r.channel("c1")
            assert (await chan.__anext__()) == Bound("local")
            got: dict[str, list[int]] = {}
            done = set()

            async def reader():
                async for items in chan:
                    for rid, batch in items:
                        got.setdefault(rid, []).extend(batch.ids)
                        if batch.finish_reason:
                            done.add(rid)
                    if len(done) == 3:
                        return

            task = asyncio.create_task(reader())

            async def one(i):
                items = [b async for b in r.generate(f"r{i}", [i + 1] * (i + 3), greedy(10 + i), channel="c1")]
                assert items == [Bound("local")]  # the tokens went through the channel

            await asyncio.gather(*(one(i) for i in range(3)))
            await asyncio.wait_for(task, 30)
            assert {k: len(v) for k, v in got.items()} == {"r0": 10, "r1": 11, "r2": 12}
            # errors still come back on the request's own stream (refused before it is bound to a channel)
            items = [b async for b in r.generate("bad", [], greedy(3), channel="c1")]
            assert len(items) == 1 and items[0].status == 400
            await chan.aclose()
        finally:
            await r.__del__()

    asyncio.run(main())


def test_cancelled_request_frees_its_blocks():
    async def main():
        r = make()
        try:
            total = r.engine.stats().num_total_blocks
            gens = [r.generate(f"x{i}", list(range(1, 60)), greedy(200)) for i in range(4)]
            for g in gens:
                assert await g.__anext__() == Bound("local")
                await g.__anext__()  # its first tokens: its blocks are held
            assert r.engine.stats().num_free_blocks < total
            for g in gens:  # the caller goes away (Serve closes the generator)
                await g.aclose()
            for _ in range(100):
                s = r.stats()
                if s.engine.num_free_blocks == total and s.engine.num_running == 0:
                    break
                await asyncio.sleep(0.05)
            assert s.engine.num_free_blocks == total and s.num_active_requests == 0 and s.num_aborted_total == 4
        finally:
            await r.__del__()

    asyncio.run(main())


def test_health_check_follows_the_engine_loop():
    async def main():
        r = make()
        try:
            r.check_health()
            r.engine._error = RuntimeError("boom")  # what the engine thread records when it dies
            with pytest.raises(RuntimeError, match="boom"):
                r.check_health()
            assert r.stats().healthy is False
            r.engine._error = None
        finally:
            await r.__del__()

    asyncio.run(main())


@pytest.mark.parametrize("timeout_s, reason", [(30.0, "length"), (0.05, "abort")])
def test_graceful_shutdown(timeout_s, reason):
    async def main():
        r = make(shutdown_timeout_s=timeout_s)
        gen = r.generate("s", [1, 2, 3], greedy(150))
        await gen.__anext__()  # Bound
        await gen.__anext__()  # its first tokens: it runs
        consumer = asyncio.create_task(_drain(gen))
        await r.__del__()  # what Serve calls after draining its own in-flight calls
        items = await asyncio.wait_for(consumer, 30)
        assert items[-1].finish_reason == reason
        # no new work once stopped
        refused = [b async for b in r.generate("late", [1, 2], greedy(2))]
        assert refused[0].status == 503

    asyncio.run(main())


async def _drain(gen):
    return [b async for b in gen]


def test_a_replica_whose_engine_never_started_shuts_down_cleanly(caplog):
    """Serve calls ``__del__`` on a replica whose ``__init__`` raised (a bad model, say): it has no
    engine and no metrics task, and stopping it must not raise (it used to log an AttributeError)."""
    with pytest.raises(Exception, match="does not exist"):
        LLMReplica("/no/such/checkpoint", {"device": "cpu"})
    half_built = LLMReplica.__new__(LLMReplica)  # what __del__ sees after __init__ failed early
    asyncio.run(half_built.__del__())
