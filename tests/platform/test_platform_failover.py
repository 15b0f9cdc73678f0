"""Failover under load: 16 streams run on a 2-replica CPU app while one replica's engine child
process, or the replica itself, is killed. No stream hangs, each affected one gets a clear SSE
error within 5 s, no new request fails, and after an engine kill the app is back to two
replicas within 15 s.
"""
import asyncio
import os
import signal
import time

import aiohttp
import pytest
import requests

pytest.importorskip("ray")

from serve_app import engine_processes, long_stream, running_app, wait_until  # noqa: E402

NAME = "tiny-qwen3"
ARGS = {"model": "kvray:tiny-qwen3", "served_model_name": NAME,
        "engine": {"max_num_seqs": 64, "max_model_len": 2048, "device": "cpu"},
        "router": {"stats_period_s": 0.25}, "graceful_shutdown_timeout_s": 2}


@pytest.fixture(scope="module")
def base():
    before = set(engine_processes())
    with running_app(ARGS) as url:
        wait_until(lambda: _ready(url, before), 120, "two replicas never came up")
        yield url


def _ours(before: set) -> dict[int, int]:
    return {pid: ppid for pid, ppid in engine_processes().items() if pid not in before}


def _ready(url: str, before: set | None = None) -> bool:
    reps = requests.get(url + "/v1/kvray/replicas", timeout=10).json()["replicas"]
    healthy = [r for r in reps.values() if r["stats"] and r["stats"]["healthy"]]
    return len(healthy) == 2 and (before is None or len(_ours(before)) == 2)


async def _stream(session, url, i, started):
    how, at, error = await long_stream(session, url, NAME, f"long stream {i}", started)
    if error:
        assert error["message"] and error["type"]
    return how, at, error and error["message"]


async def _probe(session, url, stop: asyncio.Event, statuses: list):
    """New requests all along: none may fail."""
    while not stop.is_set():
        body = {"model": NAME, "prompt": "a new request", "max_tokens": 4}
        t0 = time.monotonic()
        async with session.post(url + "/v1/completions", json=body) as r:
            statuses.append((t0, r.status, (await r.text())[:200]))
        await asyncio.sleep(0.05)


def _kill_under_load(url, kill, settle_s: float):
    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            started = [asyncio.Event() for _ in range(16)]
            streams = [asyncio.create_task(_stream(session, url, i, e)) for i, e in enumerate(started)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            stop, statuses = asyncio.Event(), []
            probe = asyncio.create_task(_probe(session, url, stop, statuses))
            await asyncio.sleep(0.5)
            t_kill = time.monotonic()
            kill()
            await asyncio.sleep(settle_s)
            for s in streams:  # the survivors need not run to their end
                if not s.done():
                    s.cancel()
            results = await asyncio.gather(*streams, return_exceptions=True)
            ended = [("survived", None, None) if isinstance(r, asyncio.CancelledError) else r for r in results]
            for r in ended:
                if isinstance(r, BaseException):
                    raise r
            stop.set()
            await probe
            return t_kill, ended, statuses

    return asyncio.run(main())


def _check(t_kill, ended, statuses):
    errors = [t for kind, t, _ in ended if kind == "error"]
    assert errors, ended  # the killed replica had streams (least-load spreads 16 over both)
    assert all(t - t_kill <= 5.0 for t in errors), [round(t - t_kill, 2) for t in errors]
    assert not [k for k, _, _ in ended if k == "cut"], ended  # an error event, never a silently cut stream
    new = [(s, text) for t0, s, text in statuses if t0 > t_kill]  # sent after the kill
    assert new and all(s == 200 for s, _ in new), [x for x in new if x[0] != 200][:3]
    print(f"{len(errors)} streams got an error {min(errors) - t_kill:.2f}-{max(errors) - t_kill:.2f} s after the kill; "
          f"{len(new)} new requests, all 200")


def test_killing_an_engine_process(base):
    before_kill = engine_processes()
    victim = next(iter(before_kill))
    # settle: long enough for the replacement to come up while the probe keeps asking
    t_kill, ended, statuses = _kill_under_load(base, lambda: os.kill(victim, signal.SIGKILL), settle_s=6.0)
    _check(t_kill, ended, statuses)
    # the clients are told what happened, not "RayTaskError(RuntimeError)"
    messages = {msg for kind, _, msg in ended if kind == "error"}
    assert all("engine process died (killed by SIGKILL)" in m for m in messages), messages
    deadline = t_kill + 15.0
    while not (_ready(base) and victim not in engine_processes() and len(engine_processes()) >= len(before_kill)):
        assert time.monotonic() < deadline, "the app was not back to two replicas within 15 s of the kill"
        time.sleep(0.25)
    print(f"back to two healthy replicas {time.monotonic() - t_kill:.1f} s after the engine kill")


def test_killing_a_replica(base):
    wait_until(lambda: _ready(base), 120, "not two healthy replicas before the kill")
    child, replica_pid = next(iter(engine_processes().items()))
    t_kill, ended, statuses = _kill_under_load(base, lambda: os.kill(replica_pid, signal.SIGKILL), settle_s=4.0)
    _check(t_kill, ended, statuses)
    wait_until(lambda: child not in engine_processes(), 30, "the dead replica's engine process lingers")
    wait_until(lambda: _ready(base), 120, "Serve did not replace the replica")
