"""`serve run` of a CPU config with ``engine.tensor_parallel_size: 2``: one replica whose engine
process (rank 0) starts a rank process (rank 1, gloo). It answers the OpenAI API; when rank 1 is
killed under 8 streams, every stream gets a clear error within 5 s (none hangs), the replica
exits and Serve's replacement serves; when rank 0 is killed, rank 1 goes with it; nothing
outlives `serve run`.
"""
import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import requests

pytest.importorskip("ray")

from serve_app import (ServeRun, engine_processes, local_config, long_stream, module_processes,  # noqa: E402
                       wait_until)

NAME = "tiny-qwen3"


def rank_processes() -> dict[int, int]:
    """pid -> parent pid of every tensor-parallel rank process (``kvray.replica.parallel.worker``)."""
    return module_processes("kvray.replica.parallel.worker", skip_zombies=True)


def _config() -> dict:
    cfg = local_config()
    app = cfg["applications"][0]
    app["args"].update(model="kvray:tiny-qwen3", served_model_name=NAME, graceful_shutdown_timeout_s=2,
                       engine={"max_num_seqs": 16, "max_model_len": 2048, "device": "cpu", "tensor_parallel_size": 2})
    next(d for d in app["deployments"] if d["name"] == "LLMReplica")["num_replicas"] = 1
    return cfg


def _ours(before_engines: set, before_ranks: set) -> tuple[dict, dict]:
    engines = {p: pp for p, pp in engine_processes().items() if p not in before_engines}
    ranks = {p: pp for p, pp in rank_processes().items() if p not in before_ranks and pp in engines}
    return engines, ranks


async def _stream(session, url, i, started):
    how, at, error = await long_stream(session, url, NAME, f"a long stream {i}", started)
    return how, at, error and error["message"]


def _kill_under_streams(url: str, victim: int) -> tuple[float, list]:
    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            started = [asyncio.Event() for _ in range(8)]
            streams = [asyncio.create_task(_stream(session, url, i, e)) for i, e in enumerate(started)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            await asyncio.sleep(0.5)
            t_kill = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            return t_kill, await asyncio.gather(*streams)  # the client timeout bounds a hung stream

    return asyncio.run(main())


def test_serve_run_with_two_ranks_and_a_rank_killed(tmp_path):
    before_engines, before_ranks = set(engine_processes()), set(rank_processes())
    run = ServeRun(_config(), tmp_path)
    try:
        run.wait_healthy()
        r = requests.post(run.url + "/v1/completions", json={"model": NAME, "prompt": "Hello", "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, r.text
        r = requests.post(run.url + "/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        engines, ranks = _ours(before_engines, before_ranks)
        assert len(engines) == 1 and len(ranks) == 1, (engines, ranks)  # rank 0 is the engine process
        [(engine, _)] = engines.items()
        [(rank1, parent)] = ranks.items()
        assert parent == engine

        # rank 1 killed under 8 streams: each gets a clear error within 5 s, none hangs
        t_kill, ended = _kill_under_streams(run.url, rank1)
        assert [k for k, _, _ in ended] == ["error"] * 8, ended
        assert all(t - t_kill <= 5.0 for _, t, _ in ended), [round(t - t_kill, 2) for _, t, _ in ended]
        for _, _, message in ended:
            assert f"tensor-parallel rank 1 (pid {rank1}) died (killed by SIGKILL)" in message, message
        print(f"8 streams got the error {min(t for _, t, _ in ended) - t_kill:.2f}-"
              f"{max(t for _, t, _ in ended) - t_kill:.2f} s after the kill")
        wait_until(lambda: engine not in engine_processes(), 30, "the engine of the dead rank lingers")

        # Serve replaces the replica (a new rank 0 and rank 1), which serves
        wait_until(lambda: len(_ours(before_engines | {engine}, before_ranks | {rank1})[1]) == 1, 180,
                   "no replacement replica with its rank process")
        wait_until(run.healthy, 60, "unhealthy after the replacement")
        deadline = time.time() + 60
        while (r := requests.post(run.url + "/v1/completions",
                                  json={"model": NAME, "prompt": "Hello", "max_tokens": 5})).status_code != 200:
            assert time.time() < deadline, r.text
            time.sleep(1)

        # rank 0 killed: rank 1 dies with it (no orphan)
        engines, ranks = _ours(before_engines | {engine}, before_ranks | {rank1})
        [(engine2, _)] = engines.items()
        [(rank1b, _)] = ranks.items()
        os.kill(engine2, signal.SIGKILL)
        wait_until(lambda: rank1b not in rank_processes(), 5, "rank 1 outlived its engine process")
    finally:
        run.stop()

    def left() -> dict:
        return {pid: (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:4], parent)
                for pid, parent in {**engine_processes(), **rank_processes()}.items()
                if pid not in before_engines | before_ranks}

    deadline = time.time() + 30
    while remaining := left():
        assert time.time() < deadline, f"engine or rank processes outlived `serve run`: {remaining}"
        time.sleep(0.5)
