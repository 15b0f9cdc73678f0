"""SLO-aware routing end to end on CPU: Ray Serve, 2 LLMReplica replicas, ``router.policy: slo_aware``.

Each replica takes 4 sequences (``max_num_seqs``); long batch streams fill them one at a time.
With one replica full, interactive requests go to the other; with both full, interactive requests
get 429 with Retry-After before their TTFT deadline; a request waiting in the router is sent as
soon as a stream ends.
"""
import asyncio
import time

import aiohttp
import pytest
import requests

ray = pytest.importorskip("ray")

from serve_app import running_app, wait_metric  # noqa: E402

NAME = "tiny-qwen3"
TTFT_MS = 3000
ARGS = {"model": "kvray:tiny-qwen3", "served_model_name": NAME,
        "engine": {"max_num_seqs": 4, "max_model_len": 4096, "device": "cpu", "num_kv_blocks": 2048,
                   "scheduling_policy": "deadline"},
        "slo_classes": {"interactive": {"ttft_ms": TTFT_MS, "tpot_ms": 2000, "priority": 2.0},
                        "batch": {"ttft_ms": 120000, "tpot_ms": 5000}},
        "default_slo_class": "interactive",
        "router": {"policy": "slo_aware", "policy_options": {"mode": "pack"}, "stats_period_s": 0.25},
        "graceful_shutdown_timeout_s": 2}


@pytest.fixture(scope="module")
def base():
    with running_app(ARGS, fast_metrics=True) as url:
        yield url


def _active(base) -> dict[str, int]:
    """Per replica: requests this Router sent there that have not finished."""
    reps = requests.get(base + "/v1/kvray/replicas", timeout=10).json()["replicas"]
    return {rid: r["router_active_requests"] for rid, r in reps.items()}


def _dispatched(base) -> dict[str, int]:
    reps = requests.get(base + "/v1/kvray/replicas", timeout=10).json()["replicas"]
    return {rid: r["router_dispatched_total"] for rid, r in reps.items()}


async def _open_batch_stream(session, base, i):
    """A long batch-class stream; returns the response once its first token arrived."""
    body = {"model": NAME, "prompt": f"batch job {i}", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    resp = await session.post(base + "/v1/completions", json=body, headers={"x-slo-class": "batch"})
    assert resp.status == 200, await resp.text()
    async for raw in resp.content:
        if raw.startswith(b"data: {"):
            return resp
    raise AssertionError("the batch stream ended before its first token")


async def _interactive(session, base, i):
    t0 = time.monotonic()
    body = {"model": NAME, "prompt": f"quick question {i}", "max_tokens": 8, "ignore_eos": True}
    async with session.post(base + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After"), time.monotonic() - t0


def test_interactive_goes_to_the_free_replica_then_429_when_both_are_full(base):
    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            streams = []
            try:
                # 1. four batch streams fill one replica (pack: the busiest that starts them at once)
                for i in range(4):
                    streams.append(await _open_batch_stream(s, base, i))
                act = _active(base)
                full = max(act, key=act.get)
                other = next(r for r in act if r != full)
                assert act == {full: 4, other: 0}, act

                # 2. one replica saturated: interactive requests go to the other one and meet the SLO
                before = _dispatched(base)
                results = await asyncio.gather(*(_interactive(s, base, i) for i in range(3)))
                assert [r[0] for r in results] == [200] * 3, results
                assert all(r[1]["usage"]["completion_tokens"] == 8 for r in results)
                after = _dispatched(base)
                assert after[other] - before[other] == 3 and after[full] == before[full], (before, after)

                # 3. four more batch streams fill the other replica
                for i in range(4, 8):
                    streams.append(await _open_batch_stream(s, base, i))
                assert _active(base) == {full: 4, other: 4}

                # 4. both saturated: interactive requests get 429 + Retry-After, before their deadline
                before = _dispatched(base)
                results = await asyncio.gather(*(_interactive(s, base, i) for i in range(3, 6)))
                for status, body, retry_after, elapsed in results:
                    assert status == 429, body
                    assert body["error"]["code"] == "slo_unattainable" and "interactive" in body["error"]["message"]
                    assert retry_after is not None and int(retry_after) >= 1
                    assert elapsed < TTFT_MS / 1000.0, elapsed  # never held past the TTFT deadline
                assert _dispatched(base) == before  # nothing was sent to a replica

                # 5. a request waiting in the router is sent as soon as a stream ends
                waiting = asyncio.ensure_future(_interactive(s, base, 99))
                await asyncio.sleep(0.3)
                assert not waiting.done()
                streams.pop(0).close()  # the client drops a batch stream: its slot frees
                status, body, _, elapsed = await waiting
                assert status == 200 and body["usage"]["completion_tokens"] == 8, body
                assert elapsed < TTFT_MS / 1000.0
            finally:
                for r in streams:
                    r.close()

    asyncio.run(main())
    wait_metric(base, "kvray_requests_total", 3, status="429", slo_class="interactive")
    deadline = time.time() + 30  # the dropped streams are aborted in the engines: every slot frees
    while any(_active(base).values()):
        assert time.time() < deadline, _active(base)
        time.sleep(0.25)
